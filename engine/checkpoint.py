"""Checkpoints that survive a crash mid-write and load with ``weights_only=True``."""
import pickle
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from engine.files import write_atomically
from errors import CheckpointError


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` to a temp file beside ``path``, flush it to disk, then rename it into place; a failed
    write raises ``WriteError`` and keeps the checkpoint that was there."""
    path = Path(path)
    # one fixed temp name (only rank 0 writes): a write killed midway leaves one file, replaced by the next
    write_atomically(path, lambda f: torch.save(state, f), tmp=path.with_name(f".{path.name}.tmp"),
                     fault="checkpoint_write")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint written by ``save_checkpoint`` (tensors and plain types only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} does not exist; pass trainer.resume=RUN_DIR/checkpoints/last.pt "
            "(or best.pt) of an earlier run"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} is not a loadable attnlab checkpoint ({first_line})") from None
    if not isinstance(state, dict) or not {"model", "epoch"} <= set(state):
        raise CheckpointError(f"{path} is not an attnlab checkpoint (no 'model' and 'epoch' entries)")
    return state


def rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors and plain types, so it loads with ``weights_only=True``."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states captured by ``rng_state``."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_weights(module: nn.Module, weights: dict[str, torch.Tensor], path: Path | str) -> None:
    """Load a state dict, turning an architecture mismatch into a short CheckpointError."""
    try:
        module.load_state_dict(weights)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:400]
        raise CheckpointError(f"{path} was saved from a different model or class list: {detail}") from None


@dataclass
class TrainState:
    """What training carries from epoch to epoch, and what a checkpoint holds."""

    model: nn.Module  # the module whose state dict is saved, not its DDP or compiled wrapper
    optimizer: torch.optim.Optimizer
    scheduler: Any  # a timm scheduler, or None
    scaler: torch.amp.GradScaler
    ema: Any = None  # timm's ModelEmaV3, or None
    epoch: int = 0  # whole epochs done
    step: int = 0  # training steps taken (updates skipped by on_nonfinite=skip count too); not saved: a
    # resume derives it from epoch and partial (``engine.run._train_epoch``)
    partial: dict[str, Any] = field(default_factory=lambda: {"batches": 0})  # progress into the next epoch
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per finished epoch
    config_changes: list[dict[str, Any]] = field(default_factory=list)  # keys a resume changed (engine.resume)
    world_size: int = 1  # the processes that trained: a resume on another count is no longer bit-exact
    data_fingerprint: dict[str, Any] = field(default_factory=dict)  # {split: count, classes, hash}: the data trained on

    @property
    def best(self) -> dict[str, Any]:
        """The evaluated epoch with the lowest top-1 error (the first of equals); ``data.protocol=final``
        evaluates none before the end."""
        evaluated = [h for h in self.history if "top1_err" in h]
        if not evaluated:
            return {"top1_err": float("inf"), "epoch": 0}
        record = min(evaluated, key=lambda h: h["top1_err"])
        return {"top1_err": record["top1_err"], "epoch": record["epoch"]}

    def checkpoint(self, config: dict[str, Any], in_progress: dict[str, Any] | None = None) -> dict[str, Any]:
        """Everything a resume needs after ``epoch`` whole epochs (and ``in_progress`` steps of the next)."""
        return {
            "model": self.model.state_dict(), "ema": self.ema.module.state_dict() if self.ema else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict(), "epoch": self.epoch, "partial": in_progress,
            "history": self.history, "best": self.best, "rng": rng_state(), "config": config,
            "config_changes": self.config_changes, "world_size": self.world_size,
            "data_fingerprint": self.data_fingerprint,
        }

    def restore(self, saved: dict[str, Any], path: Path | str, weights_only: bool = False) -> None:
        """Load a checkpoint's weights; unless ``weights_only``, its optimiser, schedule, progress and RNGs."""
        load_weights(self.model, saved["model"], path)
        if self.ema is not None and saved.get("ema") is not None:
            load_weights(self.ema.module, saved["ema"], path)
        self.epoch = saved["epoch"]
        if weights_only:
            return
        self.optimizer.load_state_dict(saved["optimizer"])
        if self.scheduler is not None and saved.get("scheduler"):
            self.scheduler.load_state_dict(saved["scheduler"])
        self.scaler.load_state_dict(saved["scaler"])
        set_rng_state(saved["rng"])
        self.history = list(saved["history"])
        self.config_changes = list(saved.get("config_changes", []))
        if saved.get("partial"):
            self.partial = {k: v for k, v in saved["partial"].items() if k != "epoch"}


def load_init_weights(model: nn.Module, path: str | Path, new_head: bool) -> None:
    """Fine-tuning's start: a checkpoint's weights; with ``new_head`` the classifiers stay freshly built.

    Anything else that does not fit (another architecture) is refused with the mismatch shown.
    """
    head_prefixes = tuple(f"{name}." for name in model.classifier_names)
    weights = load_checkpoint(path)["model"]
    if new_head:
        weights = {k: v for k, v in weights.items() if not k.startswith(head_prefixes)}
    own = model.state_dict()
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in weights.items() if k in own and v.shape != own[k].shape]
    missing = [k for k in own if k not in weights and not (new_head and k.startswith(head_prefixes))]
    unexpected = [k for k in weights if k not in own]
    if mismatched or missing or unexpected:
        head_only = all(k.split(":")[0].startswith(head_prefixes) for k in mismatched + missing + unexpected)
        hint = "; to fine-tune for another class list set trainer.new_head=true" if head_only and not new_head else ""
        problems = mismatched[:3] + [f"missing {k}" for k in missing[:3]] + [f"unexpected {k}" for k in unexpected[:3]]
        raise CheckpointError(f"{path} does not fit this model ({'; '.join(problems)}){hint}")
    model.load_state_dict(weights, strict=False)


def rank_progress(partial: dict, rank: int, world_size: int) -> dict:
    """This rank's part of a mid-epoch checkpoint's progress: ``batches``, its own loss totals, skips."""
    share = dict(partial)
    sums, steps = share.get("loss_sum", 0.0), share.get("loss_steps", partial["batches"])
    if isinstance(sums, list) and len(sums) == world_size:
        share.update(loss_sum=sums[rank], loss_steps=steps[rank])
    else:  # another world size: rank 0 carries the totals (the epoch's mean is then not bit-exact)
        total = (sum(sums), sum(steps)) if isinstance(sums, list) else (sums, steps)
        share.update(zip(("loss_sum", "loss_steps"), total if rank == 0 else (0.0, 0)))
    return share
