"""MAC and parameter counting (engine/complexity.py)."""
import torch
import torch.nn.functional as F
from torch import nn

from engine.complexity import count_macs


def test_macs_of_a_conv_and_a_linear():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 5 * 4, 7))
    assert count_macs(model, (3, 5, 4)) == 8 * 5 * 4 * 3 * 3 * 3 + 8 * 5 * 4 * 7


class TokenAttention(nn.Module):
    """Self-attention over the pixels of a (B, C, H, W) map through SDPA: 2 * HW * HW * C MACs."""

    def __init__(self, channels):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2).unsqueeze(1)  # B, 1, HW, C
        return F.scaled_dot_product_attention(t, t, t, scale=c ** -0.5).sum() + self.dummy


def test_macs_include_scaled_dot_product_attention_on_the_cpu():
    c, h, w = 16, 6, 5
    n = h * w
    assert count_macs(TokenAttention(c), (c, h, w)) == 2 * n * n * c  # Q K^T and A V
