"""``data.decode=gpu``: loader workers read file bytes; JPEG batches are decoded on the training device.

The workers only read each file (``torchvision.io.read_file``); formats other than JPEG (PNG, ...) are
decoded there, as the PIL path decodes them (``load_rgb``). On the device, a batch's JPEGs are decoded
at once (nvJPEG through ``torchvision.io.decode_jpeg(device="cuda")``; on a machine without CUDA the
same code decodes on the CPU), then each image gets its recipe's crop and flip with the parameters of
the per-sample randomness contract (the same boxes as the PIL path: the same ``ResizedCropFlip`` or
``CropFlip`` object runs, on tensors), or the eval resize and centre crop, and the batch is normalised.
A file no decoder can read behaves as on the PIL path: a DataError naming it, or with
``data.skip_corrupt`` it is left out of its batch and reported. Recipes with library augmentations
(RandAugment, colour jitter, random erasing) need PIL images and stay on the PIL path.
"""
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torchvision.transforms as T
from torch.utils.data import Dataset, Subset, default_collate
from torchvision.io import ImageReadMode, decode_jpeg, read_file
from torchvision.transforms import functional as TF

from data.corrupt import Batch, SkipCorrupt, Skipped, batch_skipped
from data.folder import load_rgb
from errors import DataError

JPEG_MAGIC = (0xFF, 0xD8)


def decode_blocker(cfg, train_set: Dataset, transform) -> str | None:
    """Why the device path cannot run this recipe (its built ``TrainTransform``) on this data (None: it can)."""
    if transform.library or transform.after:
        return "the recipe's augmentations after the crop (RandAugment, colour jitter, erasing) run on PIL images"
    if file_samples(train_set) is None:
        return f"data={cfg.name} is not an image folder"
    return None


def decode_on_device(cfg, train_set: Dataset, device: torch.device, transform) -> bool:
    """Whether ``data.decode`` (cpu | gpu | auto: gpu where CUDA is) asks for, and gets, the device path."""
    blocker = decode_blocker(cfg, train_set, transform)
    if cfg.decode == "gpu" and blocker:
        raise DataError(f"data.decode=gpu but {blocker}; set data.decode=auto (or cpu)")
    return cfg.decode == "gpu" or (cfg.decode == "auto" and device.type == "cuda" and blocker is None)


def file_samples(dataset: Dataset) -> list[tuple[str, int]] | None:
    """The (path, target) pairs of an image folder, through subsets and ``SkipCorrupt``; None for other data."""
    if isinstance(dataset, SkipCorrupt):
        return file_samples(dataset.dataset)
    if isinstance(dataset, Subset):
        inner = file_samples(dataset.dataset)
        return None if inner is None else [inner[i] for i in dataset.indices]
    samples = getattr(dataset, "samples", None)
    return list(samples) if isinstance(samples, list) and samples and isinstance(samples[0][0], str) else None


@dataclass
class Encoded:
    """One sample as a worker hands it over: a JPEG's bytes (1-D uint8) or decoded (3, H, W) uint8 pixels."""

    data: torch.Tensor
    is_jpeg: bool
    path: str
    index: int
    epoch: int


class EncodedFiles(Dataset):
    """Image-folder samples keyed by ``(index, epoch)`` (or a bare index: evaluation) -> (``Encoded``, target)."""

    def __init__(self, samples: list[tuple[str, int]]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]):
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        path, target = self.samples[index]
        try:
            data = read_file(path).clone()  # an ordinary storage: read_file's cannot be shared with the main process
        except RuntimeError as e:
            raise DataError(f"cannot read image {path} ({e}); remove or replace the file") from None
        is_jpeg = len(data) > 2 and tuple(data[:2].tolist()) == JPEG_MAGIC
        if not is_jpeg:  # decoded here, with the PIL path's conversions (16-bit, palettes)
            data = TF.pil_to_tensor(load_rgb(path))
        return Encoded(data, is_jpeg, path, index, epoch), target


