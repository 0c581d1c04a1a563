"""Layers every backbone shares: a unit's attention slots, the stage builder, the pooled head and the inits.

A backbone describes its units (which positions they offer and at what width); these helpers turn the
attention plan into modules, so placement rules live here once and not in every unit class.
"""
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from choices import STEMS
from models.attention.base import AttentionBlock, conv_bn_act

Factory = Callable[..., nn.Module]


class OnTokens(nn.Module):
    """Runs a (B, C, H, W) module on (B, H, W, C) tokens."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, C) -> (B, H', W', C')."""
        return self.module(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class AttentionSlots:
    """A unit's attention blocks, built from the plan's factories at the widths the unit gives.

    Args:
        factories: the plan's factories for this unit, by position (``AttentionPlan.unit``).
        shortcut: whether the unit has a shortcut; without one, ``identity`` gets no block.
        tokens: the unit runs on (B, H, W, C) tokens: every block is wrapped in ``OnTokens``.
    """

    def __init__(self, factories: Mapping[str, Factory] | None = None, shortcut: bool = True,
                 tokens: bool = False):
        self.factories = dict(factories or {})
        if not shortcut:
            self.factories.pop("identity", None)
        self.tokens = tokens

    def _wrap(self, block: nn.Module) -> nn.Module:
        """The block as the unit runs it (on tokens where the unit's tensors are tokens)."""
        return OnTokens(block) if self.tokens else block

    def at(self, position: str, channels: int) -> nn.Module:
        """The block placed at ``position`` built for ``channels``, or an identity where none is placed."""
        factory = self.factories.get(position)
        return self._wrap(factory(channels)) if factory is not None else nn.Identity()

    def spatial(self, in_channels: int, out_channels: int, stride: int,
                default: Callable[[], nn.Module]) -> nn.Module:
        """The unit's spatial op: ``default()``, or the ``replace_spatial`` block of the same shape."""
        factory = self.factories.get("replace_spatial")
        if factory is None:
            return default()
        return self._wrap(factory(in_channels, out_channels, stride))


def check_stem(kind: str) -> None:
    """Refuse a ``model.stem`` that is neither stem every backbone has."""
    if kind not in STEMS:
        raise ValueError(f"stem='{kind}' is not a stem; valid stems: {', '.join(STEMS)}")


def stem_slot(factory: Factory | None, channels: int, tokens: bool = False) -> nn.Module:
    """The block after the stem (``AttentionPlan.stem()``'s factory) at ``channels``, or an identity."""
    return AttentionSlots({"stem": factory} if factory is not None else None, tokens=tokens).at("stem", channels)


def build_stages(depths: Sequence[int], in_channels: int, make_unit: Callable[[int, int, int], nn.Module],
                 make_transition: Callable[[int, int], nn.Module | None] | None = None
                 ) -> tuple[list[nn.Sequential], dict[int, nn.Module], int]:
    """Stage s (1-based) of ``depths[s - 1]`` units, unit i built by ``make_unit(s, i, in_channels)``.

    ``make_transition(s, in_channels)``, where given, builds what runs before stage s > 1 (VOLO's
    downsample), or None. Modules are built in network order (so initial weights follow it) and each
    declares ``out_channels``, the next one's input width. Returns the stages, the transitions by the
    stage they lead into, and the last unit's width.
    """
    stages, transitions, channels = [], {}, in_channels
    for s, depth in enumerate(depths, start=1):
        transition = make_transition(s, channels) if make_transition is not None and s > 1 else None
        if transition is not None:
            transitions[s] = transition
            channels = transition.out_channels
        units = []
        for i in range(depth):
            unit = make_unit(s, i, channels)
            channels = unit.out_channels
            units.append(unit)
        stages.append(nn.Sequential(*units))
    return stages, transitions, channels


def restore_block_inits(model: nn.Module) -> None:
    """After a backbone's init loop: attention blocks whose paper fixes an init (zero gamma, zero conv) redo it."""
    for m in model.modules():
        if isinstance(m, AttentionBlock):
            m.init_weights()


def conv_bn_relu6(in_channels: int, out_channels: int, kernel: int = 1, stride: int = 1,
                  groups: int = 1) -> nn.Sequential:
    """Conv (no bias) + BN + ReLU6, the mobile networks' basic layer."""
    return conv_bn_act(in_channels, out_channels, nn.ReLU6(inplace=True), kernel, stride, groups)


def init_mobile_weights(model: nn.Module, classifier: nn.Linear) -> None:
    """torchvision's MobileNetV2 init (also the MobileNeXt code's), then blocks' own paper inits.

    Kaiming-normal (fan_out) convs, unit norms, N(0, 0.01) classifier; attention blocks' linear
    layers keep PyTorch's default init unless the block defines ``init_weights``.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    init_small_normal(classifier)
    restore_block_inits(model)


def init_small_normal(linear: nn.Linear) -> None:
    """N(0, 0.01) weights and zero bias: the mobile networks' classifier init."""
    nn.init.normal_(linear.weight, 0, 0.01)
    nn.init.zeros_(linear.bias)
