"""Backbones: the registry from config names to constructors."""
import functools

from models.backbones.agcnn import AGCNN, agcnn
from models.backbones.mobilenetv2 import MobileNetV2, mobilenetv2
from models.backbones.mobilenext import MobileNeXt, mobilenext
from models.backbones.resnet import ResNet, cifar_resnet, imagenet_resnet
from models.backbones.volo import VOLO, VOLO_BUILDERS

# The only place a model name becomes a constructor.
BACKBONES = {
    **{n: functools.partial(imagenet_resnet, n) for n in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")},
    **{n: functools.partial(cifar_resnet, n) for n in ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110")},
    "mobilenetv2": mobilenetv2,
    "mobilenext": mobilenext,
    **VOLO_BUILDERS,
}
# AG-CNN wraps any of the backbones above.
BACKBONES["agcnn"] = functools.partial(agcnn, dict(BACKBONES))

__all__ = ["AGCNN", "BACKBONES", "VOLO", "MobileNeXt", "MobileNetV2", "ResNet"]
