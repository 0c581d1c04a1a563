"""Attention specs from config, validated and resolved into a plan that backbones query.

A spec says *which* block (``name`` plus its own hyper-parameters) goes *where*: ``stages``
(1-based, negative from the end, ``all`` by default), ``position`` (a role name, see ``POSITIONS``),
``every`` (every N-th unit of those stages, counting the N-th, 2N-th, ...) or ``units`` (explicit
1-based unit numbers within each chosen stage, negative from the stage's end: the non-local paper's
placements), and ``by_stage`` (per-stage values of the block's own hyper-parameters, one per stage
of the backbone: ECA-Net50's kernel sizes 3, 5, 5, 7).

``position: default`` puts a *gate* block (SE, CBAM, ECA, GC, CA, SimAM, triplet: ``is_gate = True``)
where the backbone puts gates (after the depthwise conv on the mobile nets, as the coordinate
attention paper compares them), or at the block's own ``default_position`` on backbones that leave
it to the block (the ResNets). A gate whose official code places it on a backbone (``official_places``:
SimAM and triplet on MobileNetV2) goes there instead, in every unit. Blocks whose paper fixes their place (STN, non-local, MHSA, SASA,
the heads) always go to their own ``default_position``.
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
    "spatial_prenorm": "after the unit's last spatial conv, before its norm",
    "input": "once, on the input image, before the stem",
    "stem": "once, after the stem",
    "head": "once, on the last feature map, before pooling (the classifier is built on the head's output width)",
}
ONCE = ("input", "stem", "head")  # positions outside the stages: one block each, whatever ``stages`` says
SPEC_KEYS = ("name", "stages", "position", "every", "units", "by_stage")

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
    units: tuple[int, ...] | None = None  # 1-based unit numbers within each chosen stage; None: by ``every``
    by_stage: Mapping[str, tuple[Any, ...]] = dataclasses.field(default_factory=dict)

    def factory(self, stage: int | None = None, num_stages: int | None = None, head: bool = False) -> Factory:
        """A callable from the backbone's shape arguments to a fresh block, with stage ``stage``'s values.

        ``head``: the block's paper head (``head_class``) where it has one. A hyper-parameter left null
        takes the block's ``stage_defaults(stage, num_stages)`` there. A block's ValueError about its own
        arguments becomes a ConfigError naming the config key.
        """
        kwargs = dict(self.kwargs)
        if stage is not None:
            kwargs.update({key: values[stage - 1] for key, values in self.by_stage.items()})
            stage_defaults = getattr(self.block, "stage_defaults", None)
            if stage_defaults is not None and num_stages is not None:
                kwargs.update({k: v for k, v in stage_defaults(stage, num_stages).items() if kwargs.get(k) is None})
        build = (getattr(self.block, "head_class", None) or self.block) if head else self.block
        return functools.partial(_build_block, self, build, kwargs)

    def places(self, stage: int, index: int, depth: int) -> bool:
        """Whether this spec puts a block in unit ``index`` (0-based) of ``stage``, which has ``depth`` units."""
        if self.stages is not None and stage not in self.stages:
            return False
        if self.units is not None:
            return any(index == (u - 1 if u > 0 else depth + u) for u in self.units)
        return index % self.every == self.every - 1


def _build_block(spec: AttentionSpec, build: Callable[..., nn.Module], kwargs: Mapping[str, Any],
                 *shape: Any) -> nn.Module:
    """``build`` (``spec``'s block or its head) with hyper-parameters ``kwargs`` for the backbone's ``shape``."""
    try:
        return build(*shape, **kwargs)
    except ConfigError:
        raise
    except ValueError as e:
        key = str(e).split("=", 1)[0]
        where = f"{spec.where}.by_stage" if key in spec.by_stage else spec.where  # the key the user wrote
        raise ConfigError(config_message(where, str(e))) from None


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
    units = raw.pop("units", None)
    by_stage = raw.pop("by_stage", None)
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
    by_stage = _parse_by_stage(by_stage, where)
    unknown = sorted(set(by_stage) - set(hyper))
    if unknown:
        raise ConfigError(
            f"{where}.by_stage ({name}): unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(hyper)}"
        )
    if position != "default" and position not in POSITIONS:
        raise ConfigError(
            f"{where}.position={position} is not allowed: unknown position '{position}'; "
            f"valid positions: default, {', '.join(POSITIONS)}"
        )
    if not isinstance(every, int) or every < 1:
        raise ConfigError(f"{where} ({name}): every={every!r} must be an integer >= 1")
    if units is not None:
        units = _parse_units(units, where)
        if every != 1:
            raise ConfigError(f"{where}.units={_typed(units)} is not allowed with every={every}: "
                              f"set {where}.every=1 or remove {where}.units")
    return AttentionSpec(name, block, raw, _parse_stages(stages, where, name), position, every, where, units,
                         by_stage)


def _nonzero_numbers(value: Any) -> tuple[int, ...] | None:
    """An int or a non-empty list of non-zero ints as a tuple (stage or unit numbers); None for anything else."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, Sequence) or isinstance(value, str) or not value or not all(
        isinstance(v, int) and not isinstance(v, bool) and v != 0 for v in value
    ):
        return None
    return tuple(value)


