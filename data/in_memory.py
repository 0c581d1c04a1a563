"""The tensor-resident input path (``data.in_memory``): a data set decoded once into one tensor on the
training device, then batches gathered, cropped, flipped and normalised there, with no worker processes.

It serves the CIFAR recipe (pad-and-crop, flip) on data sets whose images share one size and fit the
memory budget; the crops and flips come from the same per-sample contract as the PIL path's, so the
two paths give the same pixels for the same seed and a resumed run sees the same batches.
"""
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from torchvision import datasets

from choices import IN_MEMORY_CHOICES
from data.digits import DigitsDataset
from data.folder import load_rgb
from data.transforms import CropFlip
from data.workers import loader_workers
from errors import ConfigError

log = logging.getLogger("attnlab")

RESIDENT_RECIPES = ("cifar10", "cifar100", "digits")  # the pad-crop-flip recipe; ImageNet's crops vary in size
MAX_BYTES = 4 * 2**30  # whichever is smaller: 4 GiB or this fraction of the machine's memory
MAX_MEMORY_FRACTION = 0.2
MAX_GPU_FRACTION = 0.25  # of the device's free memory: the rest is the model's


class NotResident(Exception):
    """This data set cannot go in memory; the message says why (``auto`` then uses the PIL path)."""


def in_memory_setting(value) -> str:
    """``data.in_memory`` as one of auto|true|false (Hydra reads a bare true/false as a boolean)."""
    setting = str(value).lower()
    if setting not in IN_MEMORY_CHOICES:
        raise ConfigError(f"data.in_memory={value} is not valid; use one of {', '.join(IN_MEMORY_CHOICES)}")
    return setting


def recipe_blocker(cfg) -> str | None:
    """Why the configured recipe needs the per-image PIL path, or None when batches can be augmented on tensors."""
    if cfg.name not in RESIDENT_RECIPES:
        return f"data={cfg.name} uses the ImageNet recipe (RandomResizedCrop), which runs on the PIL path"
    if cfg.randaugment:
        return "data.randaugment (timm's RandAugment) runs on PIL images"
    if cfg.reprob > 0:
        return "data.reprob (timm's random erasing) runs per image"
    if cfg.skip_corrupt:
        return "data.skip_corrupt=true leaves images out batch by batch"
    return None


def memory_budget(device: torch.device | None = None) -> int:
    """Bytes one process's decoded images may take: min(4 GiB, 20% of this machine's memory), shared
    by the processes on this machine (torchrun's LOCAL_WORLD_SIZE), and on a GPU at most a quarter of
    its free memory."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    budget = min(MAX_BYTES, MAX_MEMORY_FRACTION * total) / local_ranks
    if device is not None and device.type == "cuda":
        budget = min(budget, MAX_GPU_FRACTION * torch.cuda.mem_get_info(device)[0])
    return int(budget)


@dataclass
class ResidentImages:
    """A whole split on the device: images (N, C, H, W), uint8 or float in [0, 1], and targets (N,)."""

    images: torch.Tensor
    targets: torch.Tensor

    def __len__(self) -> int:
        return len(self.targets)


def _source(dataset: Dataset) -> tuple[list[str] | torch.Tensor, list[int]]:
    """The image files (or the tensor already in memory) behind ``dataset``, and its targets."""
    if isinstance(dataset, Subset):
        images, targets = _source(dataset.dataset)
        picked = list(dataset.indices)
        images = [images[i] for i in picked] if isinstance(images, list) else images[picked]
        return images, [targets[i] for i in picked]
    if isinstance(dataset, DigitsDataset):
        return dataset.images, list(dataset.targets)
    if isinstance(dataset, datasets.CIFAR10):  # torchvision's archive (CIFAR-100 subclasses it): decoded already
        return torch.from_numpy(dataset.data).permute(0, 3, 1, 2), list(dataset.targets)
    if isinstance(dataset, datasets.ImageFolder):
        return [path for path, _ in dataset.samples], list(dataset.targets)
    raise NotResident(f"{type(dataset).__name__} does not expose its images")


class _DecodedFiles(Dataset):
    """Image files decoded to (H, W, C) uint8 arrays, as the PIL path reads them (``load_rgb``).

    Arrays, not tensors: a worker hands a tensor over through a shared-memory file each, an array
    as a few pickled bytes.
    """

    def __init__(self, paths: Sequence[str]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> np.ndarray:
        return np.asarray(load_rgb(self.paths[i]))


def _decode(paths: Sequence[str], workers: int, budget: int) -> torch.Tensor:
    """Every file decoded into one (N, C, H, W) uint8 tensor, in worker processes; NotResident when sizes differ or it is too big."""
    first = _DecodedFiles(paths)[0]
    need = len(paths) * first.size
    if need > budget:
        raise NotResident(f"{len(paths):,} images of {first.shape[:2]} need {need / 2**30:.2f} GiB, "
                          f"more than the in-memory budget of {budget / 2**30:.2f} GiB left")
    out = np.empty((len(paths), first.shape[2], *first.shape[:2]), dtype=np.uint8)  # N, C, H, W
    workers = min(workers, os.cpu_count() or 1)
    loader = DataLoader(_DecodedFiles(paths), batch_size=256, num_workers=workers, collate_fn=list)
    position = 0
    for batch in loader:
        for image in batch:
            if image.shape != first.shape:
                raise NotResident(f"{paths[position]} is {image.shape[:2]} but {paths[0]} is "
                                  f"{first.shape[:2]}: the images do not share one size")
            out[position] = image.transpose(2, 0, 1)
            position += 1
    return torch.from_numpy(out)


def load_resident(dataset: Dataset, device: torch.device, workers: int, budget: int) -> ResidentImages:
    """``dataset``'s images and targets, decoded once and moved to ``device``; raises NotResident."""
    images, targets = _source(dataset)
    if isinstance(images, list):
        images = _decode(images, workers, budget)
    elif images.numel() * images.element_size() > budget:
        raise NotResident(f"the images need {images.numel() * images.element_size() / 2**30:.2f} GiB, more "
                          f"than the in-memory budget of {budget / 2**30:.2f} GiB left")
    return ResidentImages(images.to(device).contiguous(), torch.as_tensor(targets, device=device))


