"""Efficient Channel Attention.

Paper: "ECA-Net: Efficient Channel Attention for Deep Convolutional Neural Networks", Wang, Wu,
Zhu, Li, Zuo, Hu, CVPR 2020. https://arxiv.org/abs/1910.03151 . Reference code:
https://github.com/BangguWu/ECANet

The kernel size follows the paper's formula k = |(log2 C + b) / gamma| made odd (gamma=2, b=1), or is
fixed by ``kernel_size``. The official module takes k as given and has no adaptive rule: its trained
ECA-Net50 uses k = 3, 5, 5, 7 by stage (``by_stage`` in the spec; the formula gives 5, 5, 5, 7) and its
ECA-MobileNetV2 k = 1 below 96 channels, else 3 (``experiment=eca_mobilenetv2_imagenet``). timm's
``EcaModule`` never goes below k=3 when it picks k from C; here small C may give k=1 as the formula
says (``timm_twin`` passes timm the kernel size itself, so every k has a twin).
"""
import math

import torch
from timm.layers import EcaModule
from torch import nn

from models.attention.base import AttentionBlock, Maps, require_positive


def eca_kernel_size(channels: int, gamma: float = 2, b: float = 1) -> int:
    """The paper's adaptive kernel size: |(log2 C + b) / gamma|, made odd by adding one."""
    t = int(abs((math.log2(channels) + b) / gamma))
    return t if t % 2 else t + 1


class ECA(AttentionBlock):
    """Global average pool -> 1-D conv across channels (no bias) -> sigmoid -> scale.

    Args:
        channels: input and output channel count C.
        kernel_size: odd 1-D kernel size; None chooses it from C by the paper's formula.
        gamma, b: the formula's constants.
    """

    default_position = "standard"
    is_gate = True

    def __init__(self, channels: int, kernel_size: int | None = None, gamma: float = 2, b: float = 1):
        super().__init__()
        require_positive(kernel_size=kernel_size)
        k = kernel_size if kernel_size is not None else eca_kernel_size(channels, gamma, b)
        if k < 1 or k % 2 == 0:
            raise ValueError(f"kernel_size={k} must be odd and positive")
        self.conv = nn.Conv1d(1, 1, k, padding=(k - 1) // 2, bias=False)

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> channel weights (B, C, 1, 1) in (0, 1)."""
        b, c = x.shape[:2]
        y = self.conv(x.mean((2, 3)).view(b, 1, c))  # B, 1, C
        return torch.sigmoid(y).view(b, c, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)."""
        return x * self.gate(x)

    def attention_maps(self, x: torch.Tensor, query: tuple[float, float] = (0.5, 0.5)) -> Maps:
        """The channel gate (B, C)."""
        return {"channel gate": ("channel", self.gate(x).flatten(1))}

    def timm_twin(self) -> nn.Module:
        """timm's ``EcaModule`` with this kernel size and weights."""
        return self._loaded_twin(EcaModule(kernel_size=self.conv.kernel_size[0]))
