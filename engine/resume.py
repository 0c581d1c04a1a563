"""What a resume may change: the config a run resumes with is the config it started with, key by key.

A checkpoint stores the resolved config it was trained with. On resume the new config is compared with it:
keys that do not change what is computed are free (logged), keys that change only the arithmetic's rounding
are allowed and logged as no longer bit-exact, ``trainer.epochs`` may grow where the schedule's shape does
not depend on the run's length, and any other difference is refused in one line before anything is built.
"""
import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from engine.config import DataConfig, OptimConfig, SchedConfig, TrainerConfig
from errors import ConfigError

log = logging.getLogger("attnlab")

# Keys that change how a run is watched or fed, not what it computes.
FREE_KEYS = frozenset({
    "trainer.progress", "trainer.log_interval", "trainer.checkpoint_every_steps", "trainer.attention_maps",
    "trainer.dist_timeout_s", "trainer.on_nonfinite", "trainer.resume", "trainer.stop_after_epochs",
    "trainer.init_from", "trainer.new_head", "model.pretrained",  # a resume wins over both: neither is read
    "data.num_workers", "data.root", "data.download", "data.eval_batch_size",
})
FREE_PREFIXES = ("paper",)  # the recipe's published numbers, carried beside the config
# Keys that change kernels or memory layout: the same computation, rounded differently.
NOT_BIT_EXACT_KEYS = frozenset({"trainer.device", "trainer.compile", "trainer.channels_last", "data.decode",
                                "data.in_memory"})
# Schedules whose lr at a step does not depend on the total number of epochs.
LENGTH_FREE_SCHEDULES = ("step", "exponential", "none")
MISSING = "<absent>"


class ResumeRefused(ConfigError):
    """A resume whose config differs from the checkpoint's in a key that changes what training computes."""


@dataclass(frozen=True)
class ConfigChange:
    """One key whose value differs between the checkpoint's config and the resuming one."""

    key: str
    old: Any
    new: Any
    kind: str  # free | not_bit_exact | epochs

    def as_record(self, epoch: int) -> dict[str, Any]:
        """The change as a history entry: after which epoch, the key, both values."""
        return {"epoch": epoch, "key": self.key, "old": self.old, "new": self.new}


def _schema_defaults() -> dict[str, Any]:
    """The dotted keys the structured schema defines, with their defaults (``model`` and ``attention`` vary
    by backbone and block and have none)."""
    defaults = {}
    for section, schema in (("data", DataConfig), ("optim", OptimConfig), ("sched", SchedConfig),
                            ("trainer", TrainerConfig)):
        for f in dataclasses.fields(schema):
            if f.default is not dataclasses.MISSING:
                defaults[f"{section}.{f.name}"] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                defaults[f"{section}.{f.name}"] = f.default_factory()
    return defaults


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as ``{dotted.key: value}``; lists are values, compared whole; an empty mapping adds
    no key (so ``{}`` and an absent section compare equal, and a key added inside it is named)."""
    flat = {}
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, path + "."))
        else:
            flat[path] = value
    return flat


def _is_free(key: str) -> bool:
    """Whether changing ``key`` leaves what training computes as it was."""
    return key in FREE_KEYS or key.split(".", 1)[0] in FREE_PREFIXES


def compare_configs(saved: dict[str, Any], new: dict[str, Any], epochs_done: int, trained_in_phases: bool,
                    source: str = "the checkpoint") -> list[ConfigChange]:
    """The accepted differences between a checkpoint's resolved config and the resuming one.

    Raises ``ResumeRefused`` naming the first refused keys, with both values, and how to start anew.
    A key the checkpoint lacks (newer code added it) is unchanged when the new value is its default.
    """
    old_flat, new_flat, defaults = flatten(saved), flatten(new), _schema_defaults()
    accepted, refused = [], []
    for key in sorted(old_flat.keys() | new_flat.keys()):
        old, value = old_flat.get(key, MISSING), new_flat.get(key, MISSING)
        if old is MISSING and key in defaults and value == defaults[key]:
            continue
        if old == value:
            continue
        if _is_free(key):
            accepted.append(ConfigChange(key, old, value, "free"))
        elif key in NOT_BIT_EXACT_KEYS:
            accepted.append(ConfigChange(key, old, value, "not_bit_exact"))
        elif key == "trainer.epochs":
            reason = _epochs_refusal(old, value, epochs_done, new_flat.get("sched.name"), trained_in_phases)
            if reason:
                refused.append(f"trainer.epochs: {old} -> {value} ({reason})")
            else:
                accepted.append(ConfigChange(key, old, value, "epochs"))
        else:
            refused.append(f"{key}: {old} -> {value}")
    if refused:
        shown = "; ".join(refused[:3]) + (f"; and {len(refused) - 3} more" if len(refused) > 3 else "")
        raise ResumeRefused(
            f"resuming from {source} would change what the run trained with ({shown}); resume with the run's own config, or "
            "start a new run (another hydra.run.dir) from its weights with trainer.init_from=PATH/TO/last.pt"
        )
    return accepted


def _epochs_refusal(old: Any, new: Any, epochs_done: int, schedule: Any, trained_in_phases: bool) -> str | None:
    """Why ``trainer.epochs`` may not change from ``old`` to ``new`` on this resume, or None where it may."""
    if not isinstance(new, int) or not isinstance(old, int) or new < old:
        return f"a run can only be extended, and it has done {epochs_done} epochs"
    if trained_in_phases:
        return "the model trains in phases whose lengths follow trainer.epochs"
    if schedule not in LENGTH_FREE_SCHEDULES:
        return (f"the {schedule} schedule's shape follows the run's length: the extra epochs would run at its "
                f"last lr; only {', '.join(LENGTH_FREE_SCHEDULES)} schedules can be extended")
    return None


def log_changes(changes: list[ConfigChange], source: str) -> None:
    """One line per accepted change, saying whether the resume stays bit-exact."""
    for change in changes:
        note = {"free": "", "epochs": " (the run is extended)",
                "not_bit_exact": ": this resume is no longer bit-exact"}[change.kind]
        log.info("resume from %s with %s changed from %s to %s%s", source, change.key, change.old, change.new, note)
