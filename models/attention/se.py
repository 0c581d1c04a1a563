"""Squeeze-and-Excitation.

Paper: "Squeeze-and-Excitation Networks", Hu, Shen, Sun, CVPR 2018 (TPAMI 2019).
https://arxiv.org/abs/1709.01507 . Reference code: https://github.com/hujie-frank/SENet

Differences from timm's ``SEModule``: timm rounds the hidden width to a multiple of 8
(``rd_divisor=8``) and takes a ratio; here the width is exactly ``channels // reduction`` as in
the paper's Table 5 and its parameter counts. ``divisor=8`` gives timm's rounding; timm's module
built with ``rd_channels=C // r`` gives this one (``tests/test_attention.py`` checks both).
"""
import torch
from timm.layers import make_divisible
from torch import nn

GATES = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU, "tanh": nn.Tanh}


class SqueezeExcite(nn.Module):
    """Channel gate: global average pool -> FC(C->C/r) -> ReLU -> FC(C/r->C) -> sigmoid -> scale.

    Args:
        channels: input and output channel count C.
        reduction: the paper's reduction ratio r; the bottleneck width is exactly ``C // r``.
        bias: biases in both FC layers, as in the official model.
        squeeze: ``avg`` (the paper), ``max``, or ``none``: the paper's NoSqueeze ablation, where
            the two FCs become 1x1 convs applied at full resolution (a gate per position).
        gate: the excitation non-linearity of the paper's ablation: ``sigmoid``, ``relu``, ``tanh``.
        divisor: round the width to a multiple of this as timm does (1: exactly C // r).
    """

    default_position = "standard"
    positions = frozenset({"standard", "pre", "post", "identity", "after_spatial", "stem"})

    def __init__(self, channels: int, reduction: int = 16, bias: bool = True, squeeze: str = "avg",
                 gate: str = "sigmoid", divisor: int = 1):
        super().__init__()
        hidden = channels // reduction if divisor == 1 else make_divisible(channels / reduction, divisor, round_limit=0.0)
        if reduction < 1 or hidden < 1:
            raise ValueError(
                f"se: reduction={reduction} leaves no hidden units for {channels} channels; "
                f"use 1 <= reduction <= {channels}"
            )
        if squeeze not in ("avg", "max", "none"):
            raise ValueError(f"se: squeeze='{squeeze}' is not valid; use avg, max or none")
        if gate not in GATES:
            raise ValueError(f"se: gate='{gate}' is not valid; use {', '.join(GATES)}")
        self.squeeze = squeeze
        # 1x1 convs rather than Linear so the state dict matches timm's SEModule (fc1/fc2).
        self.fc1 = nn.Conv2d(channels, hidden, kernel_size=1, bias=bias)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, kernel_size=1, bias=bias)
        self.gate = GATES[gate]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)."""
        if self.squeeze == "avg":
            s = x.mean((2, 3), keepdim=True)  # B, C, 1, 1
        elif self.squeeze == "max":
            s = x.amax((2, 3), keepdim=True)
        else:
            s = x  # B, C, H, W: NoSqueeze
        return x * self.gate(self.fc2(self.act(self.fc1(s))))
