"""SimAM: a parameter-free attention from an energy function.

Paper: "SimAM: A Simple, Parameter-Free Attention Module for Convolutional Neural Networks", Yang,
Zhang, Li, Xie, ICML 2021. http://proceedings.mlr.press/v139/yang21o.html . Reference code:
https://github.com/ZjjConan/SimAM

Each activation's inverse minimal energy, (x - mu)^2 / (4 (sigma^2 + lambda)) + 1/2 with the
channel's spatial mean mu and variance sigma^2 (over n = HW - 1), gates it through a sigmoid. The
official ResNets apply it after conv2, before bn2 (``spatial_prenorm``, its default there), the
official MobileNetV2 between every depthwise conv and its BN; the official training scripts set lambda on the command line (0.1 in the README's ImageNet commands).
"""
import torch

from models.attention.base import AttentionBlock


class SimAM(AttentionBlock):
    """x * sigmoid(energy(x)); no parameters.

    Args:
        channels: channel count (unused: the block has no weights; kept for the common signature).
        e_lambda: the energy's regulariser lambda (1e-4 in the paper).
    """

    default_position = "spatial_prenorm"  # the official code: after conv2, before bn2
    is_gate = True
    # networks/imagenet/mobilenetv2.py: between each depthwise conv and its BN, in all 17 units (t = 1 too).
    # No official MobileNeXt code: the same place, the last depthwise conv of each unit that has one.
    official_places = {"mobilenetv2": "spatial_prenorm", "mobilenext": "spatial_prenorm"}

    def __init__(self, channels: int, e_lambda: float = 1e-4):
        super().__init__()
        self.e_lambda = e_lambda

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)."""
        n = max(x.shape[2] * x.shape[3] - 1, 1)
        d = (x - x.mean((2, 3), keepdim=True)).pow(2)
        energy = d / (4 * (d.sum((2, 3), keepdim=True) / n + self.e_lambda)) + 0.5
        return x * torch.sigmoid(energy)