class ResidentLoader:
    """Batches of a ResidentImages split in ``sampler``'s order, made on the device.

    ``sampler`` yields ``(index, epoch)`` keys for training (``EpochOrder``, whose epoch and skip the
    engine sets) or plain indices for evaluation. ``crop`` (training only) is applied to the whole
    batch with each sample's parameters from the contract; then uint8 images are scaled to [0, 1]
    (as ``ToTensor``) and every image is normalised (as ``Normalize``).
    """

    def __init__(self, data: ResidentImages, sampler: Sampler, batch_size: int, mean: Sequence[float],
                 std: Sequence[float], crop: CropFlip | None = None, seed: int = 0, drop_last: bool = False):
        self.data, self.sampler, self.batch_size, self.drop_last = data, sampler, batch_size, drop_last
        self.crop, self.seed = crop, seed
        device = data.images.device
        self.mean = torch.tensor([float(m) for m in mean], device=device).view(1, -1, 1, 1)
        self.std = torch.tensor([float(s) for s in std], device=device).view(1, -1, 1, 1)

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        keys = list(self.sampler)
        if not keys:  # e.g. resumed from a checkpoint written on the epoch's last step
            return
        keyed = isinstance(keys[0], tuple)
        indices = np.array([k[0] for k in keys] if keyed else keys, dtype=np.int64)
        device = self.data.images.device
        # the epoch's order and every crop go to the device once: no host-to-device copy, so no wait, per batch
        order = torch.from_numpy(indices).to(device)
        if self.crop is not None:  # training: the keys carry the epoch
            height, width = self.data.images.shape[-2:]
            params = [torch.from_numpy(p).to(device)
                      for p in self.crop.params(self.seed, keys[0][1], indices, height, width)]
        for b in range(len(self)):
            batch = slice(b * self.batch_size, (b + 1) * self.batch_size)
            x = self.data.images[order[batch]]
            if self.crop is not None:
                x = self.crop.batch(x, *(p[batch] for p in params))
            x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
            yield x.sub_(self.mean).div_(self.std), self.data.targets[order[batch]]


def resident_loaders(train_set: Dataset, val_set: Dataset, cfg, device: torch.device, train_order: Sampler,
                     val_order: Sampler, crop: CropFlip, seed: int, drop_last: bool
                     ) -> tuple[ResidentLoader, ResidentLoader]:
    """Both splits in memory on ``device``; raises NotResident (nothing is half-built then)."""
    budget = memory_budget(device)
    workers = loader_workers(cfg.num_workers)
    train = load_resident(train_set, device, workers, budget)
    val = load_resident(val_set, device, workers, budget - train.images.numel() * train.images.element_size())
    log.info("data in memory on %s: %d + %d images, %.0f MiB (data.in_memory)", device, len(train), len(val),
             (train.images.numel() * train.images.element_size() + val.images.numel() * val.images.element_size())
             / 2**20)
    eval_batch = cfg.eval_batch_size or 2 * cfg.batch_size
    return (ResidentLoader(train, train_order, cfg.batch_size, cfg.mean, cfg.std, crop, seed, drop_last),
            ResidentLoader(val, val_order, eval_batch, cfg.mean, cfg.std))


__all__ = ["NotResident", "ResidentLoader", "in_memory_setting", "recipe_blocker", "resident_loaders"]
