"""Backbones: the registry from config names to constructors."""
import functools

from models.backbones.mobilenetv2 import MobileNetV2, mobilenetv2
from models.backbones.resnet import ResNet, cifar_resnet, imagenet_resnet

# The only place a model name becomes a constructor.
BACKBONES = {
    **{n: functools.partial(imagenet_resnet, n) for n in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")},
    **{n: functools.partial(cifar_resnet, n) for n in ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110")},
    "mobilenetv2": mobilenetv2,
}

__all__ = ["BACKBONES", "MobileNetV2", "ResNet"]
