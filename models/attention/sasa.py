"""Stand-alone local self-attention.

Paper: "Stand-Alone Self-Attention in Vision Models", Ramachandran, Parmar, Vaswani, Bello,
Levskaya, Shlens, NeurIPS 2019. https://arxiv.org/abs/1906.05909

Replaces a unit's spatial conv (``replace_spatial``): each position attends over its k x k
neighbourhood (k = 7), multi-head, with logits q^T k_ab + q^T r_{a-i,b-j} where the relative
embedding concatenates a row-offset half and a column-offset half of each head's width. Positions
outside the map are masked. Stride 2 is a 2x2 average pool after attention, as the paper's
downsampling. Memory grows as k^2 times the feature map, never (HW)^2.
"""
import torch
import torch.nn.functional as F
from torch import nn

from models.attention.base import AttentionBlock, Maps, SPATIAL_POSITIONS, query_index, require_positive


class LocalSelfAttention(AttentionBlock):
    """k x k neighbourhood attention with relative row/column embeddings.

    Args:
        in_channels, out_channels, stride: the replaced conv's shape.
        kernel_size: neighbourhood size k (odd; 7 in the paper).
        heads: attention heads (8 in the paper).
        scaled: scale the logits by d^-1/2 as the Transformer does; the paper's Eq. 2 does not (False).
    """

    default_position = "replace_spatial"
    positions = SPATIAL_POSITIONS

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, kernel_size: int = 7,
                 heads: int = 8, scaled: bool = False):
        super().__init__()
        if heads is None:
            raise ValueError("heads=None must be an integer >= 1")
        require_positive(stride=stride, kernel_size=kernel_size, heads=heads)
        if out_channels % heads or (out_channels // heads) % 2:
            raise ValueError(f"sasa: out_channels={out_channels} must split into {heads} heads of even width")
        if kernel_size % 2 == 0 or stride not in (1, 2):
            raise ValueError(f"kernel_size={kernel_size} must be odd and stride={stride} 1 or 2")
        self.k, self.heads, self.dim = kernel_size, heads, out_channels // heads
        self.scale = self.dim ** -0.5 if scaled else 1.0
        self.q = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.kv = nn.Conv2d(in_channels, 2 * out_channels, 1, bias=False)
        self.rel_row = nn.Parameter(torch.randn(self.dim // 2, kernel_size) * self.dim ** -0.5)
        self.rel_col = nn.Parameter(torch.randn(self.dim // 2, kernel_size) * self.dim ** -0.5)
        self.pool = nn.AvgPool2d(2, 2, ceil_mode=True) if stride == 2 else nn.Identity()  # 7 -> 4, like a stride-2 conv

    def _window_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, C_in, H, W) -> window weights (B, n, HW, 1, k*k) and window values (B, n, HW, d, k*k)."""
        b, _, h, w = x.shape
        kk, n, d = self.k * self.k, self.heads, self.dim
        q = (self.q(x) * self.scale).view(b, n, d, h * w).permute(0, 1, 3, 2).unsqueeze(3)  # B, n, HW, 1, d
        kv = F.unfold(self.kv(x), self.k, padding=self.k // 2).view(b, 2, n, d, kk, h * w)
        k, v = kv.permute(1, 0, 2, 5, 3, 4).unbind(0)  # B, n, HW, d, k*k
        rel = torch.cat([  # d, k*k: row offset in the first half, column offset in the second
            self.rel_row.unsqueeze(2).expand(-1, -1, self.k).reshape(d // 2, kk),
            self.rel_col.unsqueeze(1).expand(-1, self.k, -1).reshape(d // 2, kk),
        ])
        logits = q @ (k + rel)  # B, n, HW, 1, k*k (batched matmuls, so MAC counters see them)
        inside = F.unfold(x.new_ones(1, 1, h, w), self.k, padding=self.k // 2)[0].t().reshape(1, 1, h * w, 1, kk) > 0
        return torch.softmax(logits.masked_fill(~inside, float("-inf")), dim=-1), v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C_in, H, W) -> (B, C_out, H/stride, W/stride)."""
        b, _, h, w = x.shape
        att, v = self._window_attention(x)
        out = (att @ v.transpose(-1, -2)).squeeze(3)  # B, n, HW, d
        out = out.permute(0, 1, 3, 2)  # B, n, d, HW
        return self.pool(out.reshape(b, self.heads * self.dim, h, w))

    def attention_maps(self, x: torch.Tensor, query: tuple[float, float] = (0.5, 0.5)) -> Maps:
        """The query's weights over its k x k window, averaged over heads, placed on the map (zero elsewhere)."""
        b, _, h, w = x.shape
        i, j = query_index(h, w, query)
        k = self.k
        att, _ = self._window_attention(x)
        window = att[:, :, i * w + j, 0].mean(1).view(b, k, k)  # rows i-k//2.., columns j-k//2..
        weights = x.new_zeros(b, h + k - 1, w + k - 1)  # the map padded by k//2 on each side
        weights[:, i:i + k, j:j + k] = window  # positions outside the map have weight 0
        return {"query attention": ("query", weights[:, k // 2:k // 2 + h, k // 2:k // 2 + w])}
