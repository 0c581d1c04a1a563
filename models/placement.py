"""Attention specs from config, validated and resolved into a plan that backbones query.

A spec says *which* block (``name`` plus its own hyper-parameters) goes *where*: ``stages``
(1-based, negative from the end, ``all`` by default), ``position`` (a role name, see ``POSITIONS``) and ``every`` (every
N-th unit of those stages, counting the N-th, 2N-th, ... as the non-local paper does).
"""
import dataclasses
import functools
import inspect
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from errors import ConfigError, config_message
from models.attention import ATTENTION_BLOCKS

# Role names that mean the same on every backbone.
POSITIONS = {
    "standard": "end of the residual branch, before the add",
    "pre": "on the residual branch's input (the shortcut sees the ungated input)",
    "post": "on the unit's output: after the add and its activation where it has them",
    "identity": "on the shortcut",
    "after_spatial": "after the unit's first spatial conv (with its norm and activation)",
    "replace_spatial": "replaces that spatial conv; takes in_channels, out_channels, stride",
    "stem": "once, after the stem",
}
SPEC_KEYS = ("name", "stages", "position", "every")

Factory = Callable[..., nn.Module]


@dataclass(frozen=True)
class AttentionSpec:
    """One validated attention spec: a block class, its hyper-parameters and where it goes."""

    name: str
    block: type[nn.Module]
    kwargs: Mapping[str, Any]
    stages: tuple[int, ...] | None  # None means every stage; negative counts from the last
    position: str  # a POSITIONS key, or "default"
    every: int = 1
    where: str = "attention"  # the config key the spec came from

    def factory(self) -> Factory:
        """A callable taking the backbone's shape arguments and returning a fresh block; a block's
        ValueError about its own arguments becomes a ConfigError naming the config key."""
        return functools.partial(_build_block, self)


def _build_block(spec: AttentionSpec, *shape: Any) -> nn.Module:
    """``spec``'s block for the backbone's ``shape`` arguments."""
    try:
        return spec.block(*shape, **spec.kwargs)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(config_message(spec.where, str(e))) from None


def block_hyperparameters(block: type[nn.Module]) -> list[str]:
    """The keyword arguments a block accepts from config.

    The backbone fills in the shape arguments: ``channels`` (the first argument), or
    ``in_channels, out_channels, stride`` (the first three) for blocks that replace a spatial conv.
    """
    params = [p for p in inspect.signature(block.__init__).parameters if p != "self"]
    return params[3:] if "replace_spatial" in block.positions else params[1:]


def parse_attention_spec(raw: Mapping[str, Any], where: str = "attention") -> AttentionSpec | None:
    """Validate one spec from config; returns None for ``name: none``.

    Args:
        raw: mapping with ``name``, the block's hyper-parameters and the placement keys.
        where: the config key the spec came from, used in error messages.
    """
    raw = dict(raw)
    name = raw.pop("name", None)
    valid_names = ["none", *ATTENTION_BLOCKS]
    if name is None:
        raise ConfigError(f"{where}: a spec needs a 'name'; valid names: {', '.join(valid_names)}")
    stages = raw.pop("stages", "all")
    position = raw.pop("position", "default")
    every = raw.pop("every", 1)
    if name == "none":
        return None
    if name not in ATTENTION_BLOCKS:
        raise ConfigError(
            f"{where}: unknown attention block '{name}'; valid names: {', '.join(valid_names)}"
        )
    block = ATTENTION_BLOCKS[name]
    hyper = block_hyperparameters(block)
    unknown = sorted(set(raw) - set(hyper))
    if unknown:
        raise ConfigError(
            f"{where} ({name}): unknown key(s) {', '.join(unknown)}; "
            f"valid keys: {', '.join([*SPEC_KEYS, *hyper])}"
        )
    if position != "default" and position not in POSITIONS:
        raise ConfigError(
            f"{where}.position={position} is not allowed: unknown position '{position}'; "
            f"valid positions: default, {', '.join(POSITIONS)}"
        )
    if not isinstance(every, int) or every < 1:
        raise ConfigError(f"{where} ({name}): every={every!r} must be an integer >= 1")
    return AttentionSpec(name, block, raw, _parse_stages(stages, where, name), position, every, where)