class SkipUnreadable(Dataset):
    """``SkipCorrupt`` for ``EncodedFiles``: an unreadable file comes back as ``Skipped``."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        try:
            return self.dataset[key]
        except DataError as e:
            return Skipped(str(e))


def collate_encoded(samples: list) -> Batch:
    """A list of ``Encoded`` (sizes differ) and the stacked targets; skipped files ride along."""
    good = [s for s in samples if not isinstance(s, Skipped)]
    skipped = [s.reason for s in samples if isinstance(s, Skipped)]
    if not good:
        return Batch((None, None), skipped)
    return Batch(([s[0] for s in good], default_collate([s[1] for s in good])), skipped)


def decode_one(item: Encoded, device: torch.device) -> torch.Tensor:
    """One file's (3, H, W) uint8 pixels on ``device``: the device's JPEG decoder, else the CPU's, else PIL."""
    if not item.is_jpeg:
        return item.data.to(device, non_blocking=True)
    for where in ([device, torch.device("cpu")] if device.type != "cpu" else [device]):
        try:
            return decode_jpeg(item.data, mode=ImageReadMode.RGB, device=where).to(device)
        except RuntimeError:
            continue
    return TF.pil_to_tensor(load_rgb(item.path)).to(device)  # CMYK and other JPEGs they refuse; else a DataError


def decode_batch(items: list[Encoded], device: torch.device, skip_corrupt: bool
                 ) -> tuple[list[torch.Tensor], list[bool], list[str]]:
    """Every item's pixels on ``device`` (JPEGs in one batched call), which decoded, and the reasons of those
    that did not (``skip_corrupt``; otherwise the first unreadable file raises)."""
    jpegs = [i for i, item in enumerate(items) if item.is_jpeg]
    images: list[torch.Tensor | None] = [None] * len(items)
    if jpegs:
        try:
            decoded = decode_jpeg([items[i].data for i in jpegs], mode=ImageReadMode.RGB, device=device)
            for i, image in zip(jpegs, decoded):
                images[i] = image
        except RuntimeError:  # one bad file fails the batch: decode one by one to find it
            pass
    reasons = []
    for i, item in enumerate(items):
        if images[i] is None:
            try:
                images[i] = decode_one(item, device)
            except DataError as e:
                if not skip_corrupt:
                    raise
                reasons.append(str(e))
    kept = [image is not None for image in images]
    return [image for image in images if image is not None], kept, reasons


def pixel_ops(transform) -> list:
    """The steps of an eval ``Compose`` that work on pixels (resize, centre crop), without the tensor
    conversion and normalisation the device path does itself."""
    ops = transform.transforms if isinstance(transform, T.Compose) else [transform]
    return [op for op in ops if not isinstance(op, (T.ToTensor, T.Normalize, T.PILToTensor))
            and type(op).__name__ not in ("MaybeToTensor", "ToNumpy")]


class DeviceDecodeLoader:
    """Batches of a worker ``DataLoader`` over ``EncodedFiles``, decoded and transformed on ``device``.

    Args:
        loader: yields ``collate_encoded`` batches.
        device: where to decode and transform.
        crop: training: the recipe's ``crop(image, seed, epoch, index)``; None for evaluation.
        eval_ops: evaluation's resize and centre crop (``pixel_ops``).
        mean, std: normalisation.
        seed: the run's seed, for ``crop``.
        skip_corrupt: leave unreadable files out of their batch (else raise).
    """

    def __init__(self, loader, device: torch.device, crop, eval_ops: list, mean, std, seed: int,
                 skip_corrupt: bool):
        self.loader, self.device, self.crop, self.eval_ops, self.seed = loader, device, crop, eval_ops, seed
        self.sampler, self.batch_size = loader.sampler, loader.batch_size  # set_train_epoch's handles
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255
        self.skip_corrupt = skip_corrupt

    def __len__(self) -> int:
        return len(self.loader)

    def transform(self, image: torch.Tensor, item: Encoded) -> torch.Tensor:
        """One (3, H, W) uint8 image -> its (3, size, size) float pixels (0-255), cropped as the recipe says."""
        if self.crop is not None:
            return self.crop(image, self.seed, item.epoch, item.index).float()
        for op in self.eval_ops:
            image = op(image)
        return image.float()

    def __iter__(self) -> Iterator[Batch]:
        for batch in self.loader:
            items, targets = batch
            skipped = list(batch_skipped(batch))
            if items is None:
                yield batch
                continue
            images, kept, reasons = decode_batch(items, self.device, self.skip_corrupt)
            if not images:
                yield Batch((None, None), skipped + reasons)
                continue
            decoded = [item for item, keep in zip(items, kept) if keep]
            x = torch.stack([self.transform(image, item) for image, item in zip(images, decoded)])
            targets = targets[torch.tensor(kept)] if not all(kept) else targets
            yield Batch(((x - self.mean) / self.std, targets.to(self.device, non_blocking=True)), skipped + reasons)
