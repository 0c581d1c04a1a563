"""MobileNeXt with attention plug points.

Paper: "Rethinking Bottleneck Structure for Efficient Mobile Network Design", Zhou, Hou, Chen, Feng,
Yan, ECCV 2020. https://arxiv.org/abs/2007.02269 . Reference code:
https://github.com/zhoudaquan/rethinking_bottleneck_design

Layout as the official code (so parameters and MACs equal it): a stride-2 3x3 stem of 32 channels,
eight sandglass rows (the paper's Table 3), the last row ending at 1280 * max(1, width_mult)
channels, then pool -> dropout 0.2 -> linear. Channels are rounded by make_divisible(8); a unit's
reduced width is in_channels / t, raised to make_divisible(ceil(out / 6), 16) when smaller. The
CIFAR stem keeps the stem and the first row at stride 1, so 32x32 inputs end at 4x4.
"""
import math
from collections.abc import Mapping, Sequence

import torch
from timm.layers import make_divisible
from torch import nn

from models.backbones.base import PooledBackbone, register_backbone
from models.layers import AttentionSlots, check_stem, build_stages, conv_bn_relu6, init_mobile_weights, init_small_normal, stem_slot
from models.placement import POSITIONS, AttentionPlan, AttentionSpec, Factory

# Sandglass rows: expansion t, output channels c, repeats b, first stride s. The last row's width
# is the head width (1280 * max(1, width_mult)), filled in by the network.
ROWS = ((2, 96, 1, 2), (6, 144, 1, 1), (6, 192, 3, 2), (6, 288, 3, 2), (6, 384, 4, 1), (6, 576, 4, 2),
        (6, 960, 3, 1), (6, None, 1, 1))


class SandGlass(nn.Module):
    """Depthwise 3x3 -> 1x1 linear reduction -> 1x1 expansion -> depthwise 3x3 (stride), shortcut at the wide ends.

    As the official code: the first depthwise conv exists when t == 2, when widths match or for
    ``keep_3x3`` (a single-unit stride-1 row); the last exists in those cases or when the unit
    strides. A unit with neither is two 1x1 convs.

    Positions: ``pre``; ``after_spatial`` after the first depthwise conv where the unit has one,
    else after the last one, else after the expansion (the coordinate attention README's advice is
    "after the first depthwise conv"; no MobileNeXt + CA code is public);
    ``replace_spatial`` the last depthwise conv and ``spatial_prenorm`` between it and its BN (units
    without one have nothing there);
    ``standard`` at the end of the branch; ``identity`` on units with a shortcut; ``post`` on the
    unit's output (after the add where there is one).

    Args:
        identity_mult: the identity tensor multiplier: the shortcut adds only the first
            round(in_channels * identity_mult) channels (1.0: a full shortcut).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int,
                 identity_mult: float = 1.0, keep_3x3: bool = False,
                 factories: Mapping[str, Factory] | None = None):
        super().__init__()
        hidden = in_channels // expansion
        if hidden < out_channels / 6:
            hidden = make_divisible(math.ceil(out_channels / 6), 16)
        first_dw = expansion == 2 or in_channels == out_channels or keep_3x3
        last_dw = first_dw or stride == 2
        self.out_channels = out_channels
        self.use_shortcut = stride == 1 and in_channels == out_channels
        self.identity_channels = int(round(in_channels * identity_mult))
        slots = AttentionSlots(factories, shortcut=self.use_shortcut)
        self.attn_pre = slots.at("pre", in_channels)
        self.dw1 = conv_bn_relu6(in_channels, in_channels, 3, groups=in_channels) if first_dw else nn.Identity()
        self.attn_after_spatial = slots.at("after_spatial", in_channels) if first_dw else nn.Identity()
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden))
        self.expand = conv_bn_relu6(hidden, out_channels)
        if last_dw:
            depthwise = slots.spatial(out_channels, out_channels, stride, lambda: nn.Conv2d(
                out_channels, out_channels, 3, stride, 1, groups=out_channels, bias=False))
            self.dw2 = nn.Sequential(depthwise, nn.BatchNorm2d(out_channels))  # linear: no activation
        else:
            self.dw2 = nn.Identity()
        self.attn_spatial_prenorm = slots.at("spatial_prenorm", out_channels) if last_dw else nn.Identity()
        # without a first depthwise conv the after_spatial block moves to the end of the branch
        self.attn_after_last = nn.Identity() if first_dw else slots.at("after_spatial", out_channels)
        self.attn_standard = slots.at("standard", out_channels)
        self.attn_identity = slots.at("identity", out_channels)
        self.attn_post = slots.at("post", out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C_in, H, W) -> (B, C_out, H/stride, W/stride)."""
        out = self.attn_after_spatial(self.dw1(self.attn_pre(x)))
        out = self.expand(self.reduce(out))
        if isinstance(self.dw2, nn.Sequential):  # spatial_prenorm sits between the last depthwise conv and its BN
            conv, norm = self.dw2
            out = norm(self.attn_spatial_prenorm(conv(out)))
        out = self.attn_after_last(out)
        out = self.attn_standard(out)
        if not self.use_shortcut:
            return self.attn_post(out)
        shortcut = self.attn_identity(x)
        k = self.identity_channels
        if k == out.shape[1]:
            out = out + shortcut
        else:  # partial shortcut: only the first k channels get the identity
            out = torch.cat([out[:, :k] + shortcut[:, :k], out[:, k:]], dim=1)
        return self.attn_post(out)


