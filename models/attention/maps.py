"""What each attention block attends to, recomputed from the block's input with its own weights.

``attention_maps(block, x, query)`` returns named maps of one of three kinds:
``channel`` (B, C) gates; ``spatial`` (B, h, w) masks; ``query`` (B, h, w) the attention weights of
one query position over the map (averaged over heads). ``query`` is (row, column) as fractions of the
map, so one setting picks the same image point at every block's resolution. Used by
``scripts/visualize_attention.py`` and ``scripts/excitation_analysis.py``; the blocks' forward passes
stay free of bookkeeping.
"""
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from models.attention.cbam import CBAM
from models.attention.coord import CoordAttention
from models.attention.criss_cross import CrissCrossAttention
from models.attention.danet import DualAttention
from models.attention.eca import ECA
from models.attention.gc import GlobalContext
from models.attention.mhsa import MultiHeadSelfAttention2d
from models.attention.non_local import NonLocal
from models.attention.outlook import Outlook, OutlookAttention
from models.attention.residual_attention import ResidualAttention
from models.attention.sasa import LocalSelfAttention
from models.attention.se import SqueezeExcite
from models.attention.stn import SpatialTransformer

Maps = dict[str, tuple[str, torch.Tensor]]


def query_index(h: int, w: int, query: tuple[float, float]) -> tuple[int, int]:
    """The map position nearest to ``query`` (row, column fractions in [0, 1])."""
    return min(h - 1, int(query[0] * h)), min(w - 1, int(query[1] * w))


def _se(block: SqueezeExcite, x: torch.Tensor, query) -> Maps:
    s = x if block.squeeze == "none" else (x.mean((2, 3), keepdim=True) if block.squeeze == "avg"
                                           else x.amax((2, 3), keepdim=True))
    gate = block.gate(block.fc2(block.act(block.fc1(s))))
    return {"channel gate": ("channel", gate.mean((2, 3)))}


def _eca(block: ECA, x: torch.Tensor, query) -> Maps:
    b, c = x.shape[:2]
    return {"channel gate": ("channel", torch.sigmoid(block.conv(x.mean((2, 3)).view(b, 1, c))).view(b, c))}


def _cbam(block: CBAM, x: torch.Tensor, query) -> Maps:
    channel = block.channel.gate(x)  # B, C, 1, 1
    maps = {"channel gate": ("channel", channel.flatten(1))}
    if not isinstance(block.spatial, nn.Identity):
        maps["spatial gate"] = ("spatial", block.spatial.gate(x * channel)[:, 0])
    return maps


def _coord(block: CoordAttention, x: torch.Tensor, query) -> Maps:
    a_h, a_w = block.gates(x)  # B, C, H, 1 and B, C, 1, W
    return {"a_h x a_w": ("spatial", (a_h * a_w).mean(1))}


def _residual_attention(block: ResidualAttention, x: torch.Tensor, query) -> Maps:
    return {"soft mask": ("spatial", block.mask(x).mean(1))}


def _stn(block: SpatialTransformer, x: torch.Tensor, query) -> Maps:
    """Where the sampling grid reads from: a histogram of its points over the input."""
    b, _, h, w = x.shape
    grid = F.affine_grid(block.theta(x).float(), [b, 1, h, w], align_corners=False)  # B, H, W, 2 in [-1, 1]
    cols = ((grid[..., 0] + 1) / 2 * w).floor().long()
    rows = ((grid[..., 1] + 1) / 2 * h).floor().long()
    inside = (cols >= 0) & (cols < w) & (rows >= 0) & (rows < h)
    density = torch.zeros(b, h * w, device=x.device)
    index = (rows.clamp(0, h - 1) * w + cols.clamp(0, w - 1)).flatten(1)
    density.scatter_add_(1, index, inside.flatten(1).float())
    return {"sampling grid": ("spatial", density.view(b, h, w))}


def _softmax_query(q: torch.Tensor, k: torch.Tensor, scale: float, shape: tuple[int, int]) -> torch.Tensor:
    """q: (B, heads, d) of one query, k: (B, heads, M, d) -> weights (B, *shape), heads averaged."""
    weights = torch.softmax(torch.einsum("bnd,bnmd->bnm", q, k) * scale, dim=-1).mean(1)
    return weights.view(-1, *shape)


def _non_local(block: NonLocal, x: torch.Tensor, query) -> Maps:
    b, _, h, w = x.shape
    i, j = query_index(h, w, query)
    if block.mode == "gaussian":
        q, k = x[:, :, i, j], block.pool(x)
    else:
        q, k = block.theta(x)[:, :, i, j], block.pool(block.phi(x))
    shape = k.shape[2:]
    k = k.flatten(2).transpose(1, 2)  # B, M, C'
    if block.mode in ("embedded_gaussian", "gaussian"):
        weights = _softmax_query(q[:, None], k[:, None], block.scale, shape)
    elif block.mode == "dot":
        weights = (k @ q[..., None]).view(b, *shape) / k.shape[1]
    else:
        wq, wk = block.concat_project.weight.flatten().chunk(2)
        weights = F.relu(q @ wq[:, None] + k @ wk[:, None]).view(b, *shape) / k.shape[1]
    return {"query attention": ("query", weights)}


def _criss_cross(block: CrissCrossAttention, x: torch.Tensor, query) -> Maps:
    """The first pass's weights of the query over its row and column (the self position counted once)."""
    b, _, h, w = x.shape
    i, j = query_index(h, w, query)
    q, k = block.query(x)[:, :, i, j], block.key(x)  # B, C'; B, C', H, W
    col = torch.einsum("bc,bch->bh", q, k[:, :, :, j])
    col[:, i] = float("-inf")
    row = torch.einsum("bc,bcw->bw", q, k[:, :, i, :])
    att = torch.softmax(torch.cat([col, row], dim=1), dim=1)
    weights = x.new_zeros(b, h, w)
    weights[:, :, j] += att[:, :h]
    weights[:, i, :] += att[:, h:]
    return {"query attention": ("query", weights)}


