"""The checkpoint a run resumes from: found, compared with the config (``engine.resume``) and the data, restored."""
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from data.fingerprint import fingerprint_mismatch
from engine.checkpoint import TrainState, load_checkpoint
from engine.config import plain_config
from engine.record import result_line
from engine.resume import ConfigChange, ResumeRefused, compare_configs, log_changes

log = logging.getLogger("attnlab")


@dataclass
class Resumed:
    """The checkpoint a run resumes from, where it came from, and the config keys the resume changes."""

    path: Path
    saved: dict[str, Any]
    changes: list[ConfigChange]


def load_resumed(cfg: DictConfig, run_dir: Path) -> Resumed | None:
    """``trainer.resume``'s checkpoint, else this run directory's own last one, checked against ``cfg``.

    Training resumes only with the config it was trained with (``engine.resume``); ``eval_only`` reads the
    weights alone, so its config is not compared.
    """
    tcfg = cfg.trainer
    last = run_dir / "checkpoints" / "last.pt"
    path = Path(tcfg.resume) if tcfg.resume else (last if last.exists() else None)
    if path is None:
        return None
    saved = load_checkpoint(path)
    changes = []
    if not tcfg.eval_only and saved.get("config") is not None:
        # AG-CNN's phases are fractions of trainer.epochs (model.stage_fractions): their lengths follow it
        changes = compare_configs(saved["config"], plain_config(cfg), saved["epoch"],
                                  trained_in_phases="stage_fractions" in cfg.model, source=str(path))
    return Resumed(path, saved, changes)


def finished_metrics(cfg: DictConfig, run_dir: Path, resumed: Resumed | None) -> dict[str, Any] | None:
    """A completed run's metrics when this command is that run's again: nothing to train, nothing to write."""
    metrics_path = run_dir / "metrics.json"
    if resumed is None or cfg.trainer.resume or cfg.trainer.eval_only or not metrics_path.exists():
        return None
    metrics = json.loads(metrics_path.read_text())
    if metrics.get("status") != "completed" or resumed.saved["epoch"] < cfg.trainer.epochs:
        return None
    log.info("already complete: %s; %s is left as it is", result_line(metrics), run_dir)
    return metrics


def check_resumed_data(resumed: Resumed | None, fingerprint: dict[str, Any], eval_only: bool) -> None:
    """Refuse a resume on other files than the run started on: the per-sample order and the exact-resume
    promise depend on them (checkpoints older than the fingerprint are not checked)."""
    saved = resumed.saved.get("data_fingerprint") if resumed is not None and not eval_only else None
    mismatch = fingerprint_mismatch(saved, fingerprint) if saved else None
    if mismatch:
        raise ResumeRefused(f"resuming from {resumed.path}: {mismatch}; resume on the run's own data, or start a "
                            "new run (another hydra.run.dir) from its weights with trainer.init_from=PATH/TO/last.pt")


def restore_resumed(state: TrainState, resumed: Resumed | None, world_size: int, eval_only: bool) -> None:
    """Restore the checkpoint ``load_resumed`` found, and record the config keys this resume changes."""
    if resumed is None:
        return
    path = resumed.path
    state.restore(resumed.saved, path, weights_only=eval_only)
    if eval_only:
        return
    changes = list(resumed.changes)
    saved_world = resumed.saved.get("world_size", world_size)  # older checkpoints did not record it
    if saved_world != world_size:
        changes.append(ConfigChange("world_size", saved_world, world_size, "not_bit_exact"))
    log_changes(changes, str(path))
    state.config_changes += [change.as_record(state.epoch) for change in changes]
    batches = state.partial["batches"]
    log.info("resumed from %s (epoch %d%s)", path, state.epoch,
             f", then {batches} steps of epoch {state.epoch + 1}" if batches else "")
