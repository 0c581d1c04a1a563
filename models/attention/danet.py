"""Dual attention: position attention and channel attention.

Paper: "Dual Attention Network for Scene Segmentation", Fu, Liu, Tian, Li, Bao, Fang, Lu, CVPR 2019.
https://arxiv.org/abs/1809.02983 . Reference code: https://github.com/junfu1115/DANet

As the official ``PAM_Module`` (query/key 1x1 convs to C / 8 and value 1x1 conv to C, with biases;
unscaled softmax over positions, run through ``scaled_dot_product_attention`` with scale 1) and
``CAM_Module`` (softmax over max(energy) - energy of the C x C Gram matrix); combined as
x + gamma_p * PAM(x) + gamma_c * CAM(x), both gammas starting at 0.
"""
import torch
import torch.nn.functional as F
from torch import nn

from models.attention.base import AttentionBlock, Maps, query_index, require_positive


class PositionAttention(nn.Module):
    """Self-attention over positions; returns the attended features (without the residual)."""

    def __init__(self, channels: int, reduction: int = 8):
        super().__init__()
        require_positive(reduction=reduction)
        inner = max(1, channels // reduction)
        self.query = nn.Conv2d(channels, inner, 1)
        self.key = nn.Conv2d(channels, inner, 1)
        self.value = nn.Conv2d(channels, channels, 1)

    def query_key(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, C, H, W) -> queries and keys (B, 1, N, C'), one head."""
        q = self.query(x).flatten(2).transpose(1, 2).unsqueeze(1)  # B, 1, N, C'
        k = self.key(x).flatten(2).transpose(1, 2).unsqueeze(1)
        return q, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)."""
        b, c, h, w = x.shape
        q, k = self.query_key(x)
        v = self.value(x).flatten(2).transpose(1, 2).unsqueeze(1)  # B, 1, N, C
        out = F.scaled_dot_product_attention(q, k, v, scale=1.0)
        return out.squeeze(1).transpose(1, 2).reshape(b, c, h, w)


class ChannelAttention(nn.Module):
    """Attention between channels from their Gram matrix; returns the attended features."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)."""
        b, c, h, w = x.shape
        flat = x.flatten(2)  # B, C, N
        energy = flat @ flat.transpose(1, 2)  # B, C, C
        energy = energy.amax(-1, keepdim=True) - energy  # as the official code
        return (torch.softmax(energy, dim=-1) @ flat).view(b, c, h, w)


class DualAttention(AttentionBlock):
    """x + gamma_p * PAM(x) + gamma_c * CAM(x).

    Args:
        channels: input and output channel count C.
        reduction: PAM query/key width is C // reduction (8 in the paper).
    """

    default_position = "post"

    def __init__(self, channels: int, reduction: int = 8):
        super().__init__()
        require_positive(reduction=reduction)
        self.pam = PositionAttention(channels, reduction)
        self.cam = ChannelAttention()
        self.gamma_p = nn.Parameter(torch.zeros(1))
        self.gamma_c = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)."""
        return x + self.gamma_p * self.pam(x) + self.gamma_c * self.cam(x)

    def attention_maps(self, x: torch.Tensor, query: tuple[float, float] = (0.5, 0.5)) -> Maps:
        """The position attention's weights of the query over all positions (B, H, W)."""
        b, _, h, w = x.shape
        i, j = query_index(h, w, query)
        q, k = self.pam.query_key(x)
        q = q[:, :, i * w + j].unsqueeze(2)  # B, 1, 1, C'
        weights = torch.softmax(q @ k.transpose(-1, -2), dim=-1)  # B, 1, 1, N; unscaled, as forward
        return {"position attention": ("query", weights.view(b, h, w))}
