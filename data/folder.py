"""Data sets stored as image folders (``DIR/train/<class>/*``, ``DIR/val/<class>/*``) or as torchvision archives."""
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from torchvision import datasets

from errors import DataError


def load_rgb(path: str) -> Image.Image:
    """Open an image as 8-bit RGB; a damaged file raises a DataError that names it.

    Greyscale, CMYK and palette images convert as PIL does (a palette's transparency through RGBA);
    16-bit greyscale is scaled to 8 bits, where PIL's own conversion would clip it at 255.
    """
    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            image.load()
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot read image {path} ({e}); remove or replace the file") from None
    if image.mode in ("I", "I;16", "I;16B", "I;16L"):
        image = Image.fromarray((np.asarray(image, dtype=np.float64) / 257).clip(0, 255).round().astype(np.uint8))
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def has_folder_layout(root: Path) -> bool:
    """True when ``root`` holds ``train/`` and ``val/`` directories."""
    return (root / "train").is_dir() and (root / "val").is_dir()


def image_folder(root: Path, split: str, transform: Callable | None) -> datasets.ImageFolder:
    """``root/split`` as an ImageFolder whose loader names damaged files."""
    path = root / split
    if not path.is_dir():
        raise DataError(
            f"{path} does not exist; data.root must hold train/<class>/* and val/<class>/* "
            "(the ImageNet layout)"
        )
    try:
        return datasets.ImageFolder(str(path), transform=transform, loader=load_rgb)
    except (FileNotFoundError, RuntimeError) as e:
        raise DataError(f"{path} holds no images in class folders ({e})") from None


def torchvision_cifar(name: str, root: Path, train: bool, download: bool, transform: Callable | None):
    """CIFAR-10/100 in torchvision's archive format, downloaded when absent and allowed."""
    cls = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[name]
    try:
        return cls(str(root), train=train, download=download, transform=transform)
    except Exception as e:  # noqa: BLE001 - network and archive errors come in many types
        raise DataError(
            f"no {name} data at {root}: neither the ImageFolder layout ({root}/train, {root}/val) "
            f"nor torchvision's archive was found{' and the download failed' if download else ''} "
            f"({type(e).__name__}: {e}). Set data.root to a copy "
            "(e.g. data.root=../shared/data/cifar10), or data.download=true with network access."
        ) from None
