"""Attention blocks, one per file, and the registry that maps config names to them."""
from models.attention.se import SqueezeExcite

# The only place a config name becomes a class. `none` is handled by the spec parser.
ATTENTION_BLOCKS = {
    "se": SqueezeExcite,
}

__all__ = ["ATTENTION_BLOCKS", "SqueezeExcite"]
