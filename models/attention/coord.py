"""Coordinate attention.

Paper: "Coordinate Attention for Efficient Mobile Network Design", Hou, Zhou, Feng, CVPR 2021.
https://arxiv.org/abs/2103.02907 . Reference code: https://github.com/houqb/CoordAttention

As the official code: average pooling along W and along H, concatenated and passed through a shared
1x1 conv to mip = max(8, C // r) channels (with bias) + BN + h-swish, split, and two 1x1 convs (with
bias) + sigmoid give a_h (B, C, H, 1) and a_w (B, C, 1, W); out = x * a_h * a_w. timm's ``CoordAttn``
differs by default: width make_divisible(C / 16 * 2/3, 8), no conv biases (``timm_twin`` sets both).
"""
import torch
from timm.layers.coord_attn import CoordAttn
from torch import nn

from models.attention.base import AttentionBlock, Maps, require_positive


class CoordAttention(AttentionBlock):
    """Direction-aware channel attention from pooling along each spatial axis.

    Args:
        channels: input and output channel count C.
        reduction: r; the hidden width is max(min_width, C // r).
        min_width: the floor on the hidden width (8 in the paper).
    """

    default_position = "standard"  # on the ResNets; the mobile nets put gates after the depthwise conv
    is_gate = True

    def __init__(self, channels: int, reduction: int = 32, min_width: int = 8):
        super().__init__()
        require_positive(reduction=reduction, min_width=min_width)
        mip = max(min_width, channels // reduction)
        self.conv1 = nn.Conv2d(channels, mip, 1)
        self.bn1 = nn.BatchNorm2d(mip)
        self.act = nn.Hardswish()
        self.conv_h = nn.Conv2d(mip, channels, 1)
        self.conv_w = nn.Conv2d(mip, channels, 1)

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, C, H, W) -> (a_h (B, C, H, 1), a_w (B, C, 1, W))."""
        h, w = x.shape[2:]
        x_h = x.mean(3, keepdim=True)  # B, C, H, 1
        x_w = x.mean(2, keepdim=True).transpose(2, 3)  # B, C, W, 1
        y = self.act(self.bn1(self.conv1(torch.cat([x_h, x_w], dim=2))))  # B, mip, H + W, 1
        y_h, y_w = torch.split(y, [h, w], dim=2)
        return torch.sigmoid(self.conv_h(y_h)), torch.sigmoid(self.conv_w(y_w.transpose(2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)."""
        a_h, a_w = self.gates(x)
        return x * a_h * a_w

    def attention_maps(self, x: torch.Tensor, query: tuple[float, float] = (0.5, 0.5)) -> Maps:
        """a_h x a_w averaged over channels (B, H, W)."""
        a_h, a_w = self.gates(x)  # B, C, H, 1 and B, C, 1, W
        return {"a_h x a_w": ("spatial", (a_h * a_w).mean(1))}

    def timm_twin(self) -> nn.Module:
        """timm's ``CoordAttn`` with this width, conv biases and weights."""
        return self._loaded_twin(CoordAttn(self.conv1.in_channels, rd_channels=self.conv1.out_channels, bias=True))
