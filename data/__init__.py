"""Data sets, transforms and loaders, built from the ``data`` config."""
import logging
import signal
from collections.abc import Iterable
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset, Subset

from data.corrupt import SkipCorrupt, collate_skipping
from data.device_decode import (DeviceDecodeLoader, EncodedFiles, SkipUnreadable, collate_encoded,
                                decode_on_device, file_samples, pixel_ops)
from data.digits import DigitsDataset
from data.folder import has_folder_layout, image_folder, torchvision_cifar
from data.in_memory import (NotResident, ResidentLoader, in_memory_setting, load_resident, memory_budget,
                            recipe_blocker, resident_loaders)
from data.multilabel import MultiLabelCSV
from data.samplers import EpochOrder, ShardSampler, balanced_indices
from data.seeded import KeyedSamples
from data.transforms import (cifar_crop_flip, cifar_transform, digits_crop_flip, digits_transform,
                             imagenet_transform)
from data.workers import loader_workers
from errors import ConfigError, DataError

log = logging.getLogger("attnlab")

DATASETS = ("digits", "cifar10", "cifar100", "imagenet", "imagefolder", "multilabel_csv")


def build_dataset(cfg: DictConfig, train: bool, transformed: bool | None = None) -> Dataset:
    """The train or val split named by ``cfg.name``, before any subsetting.

    Val images come transformed (the eval transform is deterministic); train images come as decoded,
    since their augmentation needs each sample's (seed, epoch, index): ``build_loaders`` adds it.
    ``transformed=True`` gives the train split with the eval transform (``data.val_split``'s hold-out).
    """
    transform = eval_transform(cfg) if (not train if transformed is None else transformed) else None
    if cfg.name == "digits":
        return DigitsDataset(train, cfg.image_size, transform)
    if cfg.name not in DATASETS:
        raise DataError(f"data: unknown data set '{cfg.name}'; valid names: {', '.join(DATASETS)}")
    if not cfg.root:
        raise DataError(f"data={cfg.name} needs data.root=DIR")
    root = Path(cfg.root).expanduser()
    split = "train" if train else "val"
    if cfg.name in ("cifar10", "cifar100"):
        if has_folder_layout(root):
            return image_folder(root, split, transform)
        return torchvision_cifar(cfg.name, root, train, cfg.download, transform)
    if not root.is_dir():
        raise DataError(f"data.root={root} does not exist; point it at a folder with train/ and val/")
    if cfg.name == "multilabel_csv":
        if not cfg.classes:
            raise DataError("data=multilabel_csv needs data.classes=[name, ...] (the label vocabulary)")
        return MultiLabelCSV(root, split, cfg.classes, transform)
    return image_folder(root, split, transform)


def _recipe(cfg: DictConfig):
    """The transform factory of ``cfg.name``'s recipe."""
    if cfg.name == "digits":
        return digits_transform
    return cifar_transform if cfg.name in ("cifar10", "cifar100") else imagenet_transform


def eval_transform(cfg: DictConfig):
    """The deterministic eval transform of the data set's recipe."""
    return _recipe(cfg)(cfg, train=False)


def train_transform(cfg: DictConfig):
    """The recipe's training transform, called as ``transform(image, seed, epoch, index)``."""
    return _recipe(cfg)(cfg, train=True)


def _check_classes(cfg: DictConfig, train_set: Dataset, val_set: Dataset) -> None:
    """The class lists of both splits agree with each other and with ``num_classes``."""
    train_classes, val_classes = train_set.classes, val_set.classes
    if list(train_classes) != list(val_classes):
        raise DataError(
            f"data ({cfg.name}): train has classes {list(train_classes)[:5]}... but val has "
            f"{list(val_classes)[:5]}...; both splits need the same class folders"
        )
    if len(train_classes) != cfg.num_classes:
        raise DataError(
            f"data.num_classes={cfg.num_classes} but the {cfg.name} data has "
            f"{len(train_classes)} classes; set data.num_classes={len(train_classes)}"
        )


VAL_SPLIT_SEED = 0  # the hold-out does not follow cfg.seed: every run of a sweep validates on the same images


