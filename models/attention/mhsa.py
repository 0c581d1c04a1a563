"""Multi-head self-attention over a feature map with 2-D relative positions (BoTNet).

Papers: "Attention Is All You Need", Vaswani et al., NeurIPS 2017, https://arxiv.org/abs/1706.03762 ;
"Bottleneck Transformers for Visual Recognition", Srinivas et al., CVPR 2021,
https://arxiv.org/abs/2101.11605

Replaces a unit's 3x3 conv (``replace_spatial``): q, k, v are 1x1 convs without bias, logits are
q k^T + q r^T where r = r_h + r_w are learned relative height and width embeddings, both scaled by
d^-1/2; attention runs through ``scaled_dot_product_attention`` with the relative logits as an
additive mask. Stride 2 is a 2x2 average pool after attention, as BoTNet.

The tables are sized per block, as BoTNet and timm build them: ``max_size: null`` (the default) gives
each block (2H-1, d) and (2W-1, d) tables for the H x W map it sees at the model's input size
(``build_model(image_size=...)`` calls ``fit_to_map``), so BoTNet-50 at 224 has 14x14 tables in its
first c5 block, which attends before its stride-2 pool, and 7x7 in the other two. An int fixes one size
for every block. Other map sizes still run: the centre of a table is sliced for smaller maps and the
table is linearly interpolated for larger ones.
"""
import torch
import torch.nn.functional as F
from torch import nn

from models.attention.base import AttentionBlock, Maps, SPATIAL_POSITIONS, query_index, require_positive

BOTNET_C5_SIZE = 14  # the map BoTNet-50's first c5 block sees at 224: the tables' size until fit_to_map


def relative_table(table: torch.Tensor, size: int) -> torch.Tensor:
    """A (2M-1, d) table of offsets -(M-1)..M-1 -> the (2*size-1, d) table for offsets up to size-1."""
    m = (table.shape[0] + 1) // 2
    if size <= m:
        return table[m - size: m + size - 1]
    return F.interpolate(table.t().unsqueeze(0), size=2 * size - 1, mode="linear",
                         align_corners=True).squeeze(0).t()


def relative_logits(q: torch.Tensor, table: torch.Tensor, size: int) -> torch.Tensor:
    """q (..., size, d), queries along one axis -> logits (..., size, size) for each key on that axis."""
    rel = q @ relative_table(table, size).t()  # ..., size (query), 2*size-1 (offset index)
    idx = torch.arange(size, device=q.device)
    offset = idx.view(1, -1) - idx.view(-1, 1) + size - 1  # [query, key] -> table index
    return rel.gather(-1, offset.expand(*rel.shape[:-1], size))


class MultiHeadSelfAttention2d(AttentionBlock):
    """All-to-all attention over positions, heads of width out_channels / heads.

    Args:
        in_channels, out_channels, stride: the replaced conv's shape.
        heads: attention heads (4 in BoTNet).
        max_size: the map size the relative tables are built for; None: the map this block sees, set by
            ``fit_to_map`` (until then, 14: BoTNet's c5 at 224).
        rel_pos: add the relative-position logits (False: content-only attention).
    """

    default_position = "replace_spatial"
    positions = SPATIAL_POSITIONS

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, heads: int = 4,
                 max_size: int | None = None, rel_pos: bool = True):
        super().__init__()
        if heads is None:  # null is outlook's default only
            raise ValueError("heads=None must be an integer >= 1")
        require_positive(stride=stride, heads=heads, max_size=max_size)
        if out_channels % heads:
            raise ValueError(f"mhsa: out_channels={out_channels} is not divisible by heads={heads}")
        self.heads, self.dim = heads, out_channels // heads
        self.sized_by_map = max_size is None
        self.qkv = nn.Conv2d(in_channels, 3 * out_channels, 1, bias=False)
        self.rel_h = self.rel_w = None
        if rel_pos:
            self._build_tables(*(2 * [BOTNET_C5_SIZE if max_size is None else max_size]))
        self.pool = nn.AvgPool2d(2, 2, ceil_mode=True) if stride == 2 else nn.Identity()  # 7 -> 4, like a stride-2 conv
        if stride not in (1, 2):
            raise ValueError(f"stride={stride} is not supported; use 1 or 2")

    def _build_tables(self, height: int, width: int) -> None:
        """Fresh (2*height-1, d) and (2*width-1, d) relative tables, N(0, d^-1/2) as BoTNet initialises them."""
        self.rel_h = nn.Parameter(torch.randn(2 * height - 1, self.dim) * self.dim ** -0.5)
        self.rel_w = nn.Parameter(torch.randn(2 * width - 1, self.dim) * self.dim ** -0.5)

    def fit_to_map(self, height: int, width: int) -> None:
        """Size the tables for the height x width map this block sees (``max_size: null`` only; before training)."""
        if self.sized_by_map and self.rel_h is not None:
            self._build_tables(height, width)

    def position_bias(self, q: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """q (B, heads, HW, d), already scaled -> relative logits (B, heads, HW, HW)."""
        b, n = q.shape[0], q.shape[1]
        q2 = q.reshape(b, n, h, w, self.dim)
        lh = relative_logits(q2.transpose(2, 3), self.rel_h, h)  # B, n, W, H(query), H(key)
        lw = relative_logits(q2, self.rel_w, w)  # B, n, H, W(query), W(key)
        bias = lh.permute(0, 1, 3, 2, 4).unsqueeze(-1) + lw.unsqueeze(-2)  # B, n, H, W, H(k), W(k)
        return bias.reshape(b, n, h * w, h * w)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (B, C_in, H, W) -> q, k, v (B, heads, HW, d)."""
        b, _, h, w = x.shape
        qkv = self.qkv(x).reshape(b, 3, self.heads, self.dim, h * w).transpose(-1, -2)  # B, 3, n, HW, d
        return qkv.unbind(1)

    def _bias(self, q: torch.Tensor, h: int, w: int) -> torch.Tensor | None:
        """q (B, heads, HW, d), unscaled -> the relative logits (B, heads, HW, HW); None without them."""
        return self.position_bias(q * self.dim ** -0.5, h, w).to(q.dtype) if self.rel_h is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C_in, H, W) -> (B, C_out, H/stride, W/stride)."""
        b, _, h, w = x.shape
        q, k, v = self._qkv(x)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self._bias(q, h, w), scale=self.dim ** -0.5)
        out = out.transpose(-1, -2).reshape(b, self.heads * self.dim, h, w)  # B, n, HW, d -> B, C_out, H, W
        return self.pool(out)

    def attention_maps(self, x: torch.Tensor, query: tuple[float, float] = (0.5, 0.5)) -> Maps:
        """The query's softmax weights over all positions, averaged over heads (B, H, W), before the pool."""
        b, _, h, w = x.shape
        i, j = query_index(h, w, query)
        q, k, _ = self._qkv(x)
        row = slice(i * w + j, i * w + j + 1)  # the query's row of the logits
        logits = (q[:, :, row] * self.dim ** -0.5) @ k.transpose(-1, -2)  # B, n, 1, HW
        bias = self._bias(q, h, w)
        if bias is not None:
            logits = logits + bias[:, :, row]
        return {"query attention": ("query", torch.softmax(logits, dim=-1).mean(1).view(b, h, w))}
