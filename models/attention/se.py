"""Squeeze-and-Excitation.

Paper: "Squeeze-and-Excitation Networks", Hu, Shen, Sun, CVPR 2018 (TPAMI 2019).
https://arxiv.org/abs/1709.01507 . Reference code: https://github.com/hujie-frank/SENet

Differences from timm's ``SEModule``: timm rounds the hidden width to a multiple of 8
(``rd_divisor=8``) and takes a ratio; here the width is ``channels // reduction`` as in the paper's
Table 5 and its parameter counts, floored at 1 so that every r runs on every backbone (the paper's CIFAR
ResNets keep one hidden unit in their 16-channel stage at r = 32). ``divisor=8`` gives timm's rounding; timm's module
built with ``rd_channels=C // r`` gives this one (``timm_twin``; ``tests/test_attention.py`` checks both).
"""
import torch
from timm.layers import SEModule, make_divisible
from torch import nn

from models.attention.base import AttentionBlock, Maps, bottleneck_width, require_positive

GATES = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU, "tanh": nn.Tanh}


class SqueezeExcite(AttentionBlock):
    """Channel gate: global average pool -> FC(C->C/r) -> ReLU -> FC(C/r->C) -> sigmoid -> scale.

    Args:
        channels: input and output channel count C.
        reduction: the paper's reduction ratio r; the bottleneck width is ``C // r``, at least 1.
        bias: biases in both FC layers, as in the official model.
        squeeze: ``avg`` (the paper), ``max``, or ``none``: the paper's NoSqueeze ablation, where
            the two FCs become 1x1 convs applied at full resolution (a gate per position).
        gate: the excitation non-linearity of the paper's ablation: ``sigmoid``, ``relu``, ``tanh``.
        divisor: round the width to a multiple of this as timm does (1: C // r, at least 1).
    """

    default_position = "standard"
    is_gate = True

    def __init__(self, channels: int, reduction: int = 16, bias: bool = True, squeeze: str = "avg",
                 gate: str = "sigmoid", divisor: int = 1):
        super().__init__()
        require_positive(reduction=reduction, divisor=divisor)
        hidden = (bottleneck_width(channels, reduction) if divisor == 1
                  else make_divisible(channels / reduction, divisor, round_limit=0.0))
        if squeeze not in ("avg", "max", "none"):
            raise ValueError(f"squeeze='{squeeze}' is not valid; use avg, max or none")
        if gate not in GATES:
            raise ValueError(f"gate='{gate}' is not valid; use {', '.join(GATES)}")
        self.squeeze = squeeze
        # 1x1 convs rather than Linear so the state dict matches timm's SEModule (fc1/fc2).
        self.width = hidden  # the effective bottleneck width (scripts/complexity.py lists it)
        self.fc1 = nn.Conv2d(channels, hidden, kernel_size=1, bias=bias)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, kernel_size=1, bias=bias)
        self.gate = GATES[gate]()

    # Not ``gate``: that name is the excitation non-linearity's module (state-dict and hook names).
    def excitation(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> channel gates (B, C, 1, 1); (B, C, H, W) for ``squeeze='none'``."""
        if self.squeeze == "avg":
            s = x.mean((2, 3), keepdim=True)  # B, C, 1, 1
        elif self.squeeze == "max":
            s = x.amax((2, 3), keepdim=True)
        else:
            s = x  # B, C, H, W: NoSqueeze
        return self.gate(self.fc2(self.act(self.fc1(s))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)."""
        return x * self.excitation(x)

    def attention_maps(self, x: torch.Tensor, query: tuple[float, float] = (0.5, 0.5)) -> Maps:
        """The channel gate (B, C); with ``squeeze='none'`` averaged over positions."""
        return {"channel gate": ("channel", self.excitation(x).mean((2, 3)))}

    def timm_twin(self) -> nn.Module | None:
        """timm's ``SEModule`` with this width, biases and gate; None for max or no squeeze (timm: avg only)."""
        if self.squeeze != "avg":
            return None
        twin = SEModule(self.fc1.in_channels, rd_channels=self.fc1.out_channels, bias=self.fc1.bias is not None,
                        gate_layer=type(self.gate))
        return self._loaded_twin(twin)