def build_datasets(cfg: DictConfig, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Train and val sets, checked against ``num_classes`` and cut to class-balanced subsets if asked.

    With ``data.val_split=N`` the val set is N class-balanced images held out of the train split (with
    the eval transform), and the data set's own val split is the test set (``build_test_set``).
    """
    selecting = cfg.val_split and cfg.protocol == "selection"
    train_set = build_dataset(cfg, True)
    val_set = train_set if selecting else build_dataset(cfg, False)  # selection never opens the test split
    _check_classes(cfg, train_set, val_set)
    if cfg.val_split:
        train_set, val_set = hold_out(cfg, train_set)
    if cfg.max_train_samples:
        train_set = Subset(train_set, balanced_indices(targets_of(train_set), cfg.max_train_samples, seed))
    if cfg.max_val_samples:
        val_set = Subset(val_set, balanced_indices(targets_of(val_set), cfg.max_val_samples, seed))
    if cfg.skip_corrupt:
        train_set, val_set = SkipCorrupt(train_set), SkipCorrupt(val_set)
    return train_set, val_set


def targets_of(dataset: Dataset) -> list:
    """The targets of a data set or of a subset of one."""
    if isinstance(dataset, Subset):
        targets = targets_of(dataset.dataset)
        return [targets[i] for i in dataset.indices]
    return list(dataset.targets)


def hold_out(cfg: DictConfig, train_set: Dataset) -> tuple[Subset, Subset]:
    """``data.val_split`` class-balanced train images as the val set (eval transform), the rest to train on."""
    if cfg.val_split >= len(train_set):
        raise DataError(f"data.val_split={cfg.val_split} holds out the whole {cfg.name} train split "
                        f"({len(train_set)} images); use a number below {len(train_set)}")
    held = balanced_indices(train_set.targets, cfg.val_split, VAL_SPLIT_SEED)
    kept = sorted(set(range(len(train_set))) - set(held))
    return Subset(train_set, kept), Subset(build_dataset(cfg, True, transformed=True), held)


def build_test_set(cfg: DictConfig) -> Dataset | None:
    """With ``data.val_split``, the data set's own val split (e.g. CIFAR's official test set), evaluated
    once at the end of training and never used to choose; without, None (the val split is then the test,
    which ``data.protocol=final`` evaluates once at the end). ``data.protocol=selection`` never loads it."""
    if not cfg.val_split or cfg.protocol == "selection":
        return None
    test_set = build_dataset(cfg, False)
    return SkipCorrupt(test_set) if cfg.skip_corrupt else test_set


def check_in_memory(cfg: DictConfig) -> str | None:
    """Refuse ``data.in_memory=true`` with a recipe the tensor path cannot run (before anything is built);
    returns why the PIL path is needed, or None when the tensor path may be tried."""
    setting, blocker = in_memory_setting(cfg.in_memory), recipe_blocker(cfg)
    if setting == "true" and blocker:
        raise ConfigError(f"data.in_memory=true but {blocker}; set data.in_memory=auto (or false)")
    return "data.in_memory=false" if setting == "false" else blocker


def build_loaders(
    cfg: DictConfig, train_set: Dataset, val_set: Dataset, rank: int = 0, world_size: int = 1,
    drop_last: bool = False, seed: int = 0, device: torch.device | str = "cpu",
) -> tuple[Iterable, Iterable]:
    """Loaders over the two splits; ``data.batch_size`` is per process.

    With ``data.in_memory`` (auto: when the recipe and the images allow it) both splits are decoded
    once onto ``device`` and batches are made there; otherwise per-image loading in worker
    processes (the PIL path). The train order is set each epoch by ``set_train_epoch``, so an
    epoch's order depends only on (seed, epoch) and a resumed run sees the same batches as an
    uninterrupted one; each sample's augmentation depends only on (seed, epoch, index).
    """
    reason = check_in_memory(cfg)
    setting = in_memory_setting(cfg.in_memory)
    order = EpochOrder(len(train_set), seed, rank, world_size)
    val_order = ShardSampler(len(val_set), rank, world_size)
    if reason is None:
        crop = digits_crop_flip(cfg) if cfg.name == "digits" else cifar_crop_flip(cfg)
        try:
            return resident_loaders(train_set, val_set, cfg, torch.device(device), order, val_order, crop, seed,
                                    drop_last)
        except NotResident as e:
            if setting == "true":
                raise DataError(f"data.in_memory=true but {e}; set data.in_memory=auto (or false)") from None
            reason = str(e)
    device = torch.device(device)
    transform = train_transform(cfg)
    on_device = decode_on_device(cfg, train_set, device, transform)
    if setting == "auto":
        log.info("data: per-image loading in %d worker(s), decoded on the %s (data.in_memory=auto: %s)",
                 loader_workers(cfg.num_workers), device.type if on_device else "workers' CPUs", reason)
    if on_device:
        return _device_decode_loaders(cfg, train_set, val_set, order, val_order, drop_last, seed, device, transform)
    return _pil_loaders(cfg, train_set, val_set, order, val_order, drop_last, seed, transform)


def build_eval_loader(cfg: DictConfig, dataset: Dataset, like: Iterable, rank: int = 0, world_size: int = 1,
                      seed: int = 0, device: torch.device | str = "cpu") -> Iterable:
    """An evaluation loader over ``dataset`` on the same input path as the val loader ``like``
    (tensor-resident, device-decoded or PIL), each image counted once over the ranks."""
    order, device = ShardSampler(len(dataset), rank, world_size), torch.device(device)
    eval_batch = cfg.eval_batch_size or 2 * cfg.batch_size
    if isinstance(like, ResidentLoader):
        try:
            images = load_resident(dataset, device, loader_workers(cfg.num_workers), memory_budget(device))
            return ResidentLoader(images, order, eval_batch, cfg.mean, cfg.std)
        except NotResident as e:  # the train and val splits fit, this one not: it is read once, per image
            log.info("data: the test set per image in worker processes (%s)", e)
    if isinstance(like, DeviceDecodeLoader):
        files = EncodedFiles(file_samples(dataset))
        loader = DataLoader(SkipUnreadable(files) if cfg.skip_corrupt else files, eval_batch, sampler=order,
                            **{**_worker_options(cfg, seed, collate_encoded), "pin_memory": False})
        return DeviceDecodeLoader(loader, device, None, pixel_ops(eval_transform(cfg)), mean=list(cfg.mean),
                                  std=list(cfg.std), seed=seed, skip_corrupt=cfg.skip_corrupt)
    options = _worker_options(cfg, seed, collate_skipping if cfg.skip_corrupt else None)
    return DataLoader(dataset, eval_batch, sampler=order, **options)


def _worker_options(cfg: DictConfig, seed: int, collate) -> dict:
    """The DataLoader options both per-image paths share."""
    workers = loader_workers(cfg.num_workers)
    return {"num_workers": workers, "pin_memory": torch.cuda.is_available(), "persistent_workers": workers > 0,
            "collate_fn": collate, "worker_init_fn": ignore_stop_signals if workers > 0 else None,
            # its own generator: each epoch's worker base seed is not drawn from the global RNG
            "generator": torch.Generator().manual_seed(seed)}


def _device_decode_loaders(cfg: DictConfig, train_set: Dataset, val_set: Dataset, order: EpochOrder,
                           val_order: ShardSampler, drop_last: bool, seed: int, device: torch.device,
                           transform) -> tuple[DeviceDecodeLoader, DeviceDecodeLoader]:
    """``data.decode=gpu``: workers read file bytes, the device decodes and transforms (``data/device_decode.py``)."""
    common = {**_worker_options(cfg, seed, collate_encoded), "pin_memory": False}  # the decoders read host bytes
    wrap = SkipUnreadable if cfg.skip_corrupt else (lambda d: d)
    train_files, val_files = (wrap(EncodedFiles(file_samples(d))) for d in (train_set, val_set))
    train = DataLoader(train_files, cfg.batch_size, sampler=order, drop_last=drop_last, **common)
    val = DataLoader(val_files, cfg.eval_batch_size or 2 * cfg.batch_size, sampler=val_order, **common)
    shared = {"mean": list(cfg.mean), "std": list(cfg.std), "seed": seed, "skip_corrupt": cfg.skip_corrupt}
    return (DeviceDecodeLoader(train, device, transform.crop, [], **shared),
            DeviceDecodeLoader(val, device, None, pixel_ops(eval_transform(cfg)), **shared))


def _pil_loaders(cfg: DictConfig, train_set: Dataset, val_set: Dataset, order: EpochOrder, val_order: ShardSampler,
                 drop_last: bool, seed: int, transform) -> tuple[DataLoader, DataLoader]:
    """The PIL path: per-image loading and ``transform`` (the recipe's) in ``data.num_workers`` loader processes."""
    common = _worker_options(cfg, seed, collate_skipping if cfg.skip_corrupt else None)
    keyed = KeyedSamples(train_set, transform, seed)
    train = DataLoader(keyed, cfg.batch_size, sampler=order, drop_last=drop_last, **common)
    val = DataLoader(val_set, cfg.eval_batch_size or 2 * cfg.batch_size, sampler=val_order, **common)
    return train, val


def set_train_epoch(loader: DataLoader, epoch: int, skip_batches: int = 0) -> None:
    """Set the train loader to ``epoch``'s order (a function of the seed and the epoch alone),
    starting ``skip_batches`` batches in."""
    loader.sampler.set_epoch(epoch, skip_batches * loader.batch_size)


def ignore_stop_signals(worker_id: int) -> None:
    """Data-loader workers leave SIGUSR1 (SLURM's warning before the time limit) and SIGINT (Ctrl-C,
    sent to the whole process group) to the training process, which checkpoints and stops them.

    SIGTERM keeps its default: it is how the loader (and Python's exit) shut workers down.
    """
    for sig in (signal.SIGINT, getattr(signal, "SIGUSR1", signal.SIGINT)):
        signal.signal(sig, signal.SIG_IGN)


__all__ = ["DataError", "build_datasets", "build_eval_loader", "build_loaders", "build_test_set", "check_in_memory", "set_train_epoch", "train_transform"]
