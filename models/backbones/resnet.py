"""ResNets with attention plug points.

Paper: "Deep Residual Learning for Image Recognition", He, Zhang, Ren, Sun, CVPR 2016.
https://arxiv.org/abs/1512.03385

ImageNet ResNet-18..152 use torchvision's module names and initialisation, so with no attention
their state dicts are interchangeable with ``torchvision.models.resnet*``. CIFAR ResNet-20..110
follow the paper's Section 4.2: a 3x3 stem, three stages of 16/32/64 channels and parameter-free
shortcuts (option A: stride-2 subsampling plus zero channel padding).
"""
import math
import functools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from choices import NORMS
from models.backbones.base import PooledBackbone, register_backbone
from models.layers import AttentionSlots, check_stem, build_stages, restore_block_inits, stem_slot
from models.placement import POSITIONS, AttentionPlan, AttentionSpec

Norm = Callable[[int], nn.Module]


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """The units' 3x3 conv (no bias: a norm follows)."""
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def norm_factory(kind: str, groups: int = 32) -> Norm:
    """``channels -> norm module``: BatchNorm, or GroupNorm with ``gcd(groups, channels)`` groups.

    GroupNorm normalises each sample on its own, so a batch split over processes trains like the
    whole batch in one (no cross-sample statistics, no SyncBatchNorm needed).
    """
    if kind == "batch":
        return nn.BatchNorm2d
    if kind == "group":
        return lambda channels: nn.GroupNorm(math.gcd(groups, channels), channels)
    raise ValueError(f"norm='{kind}' is not valid; use one of {', '.join(NORMS)}")


