"""A split's fingerprint: which samples a run trains and validates on, so a resume on other files is refused."""
import hashlib
import os
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from data.corrupt import SkipCorrupt


def _base_and_indices(dataset: Dataset) -> tuple[Dataset, list[int]]:
    """The data set under any ``Subset`` and ``SkipCorrupt`` wrappers, and which of its samples the top one holds."""
    if isinstance(dataset, SkipCorrupt):
        return _base_and_indices(dataset.dataset)
    if isinstance(dataset, Subset):
        base, indices = _base_and_indices(dataset.dataset)
        return base, [indices[i] for i in dataset.indices]
    return dataset, list(range(len(dataset)))


def _content_digest(base: Dataset) -> bytes:
    """A hash of what the data set's samples are: file paths relative to its root (so a moved copy, the free
    key ``data.root``, matches), else the decoded arrays an archive or a bundled set holds."""
    h = hashlib.sha256()
    samples = getattr(base, "samples", None)
    if samples is not None:
        root = getattr(base, "root", None)
        for path, target in samples:
            name = os.path.relpath(path, root) if root else os.path.basename(path)
            h.update(f"{name}\t{target.tolist() if isinstance(target, torch.Tensor) else target}\n".encode())
    elif hasattr(base, "data"):  # torchvision's CIFAR archives: uint8 arrays
        h.update(np.ascontiguousarray(base.data).tobytes())
    elif hasattr(base, "images"):  # scikit-learn's digits
        h.update(base.images.numpy().tobytes())
    h.update(repr(list(getattr(base, "targets", []))).encode())
    return h.digest()


def split_fingerprint(dataset: Dataset) -> dict[str, Any]:
    """Count, class list and a hash of the samples (their files and the subset taken of them) of one split."""
    base, indices = _base_and_indices(dataset)
    h = hashlib.sha256(_content_digest(base))
    h.update(np.asarray(indices, dtype=np.int64).tobytes())
    return {"images": len(indices), "classes": list(getattr(base, "classes", [])), "sha256": h.hexdigest()[:16]}


def fingerprint_mismatch(saved: dict[str, Any], now: dict[str, Any]) -> str | None:
    """What differs between two splits' fingerprints ({split: fingerprint}), in words; None when they agree."""
    for split in sorted(saved.keys() & now.keys()):
        old, new = saved[split], now[split]
        if old == new:
            continue
        if old["classes"] != new["classes"]:
            return f"the {split} split's classes differ ({len(old['classes'])} then, {len(new['classes'])} now)"
        return (f"the {split} split holds other images ({old['images']} then, {new['images']} now; "
                f"file list hash {old['sha256']} then, {new['sha256']} now)")
    return None
