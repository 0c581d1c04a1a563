"""The per-sample randomness contract: every random choice made for a training sample is a function of
(seed, epoch, index) alone.

``uniforms`` is that function: a counter-based hash (splitmix64) of (seed, epoch, index, draw), so it
needs no generator state, gives the same numbers in any worker, on any rank and after a resume, and
computes a whole batch's draws at once. The augmentation parameters every input path uses (the PIL
path, the tensor-resident path, and later GPU decoding) are derived from it here, so the paths agree
for the same seed. Nothing here touches the process-global RNGs, which stay with dropout, DropPath
and mixup.
"""
import math
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _splitmix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective 64-bit mix (uint64 arithmetic wraps, as it should)."""
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    return x ^ (x >> np.uint64(31))


def _hash(*parts: np.ndarray | int) -> np.ndarray:
    """A 64-bit hash of a sequence of non-negative integers (broadcast over arrays)."""
    h = np.uint64(0)
    for part in parts:
        h = _splitmix(h + _GOLDEN + np.asarray(part, dtype=np.uint64))
    return h


def uniforms(seed: int, epoch: int, indices: Sequence[int] | np.ndarray, count: int) -> np.ndarray:
    """``count`` numbers in [0, 1) for each sample index: shape (len(indices), count), float64."""
    with np.errstate(over="ignore"):
        index = np.asarray(indices, dtype=np.uint64)[:, None]
        draws = _hash(seed, epoch, index, np.arange(count, dtype=np.uint64)[None, :])
    return (draws >> np.uint64(11)).astype(np.float64) / float(2**53)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """One 63-bit integer for a sample, for augmentations that take a seed rather than numbers."""
    with np.errstate(over="ignore"):
        return int(_hash(seed, epoch, index, 2**32) >> np.uint64(1))


def crop_flip_params(seed: int, epoch: int, indices: Sequence[int] | np.ndarray, height: int, width: int,
                     size: int, padding: int, flip: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random crop after zero padding (torchvision's ``RandomCrop(size, padding)``) and a horizontal flip
    with probability 1/2: per sample (top, left, flipped), offsets into the padded image."""
    u = uniforms(seed, epoch, indices, 3)
    tops = np.floor(u[:, 0] * (height + 2 * padding - size + 1)).astype(np.int64)
    lefts = np.floor(u[:, 1] * (width + 2 * padding - size + 1)).astype(np.int64)
    flips = (u[:, 2] < 0.5) if flip else np.zeros(len(u), dtype=bool)
    return tops, lefts, flips


RRC_ATTEMPTS = 10  # as torchvision's RandomResizedCrop
RRC_DRAWS = 4 * RRC_ATTEMPTS + 1  # four numbers a try, one for the flip


def resized_crop_boxes(seed: int, epoch: int, indices: Sequence[int] | np.ndarray, heights: np.ndarray,
                       widths: np.ndarray, scale: tuple[float, float] = (0.08, 1.0),
                       ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[np.ndarray, ...]:
    """RandomResizedCrop boxes as torchvision draws them (ten tries at an area fraction in ``scale`` and a
    log-uniform aspect ratio in ``ratio``, else the centred crop of the clamped aspect ratio), with each
    try's numbers from the contract. Returns per sample (top, left, height, width) and the flip."""
    heights, widths = np.asarray(heights, dtype=np.int64), np.asarray(widths, dtype=np.int64)
    u = uniforms(seed, epoch, indices, RRC_DRAWS)
    tries = u[:, :-1].reshape(-1, RRC_ATTEMPTS, 4)
    area = (heights * widths)[:, None]
    target = area * (scale[0] + (scale[1] - scale[0]) * tries[..., 0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = np.exp(log_lo + (log_hi - log_lo) * tries[..., 1])
    crop_w = np.rint(np.sqrt(target * aspect)).astype(np.int64)
    crop_h = np.rint(np.sqrt(target / aspect)).astype(np.int64)
    fits = (crop_w > 0) & (crop_h > 0) & (crop_w <= widths[:, None]) & (crop_h <= heights[:, None])
    first = np.where(fits.any(1), fits.argmax(1), -1)
    rows = np.arange(len(u))
    pick = np.maximum(first, 0)
    h, w = crop_h[rows, pick], crop_w[rows, pick]
    top = np.floor(tries[rows, pick, 2] * (heights - h + 1)).astype(np.int64)
    left = np.floor(tries[rows, pick, 3] * (widths - w + 1)).astype(np.int64)
    # no try fitted: the whole image, its aspect ratio clamped to ``ratio``, centred
    in_ratio = widths / heights
    fb_w = np.where(in_ratio < ratio[0], widths, np.where(in_ratio > ratio[1], np.rint(heights * ratio[1]), widths))
    fb_h = np.where(in_ratio < ratio[0], np.rint(widths / ratio[0]), heights)
    fb_w, fb_h = fb_w.astype(np.int64), fb_h.astype(np.int64)
    missed = first < 0
    h, w = np.where(missed, fb_h, h), np.where(missed, fb_w, w)
    top = np.where(missed, (heights - fb_h) // 2, top)
    left = np.where(missed, (widths - fb_w) // 2, left)
    return top, left, h, w, u[:, -1] < 0.5


@contextmanager
def library_rngs(seed: int) -> Iterator[None]:
    """Run a library augmentation that draws from Python's, NumPy's or torch's global RNG (timm's
    RandAugment, RandomErasing, ColorJitter) on a sample's own seed, then put the global states back,
    so the sample is reproducible and dropout, DropPath and mixup keep their own streams."""
    saved = random.getstate(), np.random.get_state(), torch.default_generator.get_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)  # the CPU generator only (torch.manual_seed queues CUDA seeds too)
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.default_generator.set_state(saved[2])