class BasicBlock(nn.Module):
    """Two 3x3 convs with a shortcut; attention blocks at the positions ``slots`` holds."""

    expansion = 1

    def __init__(
        self,
        in_channels: int,
        channels: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        slots: AttentionSlots | None = None,
        stride_in_1x1: bool = False,
        norm_layer: Norm = nn.BatchNorm2d,
    ):
        super().__init__()
        slots = slots or AttentionSlots()
        self.out_channels = out_channels = channels * self.expansion
        self.attn_pre = slots.at("pre", in_channels)
        self.conv1 = slots.spatial(in_channels, channels, stride, lambda: conv3x3(in_channels, channels, stride))
        self.bn1 = norm_layer(channels)
        self.attn_after_spatial = slots.at("after_spatial", channels)
        self.conv2 = conv3x3(channels, channels)
        self.attn_spatial_prenorm = slots.at("spatial_prenorm", channels)
        self.bn2 = norm_layer(channels)
        self.attn_standard = slots.at("standard", out_channels)
        self.downsample = downsample if downsample is not None else nn.Identity()
        self.attn_identity = slots.at("identity", out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.attn_post = slots.at("post", out_channels)

    def last_bn(self) -> nn.Module:
        """The norm that closes the residual branch (zero-initialised by zero_init_residual)."""
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C_in, H, W) -> (B, C_out, H/stride, W/stride)."""
        shortcut = self.attn_identity(self.downsample(x))
        out = self.attn_pre(x)
        out = self.relu(self.bn1(self.conv1(out)))
        out = self.attn_after_spatial(out)
        out = self.bn2(self.attn_spatial_prenorm(self.conv2(out)))
        out = self.attn_standard(out)
        return self.attn_post(self.relu(out + shortcut))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4) with a shortcut; attention blocks at the positions ``slots`` holds.

    ``stride_in_1x1`` puts the stride in the first 1x1 conv as the original (Caffe) ResNet and the
    SE paper's 3.86 GFLOPs ResNet-50 do; torchvision (ResNet v1.5) puts it in the 3x3.
    """

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        channels: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        slots: AttentionSlots | None = None,
        stride_in_1x1: bool = False,
        norm_layer: Norm = nn.BatchNorm2d,
    ):
        super().__init__()
        slots = slots or AttentionSlots()
        self.out_channels = out_channels = channels * self.expansion
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.attn_pre = slots.at("pre", in_channels)
        self.conv1 = nn.Conv2d(in_channels, channels, 1, stride=stride_1x1, bias=False)
        self.bn1 = norm_layer(channels)
        self.conv2 = slots.spatial(channels, channels, stride_3x3, lambda: conv3x3(channels, channels, stride_3x3))
        self.attn_spatial_prenorm = slots.at("spatial_prenorm", channels)
        self.bn2 = norm_layer(channels)
        self.attn_after_spatial = slots.at("after_spatial", channels)
        self.conv3 = nn.Conv2d(channels, out_channels, 1, bias=False)
        self.bn3 = norm_layer(out_channels)
        self.attn_standard = slots.at("standard", out_channels)
        self.downsample = downsample if downsample is not None else nn.Identity()
        self.attn_identity = slots.at("identity", out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.attn_post = slots.at("post", out_channels)

    def last_bn(self) -> nn.Module:
        """The norm that closes the residual branch (zero-initialised by zero_init_residual)."""
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C_in, H, W) -> (B, 4 * channels, H/stride, W/stride)."""
        shortcut = self.attn_identity(self.downsample(x))
        out = self.attn_pre(x)
        out = self.relu(self.bn1(self.conv1(out)))
        out = self.relu(self.bn2(self.attn_spatial_prenorm(self.conv2(out))))
        out = self.attn_after_spatial(out)
        out = self.bn3(self.conv3(out))
        out = self.attn_standard(out)
        return self.attn_post(self.relu(out + shortcut))


class PadShortcut(nn.Module):
    """Option A shortcut: subsample by ``stride`` and zero-pad the new channels (no parameters)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.stride = stride
        self.pad = out_channels - in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C_in, H, W) -> (B, C_out, H/stride, W/stride)."""
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.pad))


def _stem(kind: str, in_chans: int, channels: int) -> tuple[nn.Conv2d, nn.Module]:
    """ImageNet stem (7x7/2 conv, then 3x3/2 max-pool) or CIFAR stem (3x3/1 conv, no pool)."""
    if kind == "imagenet":
        conv = nn.Conv2d(in_chans, channels, 7, stride=2, padding=3, bias=False)
        return conv, nn.MaxPool2d(3, stride=2, padding=1)
    check_stem(kind)
    return nn.Conv2d(in_chans, channels, 3, padding=1, bias=False), nn.Identity()


class ResNet(PooledBackbone):
    """Stem -> stages of residual units -> global pool -> linear head.

    Args:
        block: ``BasicBlock`` or ``Bottleneck``.
        depths: units per stage; stage s (1-based) is ``layer{s}``.
        widths: base width of each stage (output is ``width * block.expansion``).
        num_classes: size of the linear head.
        attention: parsed attention specs, resolved here into a placement plan.
        stem: ``imagenet`` or ``cifar``.
        shortcut: ``projection`` (1x1 conv + BN, option B) or ``pad`` (option A) where shapes change.
        stride_in_1x1: see ``Bottleneck``.
        zero_init_residual: zero the last norm of every residual branch (Goyal et al. 2017).
        in_chans: input image channels.
        name: the variant's name, for error messages.
        norm: ``batch`` (the paper) or ``group`` (GroupNorm, Wu & He 2018: batch-independent).
        norm_groups: GroupNorm's group count (fewer where it does not divide the channels).
    """

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        depths: Sequence[int],
        widths: Sequence[int] = (64, 128, 256, 512),
        num_classes: int = 1000,
        attention: Sequence[AttentionSpec] = (),
        stem: str = "imagenet",
        shortcut: str = "projection",
        stride_in_1x1: bool = False,
        zero_init_residual: bool = False,
        in_chans: int = 3,
        name: str = "resnet",
        norm: str = "batch",
        norm_groups: int = 32,
    ):
        super().__init__()
        if shortcut not in ("projection", "pad"):
            raise ValueError(f"shortcut='{shortcut}' is not valid; use projection or pad")
        norm_layer = norm_factory(norm, norm_groups)
        plan = AttentionPlan(attention, name, depths, positions=POSITIONS)
        self.attach_input(plan.input(), in_chans)
        # torchvision's names (conv1, bn1, relu, maxpool) keep state dicts interchangeable.
        self.conv1, self.maxpool = _stem(stem, in_chans, widths[0])
        self.bn1 = norm_layer(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.attn_stem = stem_slot(plan.stem(), widths[0])
        self.num_stages = len(depths)

        def make_unit(s: int, i: int, in_channels: int) -> nn.Module:
            """Unit i of stage s; the first unit of stages after the first halves the map."""
            stride = 2 if (i == 0 and s > 1) else 1
            out_channels = widths[s - 1] * block.expansion
            downsample = None
            if stride != 1 or in_channels != out_channels:
                downsample = self._shortcut(shortcut, in_channels, out_channels, stride, norm_layer)
            return block(in_channels, widths[s - 1], stride, downsample, AttentionSlots(plan.unit(s, i)),
                         stride_in_1x1, norm_layer)

        stages, _, self.num_features = build_stages(depths, widths[0], make_unit)
        for s, stage in enumerate(stages, start=1):  # torchvision's names: layer1 ... layer4
            setattr(self, f"layer{s}", stage)
        # the same stages as a list, built once and kept out of the module tree (no second state-dict name)
        object.__setattr__(self, "_stage_list", nn.ModuleList(stages))
        self.attach_head(plan.head())
        self.build_head(num_classes)
        self._init_weights(zero_init_residual)

    @staticmethod
    def _shortcut(kind: str, in_channels: int, out_channels: int, stride: int,
                  norm_layer: Norm) -> nn.Module:
        """A shortcut that maps the unit's input to its output shape."""
        if kind == "pad":
            return PadShortcut(in_channels, out_channels, stride)
        return nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
            norm_layer(out_channels),
        )

    def _init_weights(self, zero_init_residual: bool) -> None:
        """torchvision's ResNet init; then blocks with a paper-specific init apply their own."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.last_bn().weight)
        restore_block_inits(self)

    @property
    def stages(self) -> nn.ModuleList:
        """The stages in order (``layer1`` ...); stage s (1-based) is ``stages[s - 1]``."""
        return self._stage_list

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) -> (B, widths[0], H/r, W/r)."""
        return self.attn_stem(self.maxpool(self.relu(self.bn1(self.conv1(x)))))


