"""What every attention block shares: where it may go, its paper's init, what it attends to, its timm twin."""
import torch
from torch import nn

# A block at one of these maps a (B, C, H, W) feature map to one of the same shape.
MAP_POSITIONS = frozenset({"standard", "pre", "post", "identity", "after_spatial", "spatial_prenorm", "input",
                           "stem", "head"})
# A block here replaces a unit's spatial conv: it takes (in_channels, out_channels, stride) like the conv.
SPATIAL_POSITIONS = frozenset({"replace_spatial"})

# Named maps: name -> (kind, tensor). Kinds: "channel" (B, C) gates; "spatial" (B, h, w) masks;
# "query" (B, h, w) the attention weights of one query position over the map, averaged over heads.
Maps = dict[str, tuple[str, torch.Tensor]]


def require_positive(**arguments: int | None) -> None:
    """ValueError naming the first argument that is not an integer >= 1 (None: left to the block's own rule)."""
    for name, value in arguments.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name}={value!r} must be an integer >= 1")


def bottleneck_width(channels: int, reduction: int) -> int:
    """``C // r``, at least 1: the SE paper's CIFAR ResNets keep one hidden unit in their 16-channel stage
    at r = 32 (SE, CBAM and GC all floor their bottleneck so, and every r runs on every backbone)."""
    return max(1, channels // reduction)


def conv_bn_act(in_channels: int, out_channels: int, activation: nn.Module, kernel: int = 3, stride: int = 1,
                groups: int = 1) -> nn.Sequential:
    """Conv (no bias, "same" padding) + BN + ``activation``: the heads' layers and the mobile nets' basic layer."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels), activation,
    )


def query_index(h: int, w: int, query: tuple[float, float]) -> tuple[int, int]:
    """The map position nearest to ``query`` (row, column fractions in [0, 1])."""
    return min(h - 1, int(query[0] * h)), min(w - 1, int(query[1] * w))


class AttentionBlock(nn.Module):
    """Base of the registered blocks: placement, paper init, maps and the timm twin, each with a default.

    Subclasses set ``default_position`` (where ``position: default`` puts them), ``is_gate = True`` for
    a gate (a block that rescales its input, placed where the backbone puts gates when it has such a
    place: see ``models.placement``) and, when they replace a spatial conv, ``positions = SPATIAL_POSITIONS``.
    """

    positions: frozenset[str] = MAP_POSITIONS
    default_position: str = "standard"
    is_gate: bool = False
    # At position ``head`` a block builds ``head_class`` (its paper's head, taking the same arguments and
    # declaring ``out_channels``) where it has one, else itself.
    head_class: type[nn.Module] | None = None
    # Where ``position: default`` goes on a backbone that lacks ``default_position`` (VOLO has no head).
    fallback_position: str | None = None
    # backbone name -> where this gate's official code puts it there, in every unit; it overrides the
    # backbone's own gate place (the mobile nets put the other gates after the depthwise conv).
    official_places: dict[str, str] = {}

    def init_weights(self) -> None:
        """Re-apply the paper's own init of this block (backbones call it after their init loop); none here."""

    def attention_maps(self, x: torch.Tensor, query: tuple[float, float] = (0.5, 0.5)) -> Maps:
        """What the block attends to for input ``x``, computed by the code its forward runs; none here.

        ``query`` (row, column fractions) picks the query position of ``query`` maps.
        """
        return {}

    def timm_twin(self) -> nn.Module | None:
        """timm's module computing the same function, holding this block's weights; None when timm has none."""
        return None

    def _loaded_twin(self, twin: nn.Module, state: dict[str, torch.Tensor] | None = None) -> nn.Module:
        """``twin`` holding ``state`` (default: this block's state dict), on this block's device, dtype and mode."""
        twin.load_state_dict(self.state_dict() if state is None else state)
        like = next(self.parameters(), None)
        if like is not None:
            twin.to(device=like.device, dtype=like.dtype)
        return twin.train(self.training)