def _typed(values: Sequence[Any]) -> str:
    """A list as the user types it on the command line: ``[3,5,5,7]``."""
    return "[" + ",".join(str(v) for v in values) + "]"


def _parse_units(units: Any, where: str) -> tuple[int, ...]:
    """A non-empty list of non-zero unit numbers (1-based, negative from the stage's end) as a tuple."""
    parsed = _nonzero_numbers(units)
    if parsed is None:
        raise ConfigError(
            f"{where}.units={units!r} is not allowed: use a list of 1-based unit numbers within each chosen "
            "stage (negative counts from the stage's end: -1 is its last unit)"
        )
    return parsed


def _parse_by_stage(by_stage: Any, where: str) -> dict[str, tuple[Any, ...]]:
    """``{hyper-parameter: [one value per stage]}`` (or null) with the lists as tuples."""
    if by_stage is None:
        return {}
    if not isinstance(by_stage, Mapping) or not all(
        isinstance(v, Sequence) and not isinstance(v, str) and len(v) > 0 for v in by_stage.values()
    ):
        raise ConfigError(
            f"{where}.by_stage={by_stage!r} is not allowed: use {{key: [one value per stage]}}, "
            "e.g. by_stage: {kernel_size: [3, 5, 5, 7]}"
        )
    return {key: tuple(values) for key, values in by_stage.items()}


