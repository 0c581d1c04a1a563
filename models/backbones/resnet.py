"""ResNets with attention plug points.

Paper: "Deep Residual Learning for Image Recognition", He, Zhang, Ren, Sun, CVPR 2016.
https://arxiv.org/abs/1512.03385

ImageNet ResNet-18..152 use torchvision's module names and initialisation, so with no attention
their state dicts are interchangeable with ``torchvision.models.resnet*``. CIFAR ResNet-20..110
follow the paper's Section 4.2: a 3x3 stem, three stages of 16/32/64 channels and parameter-free
shortcuts (option A: stride-2 subsampling plus zero channel padding).
"""
import math
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.placement import POSITIONS, AttentionPlan, AttentionSpec, ConfigError

AttnFactories = Mapping[str, Callable[..., nn.Module]]


def attention_at(attn: AttnFactories, position: str, channels: int) -> nn.Module:
    """The block for ``position`` built at ``channels``, or an identity when none is placed."""
    factory = attn.get(position)
    return factory(channels) if factory is not None else nn.Identity()


def _spatial_conv(attn: AttnFactories, in_channels: int, out_channels: int, stride: int) -> nn.Module:
    """The unit's 3x3 conv, or the attention block that replaces it."""
    factory = attn.get("replace_spatial")
    if factory is not None:
        return factory(in_channels, out_channels, stride)
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


NORMS = ("batch", "group")


def norm_factory(kind: str, groups: int = 32) -> Callable[[int], nn.Module]:
    """``channels -> norm module``: BatchNorm, or GroupNorm with ``gcd(groups, channels)`` groups.

    GroupNorm normalises each sample on its own, so a batch split over processes trains like the
    whole batch in one (no cross-sample statistics, no SyncBatchNorm needed).
    """
    if kind == "batch":
        return nn.BatchNorm2d
    if kind == "group":
        return lambda channels: nn.GroupNorm(math.gcd(groups, channels), channels)
    raise ConfigError(f"model.norm='{kind}' is not valid; use one of {', '.join(NORMS)}")


def restore_block_inits(model: nn.Module) -> None:
    """After a backbone's init loop: blocks whose paper fixes an init (zero gamma, zero last conv) redo it."""
    for m in model.modules():
        if m is not model and hasattr(m, "init_weights"):
            m.init_weights()


