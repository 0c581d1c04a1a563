"""Dual attention: position attention and channel attention.

Paper: "Dual Attention Network for Scene Segmentation", Fu, Liu, Tian, Li, Bao, Fang, Lu, CVPR 2019.
https://arxiv.org/abs/1809.02983 . Reference code: https://github.com/junfu1115/DANet

As the official ``PAM_Module`` (query/key 1x1 convs to C / 8 and value 1x1 conv to C, with biases;
unscaled softmax over positions, run through ``scaled_dot_product_attention`` with scale 1) and
``CAM_Module`` (softmax over max(energy) - energy of the C x C Gram matrix); combined as
x + gamma_p * PAM(x) + gamma_c * CAM(x), both gammas starting at 0.

At position ``head`` (its default) the block is DANet's head as the official ``DANetHead``: two
branches, each a 3x3 reduction conv to C / 4 + BN + ReLU, then its attention with its own gamma
(PAM in one, CAM in the other), then a 3x3 conv + BN + ReLU; the branches are summed, then
Dropout2d(0.1). The classifier pools that sum (the official code's 1x1 classifiers on each branch and
on the sum are the segmentation outputs; the sum's is the one evaluated).
"""
import torch
import torch.nn.functional as F
from torch import nn

from models.attention.base import AttentionBlock, Maps, conv_bn_act, query_index, require_positive


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


class GammaResidual(nn.Module):
    """x + gamma * attention(x), gamma starting at 0: the official PAM_Module and CAM_Module."""

    def __init__(self, attention: nn.Module):
        super().__init__()
        self.attention = attention
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)."""
        return x + self.gamma * self.attention(x)


class DANetHead(AttentionBlock):
    """DANet's head on the last feature map: a position and a channel branch, summed (see the module docstring).

    Args: as ``DualAttention``.
    """

    def __init__(self, channels: int, reduction: int = 8):
        super().__init__()
        inner = max(1, channels // 4)
        self.out_channels = inner
        self.conv5a = conv_bn_act(channels, inner, nn.ReLU(inplace=True))
        self.conv5c = conv_bn_act(channels, inner, nn.ReLU(inplace=True))
        self.sa = GammaResidual(PositionAttention(inner, reduction))
        self.sc = GammaResidual(ChannelAttention())
        self.conv51 = conv_bn_act(inner, inner, nn.ReLU(inplace=True))
        self.conv52 = conv_bn_act(inner, inner, nn.ReLU(inplace=True))
        self.dropout = nn.Dropout2d(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C / 4, H, W)."""
        return self.dropout(self.conv51(self.sa(self.conv5a(x))) + self.conv52(self.sc(self.conv5c(x))))

    def attention_maps(self, x: torch.Tensor, query: tuple[float, float] = (0.5, 0.5)) -> Maps:
        """The position branch's weights of the query over all positions (B, H, W)."""
        return position_weights(self.sa.attention, self.conv5a(x), query)


def position_weights(pam: PositionAttention, x: torch.Tensor, query: tuple[float, float]) -> Maps:
    """``pam``'s weights of the query position over all positions of ``x`` (B, H, W), unscaled as its forward."""
    b, _, h, w = x.shape
    i, j = query_index(h, w, query)
    q, k = pam.query_key(x)
    q = q[:, :, i * w + j].unsqueeze(2)  # B, 1, 1, C'
    weights = torch.softmax(q @ k.transpose(-1, -2), dim=-1)  # B, 1, 1, N
    return {"position attention": ("query", weights.view(b, h, w))}


class DualAttention(AttentionBlock):
    """x + gamma_p * PAM(x) + gamma_c * CAM(x).

    Args:
        channels: input and output channel count C.
        reduction: PAM query/key width is C // reduction (8 in the paper).
    """

    default_position = "head"
    fallback_position = "post"  # after the units of the chosen stages where a backbone has no head (VOLO)
    head_class = DANetHead

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
        return position_weights(self.pam, x, query)
