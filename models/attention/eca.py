"""Efficient Channel Attention.

Paper: "ECA-Net: Efficient Channel Attention for Deep Convolutional Neural Networks", Wang, Wu,
Zhu, Li, Zuo, Hu, CVPR 2020. https://arxiv.org/abs/1910.03151 . Reference code:
https://github.com/BangguWu/ECANet

The kernel size follows the paper's formula k = |(log2 C + b) / gamma| rounded to the nearest odd
number (gamma=2, b=1), or is fixed by ``kernel_size`` (the official ECA-ResNets fix k=3). timm's
``EcaModule`` never goes below k=3; here small C may give k=1 as the formula says.
"""
import math

import torch
from torch import nn


def eca_kernel_size(channels: int, gamma: float = 2, b: float = 1) -> int:
    """The paper's adaptive kernel size: |(log2 C + b) / gamma|, made odd by adding one."""
    t = int(abs((math.log2(channels) + b) / gamma))
    return t if t % 2 else t + 1


class ECA(nn.Module):
    """Global average pool -> 1-D conv across channels (no bias) -> sigmoid -> scale.

    Args:
        channels: input and output channel count C.
        kernel_size: odd 1-D kernel size; None chooses it from C by the paper's formula.
        gamma, b: the formula's constants.
    """

    default_position = "standard"
    positions = frozenset({"standard", "pre", "post", "identity", "after_spatial", "stem"})

    def __init__(self, channels: int, kernel_size: int | None = None, gamma: float = 2, b: float = 1):
        super().__init__()
        k = kernel_size if kernel_size is not None else eca_kernel_size(channels, gamma, b)
        if k < 1 or k % 2 == 0:
            raise ValueError(f"eca: kernel_size={k} must be odd and positive")
        self.conv = nn.Conv1d(1, 1, k, padding=(k - 1) // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)."""
        b, c = x.shape[:2]
        y = self.conv(x.mean((2, 3)).view(b, 1, c))  # B, 1, C
        return x * torch.sigmoid(y).view(b, c, 1, 1)
