"""Spatial transformer.

Paper: "Spatial Transformer Networks", Jaderberg, Simonyan, Zisserman, Kavukcuoglu, NeurIPS 2015.
https://arxiv.org/abs/1506.02025

A localisation net regresses an affine theta from the feature map; the map is resampled on the
transformed grid (bilinear). The regressor's last layer starts at zero weights and the identity
bias, so the block starts as the identity transform. Default position ``input``: the paper's
classification networks (distorted MNIST, Street View House Numbers, CUB) put the transformer on the
input image; any other position resamples the feature map there (``stem``: the stem's output).
"""
import torch
import torch.nn.functional as F
from torch import nn

from models.attention.base import AttentionBlock, Maps, require_positive


class SpatialTransformer(AttentionBlock):
    """Localisation net (conv, pool to 4x4, two FCs) -> affine theta -> grid sample.

    Args:
        channels: input and output channel count C.
        hidden: width of the localisation net.
    """

    default_position = "input"  # the paper's classification networks transform the input image

    def __init__(self, channels: int, hidden: int = 32):
        super().__init__()
        require_positive(hidden=hidden)
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
        return F.grid_sample(x.float(), self.grid(x), align_corners=False).to(x.dtype)

    def grid(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> where each output position samples the input: (B, H, W, 2) in [-1, 1], float32."""
        return F.affine_grid(self.theta(x).float(), list(x.shape), align_corners=False)

    def attention_maps(self, x: torch.Tensor, query: tuple[float, float] = (0.5, 0.5)) -> Maps:
        """Where the sampling grid reads from: a histogram of its points over the input (B, H, W)."""
        b, _, h, w = x.shape
        grid = self.grid(x)
        cols = ((grid[..., 0] + 1) / 2 * w).floor().long()
        rows = ((grid[..., 1] + 1) / 2 * h).floor().long()
        inside = (cols >= 0) & (cols < w) & (rows >= 0) & (rows < h)
        density = torch.zeros(b, h * w, device=x.device)
        index = (rows.clamp(0, h - 1) * w + cols.clamp(0, w - 1)).flatten(1)
        density.scatter_add_(1, index, inside.flatten(1).float())
        return {"sampling grid": ("spatial", density.view(b, h, w))}
