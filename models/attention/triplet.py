"""Triplet attention: three rotated Z-pool + conv gates over (C, H), (C, W) and (H, W).

Paper: "Rotate to Attend: Convolutional Triplet Attention Module", Misra, Nalamada, Arasanipalai,
Hou, WACV 2021. https://arxiv.org/abs/2010.03045 . Reference code:
https://github.com/landskape-ai/triplet-attention

Each branch permutes the tensor so one of C, H, W becomes the "channel" axis, Z-pools it (max and
mean, in that order as the official code), and gates with sigmoid(BN(conv7x7)): exactly CBAM's
spatial gate, which is reused. The three gated tensors are rotated back and averaged.
"""
import torch
from torch import nn

from models.attention.base import AttentionBlock, require_positive
from models.attention.cbam import SpatialGate


class TripletAttention(AttentionBlock):
    """Average of the C-H, C-W and H-W interaction branches.

    Args:
        channels: channel count (the gates do not depend on it).
        kernel_size: the gates' conv kernel (7 in the paper).
        spatial: include the plain H-W branch (False: the paper's two-branch ablation).
    """

    default_position = "standard"
    is_gate = True
    # MODELS/mobilenet.py: after the projection's BN, in every unit (t = 1 too). No official MobileNeXt
    # code: the same place, the end of each sandglass branch.
    official_places = {"mobilenetv2": "standard", "mobilenext": "standard"}

    def __init__(self, channels: int, kernel_size: int = 7, spatial: bool = True):
        super().__init__()
        require_positive(kernel_size=kernel_size)
        self.ch = SpatialGate(kernel_size)  # H plays the channel role: C-W interaction
        self.cw = SpatialGate(kernel_size)  # W plays the channel role: C-H interaction
        self.hw = SpatialGate(kernel_size) if spatial else None
        self.init_weights()

    def init_weights(self) -> None:
        """The official ResNets' init: the H-W gate's BN scale at 0, the other two at 1, all shifts at 0.

        ``MODELS/resnet.py`` zeroes the BN weights whose names contain ``SpatialGate``: only the H-W
        branch's, so that branch starts as a uniform 0.5 gate.
        """
        for gate in (self.ch, self.cw, self.hw):
            if gate is not None:
                nn.init.zeros_(gate.bn.bias)
        if self.hw is not None:
            nn.init.zeros_(self.hw.bn.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)."""
        out_h = self.ch(x.permute(0, 2, 1, 3)).permute(0, 2, 1, 3)  # B, H, C, W and back
        out_w = self.cw(x.permute(0, 3, 2, 1)).permute(0, 3, 2, 1)  # B, W, H, C and back
        if self.hw is None:
            return (out_h + out_w) / 2
        return (out_h + out_w + self.hw(x)) / 3
