"""Spatial transformer.

Paper: "Spatial Transformer Networks", Jaderberg, Simonyan, Zisserman, Kavukcuoglu, NeurIPS 2015.
https://arxiv.org/abs/1506.02025

A localisation net regresses an affine theta from the feature map; the map is resampled on the
transformed grid (bilinear). The regressor's last layer starts at zero weights and the identity
bias, so the block starts as the identity transform. Default position ``stem`` (it transforms the
stem's output); any other position resamples the feature map there.
"""
import torch
import torch.nn.functional as F
from torch import nn


class SpatialTransformer(nn.Module):
    """Localisation net (conv, pool to 4x4, two FCs) -> affine theta -> grid sample.

    Args:
        channels: input and output channel count C.
        hidden: width of the localisation net.
    """

    default_position = "stem"
    positions = frozenset({"stem", "pre", "post", "standard", "identity", "after_spatial"})

    def __init__(self, channels: int, hidden: int = 32):
        super().__init__()
        self.localization = nn.Sequential(
            nn.Conv2d(channels, hidden, 3, padding=1), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(hidden * 16, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, 6),
        )
        self.init_weights()

    def init_weights(self) -> None:
        """Zero regressor weights and the identity bias: theta = identity at initialisation."""
        nn.init.zeros_(self.localization[-1].weight)
        with torch.no_grad():
            self.localization[-1].bias.copy_(torch.tensor([1.0, 0, 0, 0, 1, 0]))

    def theta(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> affine parameters (B, 2, 3)."""
        return self.localization(x).view(-1, 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)."""
        theta = self.theta(x).float()
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x.float(), grid, align_corners=False).to(x.dtype)
