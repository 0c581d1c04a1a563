"""Residual attention: the Attention Module, a trunk and a bottom-up top-down soft mask, (1 + M) * T.

Paper: "Residual Attention Network for Image Classification", Wang, Jiang, Qian, Yang, Li, Zhang,
Wang, Tang, CVPR 2017. https://arxiv.org/abs/1704.06904 . Reference code:
https://github.com/fwang91/residual-attention-network (Caffe prototxts Attention-56 / Attention-92)

As the official module with p = 1, t = 2, r = 1: one pre-activation bottleneck unit, whose output
feeds both branches; the trunk T is two more units; the soft mask branch starts from the same first
unit's output and goes down ``levels`` times by 3x3 / 2 max-pooling (Caffe's ceil rounding), one
unit after each pool and two at the bottom, with a skip unit from every level but the last, then back
up by bilinear interpolation (Caffe's Interp: corners aligned), adding each skip and running one unit
after the sum; BN-ReLU-1x1 conv, BN-ReLU-1x1 conv and a sigmoid close it. The output (1 + M) * T
goes through one last unit. No conv has a bias (``bias_term: false`` throughout the prototxts). The
paper's stages pool 3, 2 and 1 times on their 56, 28 and 14 maps, down to the last stage's 7x7; as a
plug-in block ``levels: null`` follows that rule, pooling (number of stages - stage) times, at least
once (3, 2, 1 on ImageNet ResNets' stages 1-3), and a map too small to pool (1 pixel) stays at its size.
"""
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.attention.base import AttentionBlock, Maps, require_positive

Factory = Callable[..., nn.Module]


class PreActUnit(nn.Module):
    """Pre-activation bottleneck unit: BN-ReLU-1x1, BN-ReLU-3x3 (stride), BN-ReLU-1x1, plus the shortcut.

    The bottleneck is ``out_channels // 4`` wide; where the shape changes the shortcut is a 1x1
    conv (with the stride) of the activated input, as the prototxts' ``branch2``. ``factories``
    (the Residual Attention Network's trunk units) place attention blocks as on the ResNets: ``pre``,
    ``replace_spatial`` / ``spatial_prenorm`` / ``after_spatial`` at the 3x3 conv, ``standard`` at the
    branch's end, ``identity`` on the shortcut, ``post`` after the add.
    """

    def __init__(self, in_channels: int, out_channels: int | None = None, stride: int = 1,
                 factories: Mapping[str, Factory] | None = None):
        super().__init__()
        # imported here: models.layers loads the models.attention package, whose __init__ imports this file
        from models.layers import AttentionSlots

        slots = AttentionSlots(factories)
        out_channels = out_channels or in_channels
        inner = max(1, out_channels // 4)
        self.out_channels = out_channels
        self.attn_pre = slots.at("pre", in_channels)
        self.preact = nn.Sequential(nn.BatchNorm2d(in_channels), nn.ReLU(inplace=True))
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, inner, 1, bias=False),
                                   nn.BatchNorm2d(inner), nn.ReLU(inplace=True))
        self.conv2 = slots.spatial(inner, inner, stride, lambda: nn.Conv2d(inner, inner, 3, stride, 1, bias=False))
        self.attn_spatial_prenorm = slots.at("spatial_prenorm", inner)
        self.conv3 = nn.Sequential(nn.BatchNorm2d(inner), nn.ReLU(inplace=True),
                                   nn.Conv2d(inner, out_channels, 1, bias=False))
        self.attn_after_spatial = slots.at("after_spatial", inner)
        self.attn_standard = slots.at("standard", out_channels)
        self.projection = (nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)
                           if stride != 1 or in_channels != out_channels else None)
        self.attn_identity = slots.at("identity", out_channels)
        self.attn_post = slots.at("post", out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C_in, H, W) -> (B, C_out, H/stride, W/stride)."""
        activated = self.preact(x)
        shortcut = x if self.projection is None else self.projection(activated)  # ungated, as on the ResNets
        out = self.attn_spatial_prenorm(self.conv2(self.conv1(self.attn_pre(activated))))
        norm, act, conv = self.conv3  # after_spatial sits after the 3x3's BN-ReLU
        out = self.attn_standard(conv(self.attn_after_spatial(act(norm(out)))))
        return self.attn_post(self.attn_identity(shortcut) + out)


def _pool(x: torch.Tensor) -> torch.Tensor:
    """3x3 / 2 max-pool, rounding up as Caffe does (56 -> 28 -> 14 -> 7); a 1-pixel map stays."""
    return F.max_pool2d(x, 3, 2, ceil_mode=True) if min(x.shape[2:]) > 1 else x


def _upsample(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Bilinear resize of ``x`` to ``like``'s size, corners aligned (Caffe's Interp)."""
    return F.interpolate(x, size=like.shape[2:], mode="bilinear", align_corners=True)


