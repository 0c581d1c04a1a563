"""Train and eval transforms: the CIFAR recipe, the ImageNet recipe (timm), and digits."""
from torchvision import transforms as T
from timm.data import create_transform
from timm.data.auto_augment import rand_augment_transform
from timm.data.random_erasing import RandomErasing

from engine.config import DataConfig


def cifar_transform(cfg: DataConfig, train: bool) -> T.Compose:
    """Pad-4 random crop and flip for training (He et al. 2016), plus optional timm augmentation."""
    post = [T.ToTensor(), T.Normalize(cfg.mean, cfg.std)]
    if not train:
        return T.Compose(post)
    ops = [T.RandomCrop(cfg.image_size, padding=4), T.RandomHorizontalFlip()]
    if cfg.randaugment:
        hparams = {
            "translate_const": int(cfg.image_size * 0.45),
            "img_mean": tuple(round(255 * m) for m in cfg.mean),
        }
        ops.append(rand_augment_transform(cfg.randaugment, hparams))
    ops += post
    if cfg.reprob > 0:
        ops.append(RandomErasing(cfg.reprob, mode="pixel", device="cpu"))
    return T.Compose(ops)


def imagenet_transform(cfg: DataConfig, train: bool):
    """RandomResizedCrop + flip for training; resize to size/crop_pct + center crop for eval (timm)."""
    return create_transform(
        input_size=cfg.image_size,
        is_training=train,
        auto_augment=cfg.randaugment if train else None,
        re_prob=cfg.reprob if train else 0.0,
        interpolation=cfg.interpolation,
        mean=tuple(cfg.mean),
        std=tuple(cfg.std),
        crop_pct=cfg.crop_pct,
    )


def digits_transform(cfg: DataConfig, train: bool) -> T.Compose:
    """Digits are tensors already: a small random shift (no flip: digits are not symmetric)."""
    ops = [T.RandomCrop(cfg.image_size, padding=2)] if train else []
    return T.Compose([*ops, T.Normalize(cfg.mean, cfg.std)])