def _parse_stages(stages: Any, where: str, name: str) -> tuple[int, ...] | None:
    """Turn ``all``, an int or a list of ints into a tuple of 1-based stage indices."""
    if stages == "all":
        return None
    if isinstance(stages, int) and not isinstance(stages, bool):
        stages = [stages]
    if not isinstance(stages, Sequence) or isinstance(stages, str) or not stages or not all(
        isinstance(s, int) and not isinstance(s, bool) and s != 0 for s in stages
    ):
        raise ConfigError(
            f"{where} ({name}): stages={stages!r} must be 'all' or a list of 1-based stage numbers "
            "(negative counts from the end: -1 is the last stage)"
        )
    return tuple(stages)


def parse_attention_specs(attention: Mapping, extra: Sequence[Mapping] = ()) -> list[AttentionSpec]:
    """Parse the ``attention`` spec and the ``attention_extra`` list, dropping ``none``."""
    specs = [parse_attention_spec(attention, "attention")]
    specs += [parse_attention_spec(s, f"attention_extra[{i}]") for i, s in enumerate(extra)]
    return [s for s in specs if s is not None]


def _chain(factories: list[Factory]) -> Factory:
    """Compose several factories at one position into one, applied in spec order."""
    if len(factories) == 1:
        return factories[0]
    return lambda *args: nn.Sequential(*(f(*args) for f in factories))


class AttentionPlan:
    """Resolved placement: which block factory goes at which (stage, unit, position).

    Args:
        specs: parsed specs, in order (``attention`` first, then ``attention_extra``).
        backbone: the backbone's name, for error messages.
        stage_depths: number of units in each stage; stages are 1-based indices into it.
        positions: the positions this backbone's units offer.
        default_position: where a spec with ``position: default`` goes when its block names none.
    """

    def __init__(
        self,
        specs: Sequence[AttentionSpec],
        backbone: str,
        stage_depths: Sequence[int],
        positions: Collection[str],
        default_position: str = "standard",
    ):
        self.entries: list[tuple[AttentionSpec, str]] = []
        for spec in specs:
            position = spec.position
            if position == "default":
                position = getattr(spec.block, "default_position", None) or default_position
            accepted = sorted(set(positions) & set(spec.block.positions))
            if position not in accepted:
                raise ConfigError(
                    f"{spec.where}.position={spec.position} is not allowed: '{spec.name}' cannot go at position "
                    f"'{position}' on {backbone}; valid positions: {', '.join(accepted)}"
                )
            n = len(stage_depths)
            bad = [s for s in spec.stages or () if not -n <= s <= n]
            if bad:
                raise ConfigError(
                    f"{spec.where}.stages={list(spec.stages)} is not allowed: {backbone} has no stage {bad[0]}; "
                    f"valid stages: 1..{n}, -{n}..-1 (from the end) or 'all'"
                )
            if spec.stages is not None:
                resolved = tuple(sorted({s if s > 0 else n + 1 + s for s in spec.stages}))
                spec = dataclasses.replace(spec, stages=resolved)
            self.entries.append((spec, position))
        for stage, depth in enumerate(stage_depths, start=1):
            for index in range(depth):
                self.unit(stage, index)  # raises now, not halfway through the build

    def unit(self, stage: int, index: int, use_defaults: bool = True) -> dict[str, Factory]:
        """Factories by position for unit ``index`` (0-based) of ``stage`` (1-based).

        ``use_defaults=False`` leaves out specs placed by ``position: default``, for units where the
        paper's default placement has no block (MobileNetV2's unit without expansion).
        """
        chosen: dict[str, list[Factory]] = {}
        for spec, position in self.entries:
            if position == "stem" or (spec.stages is not None and stage not in spec.stages):
                continue
            if spec.position == "default" and not use_defaults:
                continue
            if index % spec.every == spec.every - 1:
                chosen.setdefault(position, []).append(spec.factory())
        if len(chosen.get("replace_spatial", [])) > 1:
            raise ConfigError(
                f"stage {stage} unit {index + 1}: two specs replace the same spatial conv; "
                "give them disjoint stages"
            )
        return {position: _chain(factories) for position, factories in chosen.items()}

    def stem(self) -> Factory | None:
        """The factory for the block after the stem, if any spec asks for one."""
        factories = [spec.factory() for spec, position in self.entries if position == "stem"]
        return _chain(factories) if factories else None
