"""Attention blocks, one per file, and the registry that maps config names to them."""
from models.attention.base import AttentionBlock
from models.attention.cbam import CBAM
from models.attention.coord import CoordAttention
from models.attention.criss_cross import CrissCrossAttention
from models.attention.danet import DualAttention
from models.attention.eca import ECA
from models.attention.gc import GlobalContext
from models.attention.mhsa import MultiHeadSelfAttention2d
from models.attention.non_local import NonLocal
from models.attention.outlook import Outlook
from models.attention.residual_attention import ResidualAttention
from models.attention.sasa import LocalSelfAttention
from models.attention.simam import SimAM
from models.attention.se import SqueezeExcite
from models.attention.stn import SpatialTransformer
from models.attention.triplet import TripletAttention

# The only place a config name becomes a class. `none` is handled by the spec parser.
ATTENTION_BLOCKS = {
    "se": SqueezeExcite,
    "cbam": CBAM,
    "eca": ECA,
    "coord": CoordAttention,
    "gc": GlobalContext,
    "nonlocal": NonLocal,
    "criss_cross": CrissCrossAttention,
    "danet": DualAttention,
    "residual_attention": ResidualAttention,
    "stn": SpatialTransformer,
    "mhsa": MultiHeadSelfAttention2d,
    "sasa": LocalSelfAttention,
    "outlook": Outlook,
    "simam": SimAM,
    "triplet": TripletAttention,
}

__all__ = ["ATTENTION_BLOCKS", "AttentionBlock", *(cls.__name__ for cls in ATTENTION_BLOCKS.values())]