class BasicBlock(nn.Module):
    """Two 3x3 convs with a shortcut; attention at the role positions given in ``attn``."""

    expansion = 1

    def __init__(
        self,
        in_channels: int,
        channels: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        attn: AttnFactories | None = None,
        stride_in_1x1: bool = False,
        norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
    ):
        super().__init__()
        attn = attn or {}
        out_channels = channels * self.expansion
        self.attn_pre = attention_at(attn, "pre", in_channels)
        self.conv1 = _spatial_conv(attn, in_channels, channels, stride)
        self.bn1 = norm_layer(channels)
        self.attn_after_spatial = attention_at(attn, "after_spatial", channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = norm_layer(channels)
        self.attn_standard = attention_at(attn, "standard", out_channels)
        self.downsample = downsample if downsample is not None else nn.Identity()
        self.attn_identity = attention_at(attn, "identity", out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.attn_post = attention_at(attn, "post", out_channels)

    def last_bn(self) -> nn.Module:
        """The norm that closes the residual branch (zero-initialised by zero_init_residual)."""
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C_in, H, W) -> (B, C_out, H/stride, W/stride)."""
        shortcut = self.attn_identity(self.downsample(x))
        out = self.attn_pre(x)
        out = self.relu(self.bn1(self.conv1(out)))
        out = self.attn_after_spatial(out)
        out = self.bn2(self.conv2(out))
        out = self.attn_standard(out)
        return self.attn_post(self.relu(out + shortcut))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4) with a shortcut; attention at the role positions in ``attn``.

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
        attn: AttnFactories | None = None,
        stride_in_1x1: bool = False,
        norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
    ):
        super().__init__()
        attn = attn or {}
        out_channels = channels * self.expansion
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.attn_pre = attention_at(attn, "pre", in_channels)
        self.conv1 = nn.Conv2d(in_channels, channels, 1, stride=stride_1x1, bias=False)
        self.bn1 = norm_layer(channels)
        self.conv2 = _spatial_conv(attn, channels, channels, stride_3x3)
        self.bn2 = norm_layer(channels)
        self.attn_after_spatial = attention_at(attn, "after_spatial", channels)
        self.conv3 = nn.Conv2d(channels, out_channels, 1, bias=False)
        self.bn3 = norm_layer(out_channels)
        self.attn_standard = attention_at(attn, "standard", out_channels)
        self.downsample = downsample if downsample is not None else nn.Identity()
        self.attn_identity = attention_at(attn, "identity", out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.attn_post = attention_at(attn, "post", out_channels)

    def last_bn(self) -> nn.Module:
        """The norm that closes the residual branch (zero-initialised by zero_init_residual)."""
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C_in, H, W) -> (B, 4 * channels, H/stride, W/stride)."""
        shortcut = self.attn_identity(self.downsample(x))
        out = self.attn_pre(x)
        out = self.relu(self.bn1(self.conv1(out)))
        out = self.relu(self.bn2(self.conv2(out)))
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
    if kind == "cifar":
        return nn.Conv2d(in_chans, channels, 3, padding=1, bias=False), nn.Identity()
    raise ConfigError(f"model.stem='{kind}' is not a stem; valid stems: cifar, imagenet")


class ResNet(nn.Module):
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
            raise ConfigError(f"shortcut='{shortcut}' is not valid; use projection or pad")
        norm_layer = norm_factory(norm, norm_groups)
        plan = AttentionPlan(attention, name, depths, positions=POSITIONS, default_position="standard")
        # torchvision's names (conv1, bn1, relu, maxpool) keep state dicts interchangeable.
        self.conv1, self.maxpool = _stem(stem, in_chans, widths[0])
        self.bn1 = norm_layer(widths[0])
        self.relu = nn.ReLU(inplace=True)
        stem_attn = plan.stem()
        self.attn_stem = stem_attn(widths[0]) if stem_attn is not None else nn.Identity()
        self.num_stages = len(depths)
        in_channels = widths[0]
        for s, (depth, width) in enumerate(zip(depths, widths), start=1):
            units = []
            for i in range(depth):
                stride = 2 if (i == 0 and s > 1) else 1
                out_channels = width * block.expansion
                downsample = None
                if stride != 1 or in_channels != out_channels:
                    downsample = self._shortcut(shortcut, in_channels, out_channels, stride, norm_layer)
                units.append(
                    block(in_channels, width, stride, downsample, plan.unit(s, i), stride_in_1x1, norm_layer)
                )
                in_channels = out_channels
            setattr(self, f"layer{s}", nn.Sequential(*units))
        self.num_features = in_channels
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)
        self._init_weights(zero_init_residual)

    @staticmethod
    def _shortcut(kind: str, in_channels: int, out_channels: int, stride: int,
                  norm_layer: Callable[[int], nn.Module]) -> nn.Module:
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

    def stages(self) -> list[nn.Sequential]:
        """The stages in order; stage s (1-based) is ``stages()[s - 1]``."""
        return [getattr(self, f"layer{s}") for s in range(1, self.num_stages + 1)]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) -> last feature map (B, num_features, H/r, W/r)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.attn_stem(x)
        for stage in self.stages():
            x = stage(x)
        return x

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """features: (B, C, h, w) -> pooled (B, C) when ``pre_logits``, else logits (B, num_classes)."""
        pooled = torch.flatten(self.avgpool(features), 1)
        return pooled if pre_logits else self.fc(pooled)

    def feature_map(self, features: torch.Tensor) -> torch.Tensor:
        """``forward_features``' output as a (B, C, h, w) map (already one for CNNs)."""
        return features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) -> logits (B, num_classes)."""
        return self.forward_head(self.forward_features(x))


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