def _parse_stages(stages: Any, where: str, name: str) -> tuple[int, ...] | None:
    """Turn ``all``, an int or a list of ints into a tuple of 1-based stage indices."""
    if stages == "all":
        return None
    parsed = _nonzero_numbers(stages)
    if parsed is None:
        raise ConfigError(
            f"{where} ({name}): stages={stages!r} must be 'all' or a list of 1-based stage numbers "
            "(negative counts from the end: -1 is the last stage)"
        )
    return parsed


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
        gate_position: where ``position: default`` puts gate blocks on this backbone; None leaves
            them at their own ``default_position``.
    """

    def __init__(
        self,
        specs: Sequence[AttentionSpec],
        backbone: str,
        stage_depths: Sequence[int],
        positions: Collection[str],
        gate_position: str | None = None,
    ):
        self.stage_depths = tuple(stage_depths)
        # (spec with resolved stages, its position, whether it sits at the backbone's gate place by default)
        self.entries = [self._resolve(spec, backbone, positions, gate_position) for spec in specs]
        for stage, depth in enumerate(stage_depths, start=1):
            for index in range(depth):
                self.unit(stage, index)  # raises now, not halfway through the build

    def _resolve(self, spec: AttentionSpec, backbone: str, positions: Collection[str],
                 gate_position: str | None) -> tuple[AttentionSpec, str, bool]:
        """``spec`` checked against this backbone, with its stages made positive, and where it goes."""
        at_gate_place = spec.position == "default" and bool(gate_position) and getattr(spec.block, "is_gate", False)
        position = spec.position
        official = getattr(spec.block, "official_places", {}).get(backbone)
        if at_gate_place and official:  # the block's own code on this backbone, in every unit
            position, at_gate_place = official, False
        elif at_gate_place:
            position = gate_position
        accepted = sorted(set(positions) & set(spec.block.positions))
        if position == "default":
            position = getattr(spec.block, "default_position", "standard")
            if position not in accepted:  # a head block on a backbone without a feature-map head (VOLO)
                position = getattr(spec.block, "fallback_position", None) or position
        if position not in accepted:
            raise ConfigError(
                f"{spec.where}.position={spec.position} is not allowed: '{spec.name}' cannot go at position "
                f"'{position}' on {backbone}; valid positions: {', '.join(accepted)}"
            )
        n = len(self.stage_depths)
        bad = [s for s in spec.stages or () if not -n <= s <= n]
        if bad:
            raise ConfigError(
                f"{spec.where}.stages={list(spec.stages)} is not allowed: {backbone} has no stage {bad[0]}; "
                f"valid stages: 1..{n}, -{n}..-1 (from the end) or 'all'"
            )
        if spec.by_stage and position in ONCE:
            raise ConfigError(f"{spec.where}.by_stage is not allowed at position {position}: it is in no stage; "
                              f"give the value itself (e.g. {spec.where}.{next(iter(spec.by_stage))}=...)")
        for key, values in spec.by_stage.items():
            if len(values) != n:
                raise ConfigError(
                    f"{spec.where}.by_stage.{key}={_typed(values)} is not allowed: {backbone} has {n} stages; "
                    "give one value per stage"
                )
        if spec.stages is not None:
            spec = dataclasses.replace(spec, stages=tuple(sorted({s if s > 0 else n + 1 + s for s in spec.stages})))
        for stage in spec.stages or range(1, n + 1):
            depth = self.stage_depths[stage - 1]
            outside = [u for u in spec.units or () if not -depth <= u <= depth]
            if outside:
                raise ConfigError(
                    f"{spec.where}.units={_typed(spec.units)} is not allowed: stage {stage} of {backbone} has no "
                    f"unit {outside[0]}; valid units there: 1..{depth}, -{depth}..-1 (from the stage's end)"
                )
        return spec, position, at_gate_place

    def unit(self, stage: int, index: int, gates_by_default: bool = True) -> dict[str, Factory]:
        """Factories by position for unit ``index`` (0-based) of ``stage`` (1-based).

        ``gates_by_default=False`` leaves out the gates that ``position: default`` put at the backbone's
        gate place, for units where the paper's placement has none (MobileNetV2's unit without expansion).
        """
        chosen: dict[str, list[Factory]] = {}
        depth = self.stage_depths[stage - 1]
        for spec, position, at_gate_place in self.entries:
            if position in ONCE or (at_gate_place and not gates_by_default):
                continue
            if spec.places(stage, index, depth):
                chosen.setdefault(position, []).append(spec.factory(stage, len(self.stage_depths)))
        if len(chosen.get("replace_spatial", [])) > 1:
            raise ConfigError(
                f"stage {stage} unit {index + 1}: two specs replace the same spatial conv; "
                "give them disjoint stages"
            )
        return {position: _chain(factories) for position, factories in chosen.items()}

    def stem(self) -> Factory | None:
        """The factory for the block after the stem, if any spec asks for one."""
        factories = [spec.factory() for spec, position, _ in self.entries if position == "stem"]
        return _chain(factories) if factories else None

    def input(self) -> Factory | None:
        """The factory for the block on the input image, if any spec asks for one."""
        factories = [spec.factory() for spec, position, _ in self.entries if position == "input"]
        return _chain(factories) if factories else None

    def head(self) -> list[Factory]:
        """The factories of the blocks on the last feature map, in spec order (a block's paper head where it
        has one); each takes the width the one before it produces."""
        return [spec.factory(head=True) for spec, position, _ in self.entries if position == "head"]
