"""Residual attention: a bottom-up top-down soft mask applied as (1 + M(x)) * T(x).

Paper: "Residual Attention Network for Image Classification", Wang, Jiang, Qian, Yang, Li, Zhang,
Wang, Tang, CVPR 2017. https://arxiv.org/abs/1704.06904 . Reference code:
https://github.com/fwang91/residual-attention-network

Plugged into a backbone, the unit it follows is the trunk T, so the block returns (1 + M(x)) * x.
The mask branch goes down by 2x2/2 max-pools with a pre-activation residual unit at each level and a
skip connection (another residual unit) from each level, then back up by bilinear upsampling, adding
the skips; BN-ReLU-1x1 conv twice and a sigmoid close it. Its depth is chosen from the feature size,
as the paper's stages use 3, 2 and 1 pools on 56, 28 and 14: as many halvings (up to ``max_depth``)
as keep the smallest map at least ``min_size`` wide. Every level's units run at every size (a level
that cannot pool works at the smallest resolution), so all parameters get gradients.
"""
import torch
import torch.nn.functional as F
from torch import nn

from models.attention.base import AttentionBlock, Maps, require_positive


class PreActUnit(nn.Module):
    """Pre-activation bottleneck residual unit (BN-ReLU-conv x 3), width-preserving."""

    def __init__(self, channels: int):
        super().__init__()
        inner = max(1, channels // 4)
        self.body = nn.Sequential(
            nn.BatchNorm2d(channels), nn.ReLU(inplace=True), nn.Conv2d(channels, inner, 1, bias=False),
            nn.BatchNorm2d(inner), nn.ReLU(inplace=True), nn.Conv2d(inner, inner, 3, padding=1, bias=False),
            nn.BatchNorm2d(inner), nn.ReLU(inplace=True), nn.Conv2d(inner, channels, 1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)."""
        return x + self.body(x)


class ResidualAttention(AttentionBlock):
    """Soft mask branch M with sigmoid output; returns (1 + M(x)) * x.

    Args:
        channels: input and output channel count C.
        max_depth: most max-pool levels in the mask branch (3 in the paper's first stage).
        min_size: the smallest map a level may pool down to.
    """

    default_position = "post"

    def __init__(self, channels: int, max_depth: int = 3, min_size: int = 4):
        super().__init__()
        require_positive(max_depth=max_depth, min_size=min_size)
        self.max_depth, self.min_size = max_depth, min_size
        self.down = nn.ModuleList(PreActUnit(channels) for _ in range(max_depth))
        self.skips = nn.ModuleList(PreActUnit(channels) for _ in range(max_depth - 1))
        self.up = nn.ModuleList(PreActUnit(channels) for _ in range(max_depth))
        self.head = nn.Sequential(
            nn.BatchNorm2d(channels), nn.ReLU(inplace=True), nn.Conv2d(channels, channels, 1, bias=False),
            nn.BatchNorm2d(channels), nn.ReLU(inplace=True), nn.Conv2d(channels, channels, 1, bias=False),
        )

    def depth(self, h: int, w: int) -> int:
        """Number of halvings that keep the smallest map at least ``min_size`` wide."""
        d, size = 0, min(h, w)
        while d < self.max_depth and size // 2 >= self.min_size:
            size //= 2
            d += 1
        return d

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> soft mask (B, C, H, W) in (0, 1)."""
        depth = self.depth(*x.shape[2:])
        sizes, skips, y = [], [], x
        for level in range(self.max_depth):
            if level < depth:
                sizes.append(y.shape[2:])
                y = F.max_pool2d(y, 2, ceil_mode=True)
            y = self.down[level](y)
            if level < self.max_depth - 1:
                skips.append(self.skips[level](y))
        for level in reversed(range(self.max_depth)):
            y = self.up[level](y)
            if level < depth:
                y = F.interpolate(y, size=sizes[level], mode="bilinear", align_corners=False)
            if level > 0:
                y = y + skips[level - 1]  # taken after the same pool, so at this size
        return torch.sigmoid(self.head(y))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)."""
        return (1 + self.mask(x)) * x

    def attention_maps(self, x: torch.Tensor, query: tuple[float, float] = (0.5, 0.5)) -> Maps:
        """The soft mask averaged over channels (B, H, W)."""
        return {"soft mask": ("spatial", self.mask(x).mean(1))}