def _danet(block: DualAttention, x: torch.Tensor, query) -> Maps:
    b, _, h, w = x.shape
    i, j = query_index(h, w, query)
    q = block.pam.query(x)[:, :, i, j]
    k = block.pam.key(x).flatten(2).transpose(1, 2)
    return {"position attention": ("query", _softmax_query(q[:, None], k[:, None], 1.0, (h, w)))}


def _gc(block: GlobalContext, x: torch.Tensor, query) -> Maps:
    if block.conv_mask is None:
        return {}  # average pooling: every position weighs the same
    b, _, h, w = x.shape
    return {"context attention": ("spatial", torch.softmax(block.conv_mask(x).view(b, h * w), dim=1).view(b, h, w))}


def _mhsa(block: MultiHeadSelfAttention2d, x: torch.Tensor, query) -> Maps:
    b, _, h, w = x.shape
    i, j = query_index(h, w, query)
    qkv = block.qkv(x).reshape(b, 3, block.heads, block.dim, h * w).transpose(-1, -2)  # B, 3, n, HW, d
    q, k = qkv[:, 0], qkv[:, 1]
    scale = block.dim ** -0.5
    logits = torch.einsum("bnd,bnmd->bnm", q[:, :, i * w + j] * scale, k)
    if block.rel_h is not None:
        logits = logits + block.position_bias(q * scale, h, w)[:, :, i * w + j]
    return {"query attention": ("query", torch.softmax(logits, dim=-1).mean(1).view(b, h, w))}


def _sasa(block: LocalSelfAttention, x: torch.Tensor, query) -> Maps:
    """The query's weights over its k x k window, placed on the map (zero elsewhere)."""
    b, _, h, w = x.shape
    i, j = query_index(h, w, query)
    n, d, k = block.heads, block.dim, block.k
    q = (block.q(x)[:, :, i, j] * d ** -0.5).view(b, n, d)
    keys = F.pad(block.kv(x)[:, : n * d], (k // 2,) * 4)[:, :, i:i + k, j:j + k].reshape(b, n, d, k * k)
    rel = torch.cat([block.rel_row.unsqueeze(2).expand(-1, -1, k).reshape(d // 2, k * k),
                     block.rel_col.unsqueeze(1).expand(-1, k, -1).reshape(d // 2, k * k)])
    logits = torch.einsum("bnd,bndk->bnk", q, keys + rel)
    rows, cols = torch.meshgrid(torch.arange(k) + i - k // 2, torch.arange(k) + j - k // 2, indexing="ij")
    inside = ((rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)).flatten().to(x.device)
    att = torch.softmax(logits.masked_fill(~inside, float("-inf")), dim=-1).mean(1)  # B, k*k
    weights = x.new_zeros(b, h + k - 1, w + k - 1)
    weights[:, i:i + k, j:j + k] = att.view(b, k, k)
    return {"query attention": ("query", weights[:, k // 2:k // 2 + h, k // 2:k // 2 + w])}


def _outlook_tokens(attention: OutlookAttention, tokens: torch.Tensor, query) -> Maps:
    """For the window holding the query, its centre output's K x K weights over the window's inputs."""
    b, h, w, _ = tokens.shape
    i, j = query_index(h, w, query)
    k, s, p = attention.k, attention.stride, attention.padding
    gi, gj = i // s, j // s  # the window whose stride cell holds the query
    centre = F.avg_pool2d(tokens.permute(0, 3, 1, 2), s, s, ceil_mode=True)[:, :, gi, gj]  # B, C
    a = attention.attn(centre).view(b, attention.heads, k * k, k * k)
    a = torch.softmax(a * attention.scale, dim=-1)[:, :, (k * k) // 2].mean(1)  # the centre output: B, K*K
    weights = tokens.new_zeros(b, h + 2 * p + k, w + 2 * p + k)
    weights[:, gi * s:gi * s + k, gj * s:gj * s + k] = a.view(b, k, k)
    return {"query attention": ("query", weights[:, p:p + h, p:p + w])}


def _outlook(block: Outlook, x: torch.Tensor, query) -> Maps:
    return _outlook_tokens(block.attention, block.norm(x.permute(0, 2, 3, 1)), query)


# Blocks whose maps include a "channel gate" (what the SE paper's excitation analysis reads).
CHANNEL_GATES = (SqueezeExcite, ECA, CBAM)

PROBES: dict[type[nn.Module], Callable[..., Maps]] = {
    SqueezeExcite: _se, ECA: _eca, CBAM: _cbam, CoordAttention: _coord,
    ResidualAttention: _residual_attention, SpatialTransformer: _stn, NonLocal: _non_local,
    CrissCrossAttention: _criss_cross, DualAttention: _danet, GlobalContext: _gc,
    MultiHeadSelfAttention2d: _mhsa, LocalSelfAttention: _sasa, Outlook: _outlook, OutlookAttention: _outlook_tokens,
}


@torch.no_grad()
def attention_maps(block: nn.Module, x: torch.Tensor, query: tuple[float, float] = (0.5, 0.5)) -> Maps:
    """The block's maps for input ``x`` ((B, C, H, W); (B, H, W, C) tokens for ``OutlookAttention``).

    Blocks without a probe (SimAM, triplet attention) return no maps.
    """
    probe = PROBES.get(type(block))
    return probe(block, x, query) if probe is not None else {}


__all__ = ["CHANNEL_GATES", "PROBES", "attention_maps", "query_index"]