_IMAGENET = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
    "resnet152": (Bottleneck, (3, 8, 36, 3)),
}
# CIFAR ResNet-(6n+2): n basic units per stage.
_CIFAR = {"resnet20": 3, "resnet32": 5, "resnet44": 7, "resnet56": 9, "resnet110": 18}


def imagenet_resnet(
    name: str,
    num_classes: int = 1000,
    attention: Sequence[AttentionSpec] = (),
    stem: str = "imagenet",
    stride_in_1x1: bool = False,
    zero_init_residual: bool = False,
    in_chans: int = 3,
    norm: str = "batch",
    norm_groups: int = 32,
) -> ResNet:
    """ResNet-18/34/50/101/152 in torchvision's layout (projection shortcuts)."""
    block, depths = _IMAGENET[name]
    return ResNet(
        block, depths, num_classes=num_classes, attention=attention, stem=stem,
        stride_in_1x1=stride_in_1x1, zero_init_residual=zero_init_residual, in_chans=in_chans, name=name,
        norm=norm, norm_groups=norm_groups,
    )


def cifar_resnet(
    name: str,
    num_classes: int = 10,
    attention: Sequence[AttentionSpec] = (),
    stem: str = "cifar",
    zero_init_residual: bool = False,
    in_chans: int = 3,
    norm: str = "batch",
    norm_groups: int = 32,
) -> ResNet:
    """CIFAR ResNet-20/32/44/56/110: 16/32/64 channels, option A shortcuts."""
    n = _CIFAR[name]
    return ResNet(
        BasicBlock, (n, n, n), widths=(16, 32, 64), num_classes=num_classes, attention=attention,
        stem=stem, shortcut="pad", zero_init_residual=zero_init_residual, in_chans=in_chans, name=name,
        norm=norm, norm_groups=norm_groups,
    )


for _name in _IMAGENET:  # the every-block tests run ResNet-50's bottleneck units at 32x32
    register_backbone(_name, functools.partial(imagenet_resnet, _name),
                      small={"stem": "cifar"} if _name == "resnet50" else None)
for _name in _CIFAR:
    register_backbone(_name, functools.partial(cifar_resnet, _name), small={} if _name == "resnet20" else None)