class SoftMaskBranch(nn.Module):
    """Down ``levels`` times (pool, unit; two units at the bottom), up with skips, then the 1x1 closing layers."""

    def __init__(self, channels: int, levels: int):
        super().__init__()
        self.down = nn.ModuleList(
            nn.Sequential(*(PreActUnit(channels) for _ in range(2 if level == levels - 1 else 1)))
            for level in range(levels))
        self.skips = nn.ModuleList(PreActUnit(channels) for _ in range(levels - 1))
        self.up = nn.ModuleList(PreActUnit(channels) for _ in range(levels - 1))
        self.close = nn.Sequential(
            nn.BatchNorm2d(channels), nn.ReLU(inplace=True), nn.Conv2d(channels, channels, 1, bias=False),
            nn.BatchNorm2d(channels), nn.ReLU(inplace=True), nn.Conv2d(channels, channels, 1, bias=False),
        )

    def forward(self, x: torch.Tensor, trunk: torch.Tensor) -> torch.Tensor:
        """x: the first unit's output (B, C, H, W) -> the soft mask (B, C, H', W') at ``trunk``'s size, in (0, 1)."""
        downs, y = [], x
        for down in self.down:
            y = down(_pool(y))
            downs.append(y)
        for level in reversed(range(len(self.skips))):  # from the level above the bottom up to the first
            y = self.up[level](_upsample(y, downs[level]) + self.skips[level](downs[level]))
        return torch.sigmoid(self.close(_upsample(y, trunk)))


class ResidualAttention(AttentionBlock):
    """The Attention Module: unit -> (trunk of two units, soft mask) -> (1 + M) * T -> unit.

    Args:
        channels: input and output channel count C.
        levels: max-pool levels of the soft mask branch (3, 2, 1 in the paper's stages 1, 2, 3); None:
            by the stage (``stage_defaults``), once at a stageless position.
    """

    default_position = "post"

    def __init__(self, channels: int, levels: int | None = None):
        super().__init__()
        levels = 1 if levels is None else levels
        require_positive(levels=levels)
        self.build(channels, levels, (None,) * 4)

    def build(self, channels: int, levels: int, unit_factories: Sequence[Mapping[str, Factory] | None]) -> None:
        """The module's units and mask branch; ``unit_factories`` place attention blocks in the four units."""
        self.first = PreActUnit(channels, factories=unit_factories[0])
        self.trunk = nn.Sequential(PreActUnit(channels, factories=unit_factories[1]),
                                   PreActUnit(channels, factories=unit_factories[2]))
        self.mask_branch = SoftMaskBranch(channels, levels)
        self.last = PreActUnit(channels, factories=unit_factories[3])

    @staticmethod
    def stage_defaults(stage: int, num_stages: int) -> dict[str, int]:
        """The paper's pool count for a block in ``stage``: down to the last stage's map size, at least once."""
        return {"levels": max(1, num_stages - stage)}

    def units(self) -> list[nn.Module]:
        """The four pre-activation units of the trunk path, in order."""
        return [self.first, *self.trunk, self.last]

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> the soft mask (B, C, H, W) this block applies to its trunk."""
        first = self.first(x)
        return self.mask_branch(first, self.trunk(first))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)."""
        first = self.first(x)
        trunk = self.trunk(first)
        return self.last((1 + self.mask_branch(first, trunk)) * trunk)

    def attention_maps(self, x: torch.Tensor, query: tuple[float, float] = (0.5, 0.5)) -> Maps:
        """The soft mask averaged over channels (B, H, W)."""
        return {"soft mask": ("spatial", self.mask(x).mean(1))}
