"""MobileNetV2 with attention plug points.

Paper: "MobileNetV2: Inverted Residuals and Linear Bottlenecks", Sandler, Howard, Zhu, Zhmoginov,
Chen, CVPR 2018. https://arxiv.org/abs/1801.04381

torchvision's layout and initialisation (so parameter counts equal ``torchvision.models.mobilenet_v2``
at every width multiplier): channels rounded by make_divisible(8), the last 1x1 conv at
1280 * max(1, width_mult). Stages are the paper's seven bottleneck rows. The CIFAR stem keeps the
first conv and the second row at stride 1, so 32x32 inputs end at 4x4.
"""
from collections.abc import Sequence

import torch
from timm.layers import make_divisible
from torch import nn

from models.backbones.resnet import AttnFactories, attention_at, restore_block_inits
from models.placement import POSITIONS, AttentionPlan, AttentionSpec, ConfigError

# The paper's Table 2 rows: expansion t, output channels c, repeats n, first stride s.
ROWS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def conv_bn_relu6(in_channels: int, out_channels: int, kernel: int = 1, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """Conv (no bias) + BN + ReLU6."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels), nn.ReLU6(inplace=True),
    )


def init_mobile_weights(model: nn.Module, classifier: nn.Linear) -> None:
    """torchvision's MobileNetV2 init (also the MobileNeXt code's), then blocks' own paper inits.

    Kaiming-normal (fan_out) convs, unit norms, N(0, 0.01) classifier; attention blocks' linear
    layers keep PyTorch's default init unless the block defines ``init_weights``.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    nn.init.normal_(classifier.weight, 0, 0.01)
    nn.init.zeros_(classifier.bias)
    restore_block_inits(model)


class PooledClassifier(nn.Module):
    """The head of the mobile networks: pool -> dropout -> ``fc`` on ``forward_features``' map."""

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """features: (B, C, h, w) -> pooled (B, C) when ``pre_logits``, else logits (B, num_classes)."""
        pooled = torch.flatten(self.pool(features), 1)
        return pooled if pre_logits else self.fc(self.dropout(pooled))

    def feature_map(self, features: torch.Tensor) -> torch.Tensor:
        """``forward_features``' output as a (B, C, h, w) map (already one for CNNs)."""
        return features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) -> logits (B, num_classes)."""
        return self.forward_head(self.forward_features(x))


class InvertedResidual(nn.Module):
    """1x1 expand (if t > 1) -> 3x3 depthwise -> 1x1 linear projection, with a shortcut when shapes allow.

    Positions: ``pre``, ``after_spatial`` (after the depthwise conv's ReLU6), ``replace_spatial``
    (the depthwise conv), ``standard`` (after the projection's BN), ``identity`` (only on units with a
    shortcut), ``post`` (the unit's output: after the add where there is one; MobileNetV2 has no
    activation after it).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int,
                 attn: AttnFactories | None = None):
        super().__init__()
        attn = attn or {}
        hidden = round(in_channels * expansion)
        self.use_shortcut = stride == 1 and in_channels == out_channels
        self.attn_pre = attention_at(attn, "pre", in_channels)
        self.expand = conv_bn_relu6(in_channels, hidden) if expansion != 1 else nn.Identity()
        replace = attn.get("replace_spatial")
        if replace is not None:
            self.depthwise = nn.Sequential(replace(hidden, hidden, stride), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True))
        else:
            self.depthwise = conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden)
        self.attn_after_spatial = attention_at(attn, "after_spatial", hidden)
        self.project = nn.Sequential(nn.Conv2d(hidden, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))
        self.attn_standard = attention_at(attn, "standard", out_channels)
        shortcut_attn = attn if self.use_shortcut else {}
        self.attn_identity = attention_at(shortcut_attn, "identity", out_channels)
        self.attn_post = attention_at(attn, "post", out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C_in, H, W) -> (B, C_out, H/stride, W/stride)."""
        out = self.attn_pre(x)
        out = self.attn_after_spatial(self.depthwise(self.expand(out)))
        out = self.attn_standard(self.project(out))
        if self.use_shortcut:
            out = out + self.attn_identity(x)
        return self.attn_post(out)


class MobileNetV2(PooledClassifier):
    """Stem conv -> seven inverted-residual stages -> 1x1 conv -> pool -> dropout -> linear.

    Args:
        num_classes: size of the linear head.
        attention: parsed attention specs; ``position: default`` means after the depthwise conv of
            every unit with expansion > 1 (the coordinate-attention paper's placement).
        width_mult: channel multiplier (1.4, 1.0, 0.75, 0.5, 0.35 in the paper).
        stem: ``imagenet`` (stride-2 first conv) or ``cifar`` (stride 1, and stride 1 in row 2).
        dropout: before the classifier (0.2 as torchvision).
        in_chans: input image channels.
    """

    def __init__(self, num_classes: int = 1000, attention: Sequence[AttentionSpec] = (), width_mult: float = 1.0,
                 stem: str = "imagenet", dropout: float = 0.2, in_chans: int = 3):
        super().__init__()
        if stem not in ("imagenet", "cifar"):
            raise ConfigError(f"model.stem='{stem}' is not a stem; valid stems: cifar, imagenet")
        plan = AttentionPlan(attention, "mobilenetv2", [n for _, _, n, _ in ROWS], positions=POSITIONS,
                             default_position="after_spatial")
        channels = make_divisible(32 * width_mult, 8)
        self.stem = conv_bn_relu6(in_chans, channels, 3, 2 if stem == "imagenet" else 1)
        stem_attn = plan.stem()
        self.attn_stem = stem_attn(channels) if stem_attn is not None else nn.Identity()
        stages = []
        for s, (t, c, n, first_stride) in enumerate(ROWS, start=1):
            out_channels = make_divisible(c * width_mult, 8)
            if stem == "cifar" and s == 2:
                first_stride = 1  # 32x32 inputs: keep four halvings, ending at 4x4
            units = []
            for i in range(n):
                # the paper's placement skips the t = 1 unit, which has no expansion to recalibrate
                attn = plan.unit(s, i, use_defaults=t > 1)
                units.append(InvertedResidual(channels, out_channels, first_stride if i == 0 else 1, t, attn))
                channels = out_channels
            stages.append(nn.Sequential(*units))
        self.stages = nn.ModuleList(stages)
        self.num_features = make_divisible(1280 * max(1.0, width_mult), 8)
        self.head = conv_bn_relu6(channels, self.num_features)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(self.num_features, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        """torchvision's MobileNetV2 init; blocks with a paper-specific init apply their own after."""
        init_mobile_weights(self, self.fc)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) -> (B, num_features, H/r, W/r)."""
        x = self.attn_stem(self.stem(x))
        for stage in self.stages:
            x = stage(x)
        return self.head(x)


def mobilenetv2(num_classes: int = 1000, attention: Sequence[AttentionSpec] = (), width_mult: float = 1.0,
                stem: str = "imagenet", dropout: float = 0.2, in_chans: int = 3) -> MobileNetV2:
    """MobileNetV2 at ``width_mult``."""
    return MobileNetV2(num_classes, attention, width_mult, stem, dropout, in_chans)