class MobileNeXt(PooledBackbone):
    """Stem conv -> eight sandglass stages -> pool -> dropout -> linear.

    Args:
        num_classes: size of the linear head.
        attention: parsed attention specs; ``position: default`` puts gates ``after_spatial`` in every
            unit; other blocks go to their own default.
        width_mult: channel multiplier (1.4, 1.0, 0.75, 0.5, 0.35 in the paper).
        identity_mult: the identity tensor multiplier of every unit (the paper's Table 6: 1.0 or 0.5).
        stem: ``imagenet`` (stride-2 stem) or ``cifar`` (stride 1, and stride 1 in row 1).
        dropout: before the classifier.
        in_chans: input image channels.
    """

    def __init__(self, num_classes: int = 1000, attention: Sequence[AttentionSpec] = (), width_mult: float = 1.0,
                 identity_mult: float = 1.0, stem: str = "imagenet", dropout: float = 0.2, in_chans: int = 3):
        super().__init__()
        check_stem(stem)
        if not 0 < identity_mult <= 1:
            raise ValueError(f"identity_mult={identity_mult} must be in (0, 1]")
        plan = AttentionPlan(attention, "mobilenext", [b for _, _, b, _ in ROWS], positions=POSITIONS,
                             gate_position="after_spatial")
        self.attach_input(plan.input(), in_chans)
        channels = make_divisible(32 * width_mult, 8)
        self.num_features = make_divisible(1280 * max(1.0, width_mult), 8)
        self.stem = conv_bn_relu6(in_chans, channels, 3, 2 if stem == "imagenet" else 1)
        self.attn_stem = stem_slot(plan.stem(), channels)

        def make_unit(s: int, i: int, in_channels: int) -> nn.Module:
            """Unit i of row s (the last row ends at the head width)."""
            t, c, b, first_stride = ROWS[s - 1]
            out_channels = make_divisible(c * width_mult, 8) if c is not None else self.num_features
            if stem == "cifar" and s == 1:
                first_stride = 1  # 32x32 inputs: keep three halvings, ending at 4x4
            keep_3x3 = b == 1 and first_stride == 1 and i == 0
            return SandGlass(in_channels, out_channels, first_stride if i == 0 else 1, t, identity_mult, keep_3x3,
                             plan.unit(s, i))

        stages, _, _ = build_stages([b for _, _, b, _ in ROWS], channels, make_unit)
        self.stages = nn.ModuleList(stages)
        self.attach_head(plan.head())
        self.build_head(num_classes, dropout)
        init_mobile_weights(self, self.fc)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) -> (B, 32 * width_mult, H/r, W/r)."""
        return self.attn_stem(self.stem(x))

    def init_classifier(self, linear: nn.Linear) -> None:
        """The official classifier init, N(0, 0.01)."""
        init_small_normal(linear)


def mobilenext(num_classes: int = 1000, attention: Sequence[AttentionSpec] = (), width_mult: float = 1.0,
               identity_mult: float = 1.0, stem: str = "imagenet", dropout: float = 0.2,
               in_chans: int = 3) -> MobileNeXt:
    """MobileNeXt at ``width_mult``."""
    return MobileNeXt(num_classes, attention, width_mult, identity_mult, stem, dropout, in_chans)


register_backbone("mobilenext", mobilenext, small={"stem": "cifar", "width_mult": 0.35})
