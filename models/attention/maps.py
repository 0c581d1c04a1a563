"""What the attention blocks attend to: each block's own ``attention_maps``, found and called here.

``attention_maps(block, x, query)`` returns named maps of one of three kinds: ``channel`` (B, C)
gates; ``spatial`` (B, h, w) masks; ``query`` (B, h, w) the attention weights of one query position
over the map (averaged over heads). ``query`` is (row, column) as fractions of the map, so one
setting picks the same image point at every block's resolution. Each block computes its maps with
the methods its forward runs (``models/attention/base.py``), so the forward passes stay free of
bookkeeping. Used by ``engine/visualize.py`` and ``scripts/excitation_analysis.py``.
"""
import torch
from torch import nn

from models.attention.base import AttentionBlock, Maps, query_index


def has_maps(module: nn.Module) -> bool:
    """Whether ``module`` is an attention block whose class computes maps (overrides the base's none)."""
    return isinstance(module, AttentionBlock) and type(module).attention_maps is not AttentionBlock.attention_maps


def blocks_with_maps(model: nn.Module) -> list[tuple[str, AttentionBlock]]:
    """The (name, block) pairs of ``model``'s modules that have maps, in ``named_modules`` order."""
    return [(name, module) for name, module in model.named_modules() if has_maps(module)]


@torch.no_grad()
def attention_maps(block: nn.Module, x: torch.Tensor, query: tuple[float, float] = (0.5, 0.5)) -> Maps:
    """The block's maps for its input ``x`` ((B, C, H, W); (B, H, W, C) tokens for ``OutlookAttention``).

    Modules that are not attention blocks, and blocks without maps (SimAM, triplet attention), give none.
    """
    return block.attention_maps(x, query) if isinstance(block, AttentionBlock) else {}


__all__ = ["Maps", "attention_maps", "blocks_with_maps", "has_maps", "query_index"]
