"""MobileNetV2 with attention plug points.

Paper: "MobileNetV2: Inverted Residuals and Linear Bottlenecks", Sandler, Howard, Zhu, Zhmoginov,
Chen, CVPR 2018. https://arxiv.org/abs/1801.04381

torchvision's layout and initialisation (so parameter counts equal ``torchvision.models.mobilenet_v2``
at every width multiplier): channels rounded by make_divisible(8), the last 1x1 conv at
1280 * max(1, width_mult). Stages are the paper's seven bottleneck rows. The CIFAR stem keeps the
first conv and the second row at stride 1, so 32x32 inputs end at 4x4.
"""
from collections.abc import Mapping, Sequence

import torch
from timm.layers import make_divisible
from torch import nn

from models.backbones.base import PooledBackbone, register_backbone
from models.layers import AttentionSlots, check_stem, build_stages, conv_bn_relu6, init_mobile_weights, init_small_normal, stem_slot
from models.placement import POSITIONS, AttentionPlan, AttentionSpec, Factory

# The paper's Table 2 rows: expansion t, output channels c, repeats n, first stride s.
ROWS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class InvertedResidual(nn.Module):
    """1x1 expand (if t > 1) -> 3x3 depthwise -> 1x1 linear projection, with a shortcut when shapes allow.

    Positions: ``pre``, ``after_spatial`` (after the depthwise conv's ReLU6), ``replace_spatial``
    (the depthwise conv), ``spatial_prenorm`` (between the depthwise conv and its BN), ``standard``
    (after the projection's BN), ``identity`` (only on units with a shortcut), ``post`` (the unit's
    output: after the add where there is one; MobileNetV2 has no activation after it).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int,
                 factories: Mapping[str, Factory] | None = None):
        super().__init__()
        hidden = round(in_channels * expansion)
        self.out_channels = out_channels
        self.use_shortcut = stride == 1 and in_channels == out_channels
        slots = AttentionSlots(factories, shortcut=self.use_shortcut)
        self.attn_pre = slots.at("pre", in_channels)
        self.expand = conv_bn_relu6(in_channels, hidden) if expansion != 1 else nn.Identity()
        depthwise = slots.spatial(hidden, hidden, stride,
                                  lambda: nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False))
        self.depthwise = nn.Sequential(depthwise, nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True))
        self.attn_spatial_prenorm = slots.at("spatial_prenorm", hidden)
        self.attn_after_spatial = slots.at("after_spatial", hidden)
        self.project = nn.Sequential(nn.Conv2d(hidden, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))
        self.attn_standard = slots.at("standard", out_channels)
        self.attn_identity = slots.at("identity", out_channels)
        self.attn_post = slots.at("post", out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C_in, H, W) -> (B, C_out, H/stride, W/stride)."""
        out = self.expand(self.attn_pre(x))
        conv, norm, act = self.depthwise  # spatial_prenorm sits between the conv and its norm
        out = self.attn_after_spatial(act(norm(self.attn_spatial_prenorm(conv(out)))))
        out = self.attn_standard(self.project(out))
        if self.use_shortcut:
            out = out + self.attn_identity(x)
        return self.attn_post(out)


class MobileNetV2(PooledBackbone):
    """Stem conv -> seven inverted-residual stages -> 1x1 conv -> pool -> dropout -> linear.

    Args:
        num_classes: size of the linear head.
        attention: parsed attention specs; ``position: default`` puts gates after the depthwise conv of
            every unit with expansion > 1 (the coordinate attention code's placement), SimAM and triplet
            where their own MobileNetV2 code puts them (``official_places``, in every unit); other blocks
            go to their own default.
        width_mult: channel multiplier (1.4, 1.0, 0.75, 0.5, 0.35 in the paper).
        stem: ``imagenet`` (stride-2 first conv) or ``cifar`` (stride 1, and stride 1 in row 2).
        dropout: before the classifier (0.2 as torchvision).
        in_chans: input image channels.
    """

    def __init__(self, num_classes: int = 1000, attention: Sequence[AttentionSpec] = (), width_mult: float = 1.0,
                 stem: str = "imagenet", dropout: float = 0.2, in_chans: int = 3):
        super().__init__()
        check_stem(stem)
        plan = AttentionPlan(attention, "mobilenetv2", [n for _, _, n, _ in ROWS], positions=POSITIONS,
                             gate_position="after_spatial")
        self.attach_input(plan.input(), in_chans)
        channels = make_divisible(32 * width_mult, 8)
        self.stem = conv_bn_relu6(in_chans, channels, 3, 2 if stem == "imagenet" else 1)
        self.attn_stem = stem_slot(plan.stem(), channels)

        def make_unit(s: int, i: int, in_channels: int) -> nn.Module:
            """Unit i of row s; the CA code puts no gate in the t = 1 unit, which has no expansion to recalibrate."""
            t, c, _, first_stride = ROWS[s - 1]
            if stem == "cifar" and s == 2:
                first_stride = 1  # 32x32 inputs: keep four halvings, ending at 4x4
            return InvertedResidual(in_channels, make_divisible(c * width_mult, 8), first_stride if i == 0 else 1,
                                    t, plan.unit(s, i, gates_by_default=t > 1))

        stages, _, channels = build_stages([n for _, _, n, _ in ROWS], channels, make_unit)
        self.stages = nn.ModuleList(stages)
        self.num_features = make_divisible(1280 * max(1.0, width_mult), 8)
        self.head = conv_bn_relu6(channels, self.num_features)
        self.attach_head(plan.head())
        self.build_head(num_classes, dropout)
        init_mobile_weights(self, self.fc)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) -> (B, 32 * width_mult, H/r, W/r)."""
        return self.attn_stem(self.stem(x))

    def forward_neck(self, x: torch.Tensor) -> torch.Tensor:
        """The last row's output -> the 1x1 conv to ``num_features`` channels."""
        return self.head(x)

    def init_classifier(self, linear: nn.Linear) -> None:
        """torchvision's classifier init, N(0, 0.01)."""
        init_small_normal(linear)


def mobilenetv2(num_classes: int = 1000, attention: Sequence[AttentionSpec] = (), width_mult: float = 1.0,
                stem: str = "imagenet", dropout: float = 0.2, in_chans: int = 3) -> MobileNetV2:
    """MobileNetV2 at ``width_mult``."""
    return MobileNetV2(num_classes, attention, width_mult, stem, dropout, in_chans)


register_backbone("mobilenetv2", mobilenetv2, small={"stem": "cifar", "width_mult": 0.35})
