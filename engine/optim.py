"""Optimizer and learning-rate schedule from config, through timm's factories."""
import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.scheduler.scheduler import Scheduler
from torch import nn

from engine.config import OPTIMIZERS, OptimConfig, SchedConfig
from errors import ConfigError

# Our names -> timm's: "linear" is timm's poly at power 1 (linear decay to min_lr)
SCHEDULES = {"cosine": "cosine", "linear": "poly", "step": "multistep", "exponential": "step", "none": None}


def scaled_lr(cfg: OptimConfig, global_batch: int) -> float:
    """``optim.lr``, times global_batch / ``optim.lr_reference_batch`` when that is set (Goyal et al. 2017)."""
    return cfg.lr * global_batch / cfg.lr_reference_batch if cfg.lr_reference_batch else cfg.lr


def build_optimizer(model: nn.Module, cfg: OptimConfig, global_batch: int | None = None) -> torch.optim.Optimizer:
    """SGD (momentum, optional Nesterov) or AdamW; optionally no weight decay on norms and biases.

    ``global_batch`` (batch size x processes) applies the linear scaling rule when
    ``optim.lr_reference_batch`` is set.
    """
    if cfg.name not in OPTIMIZERS:
        raise ConfigError(f"optim: unknown optimizer '{cfg.name}'; valid names: {', '.join(OPTIMIZERS)}")
    extra = {"nesterov": cfg.nesterov} if cfg.name == "sgd" else {"betas": tuple(cfg.betas)}
    lr = scaled_lr(cfg, global_batch) if global_batch else cfg.lr
    return create_optimizer_v2(
        model, opt=cfg.name, lr=lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
        filter_bias_and_bn=cfg.no_decay_norm_bias, **extra,
    )


class PhasedScheduler:
    """One timm scheduler per training phase, each run from its own start (AG-CNN's three stages)."""

    def __init__(self, schedulers: list[Scheduler], phase_steps: list[int]):
        self.schedulers, self.starts = schedulers, [sum(phase_steps[:i]) for i in range(len(phase_steps))]

    def step_update(self, num_updates: int) -> None:
        """Set the lr of global step ``num_updates`` from its phase's scheduler at the step within the phase."""
        phase = max(i for i, start in enumerate(self.starts) if start <= num_updates)
        self.schedulers[phase].step_update(num_updates - self.starts[phase])

    def state_dict(self) -> dict:
        """The phases' schedulers' states (timm's), for checkpoints."""
        return {"phases": [s.state_dict() for s in self.schedulers]}

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` saved."""
        for scheduler, saved in zip(self.schedulers, state["phases"]):
            scheduler.load_state_dict(saved)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: SchedConfig, epochs: int, steps_per_epoch: int,
    phase_epochs: list[int] | None = None,
) -> Scheduler | PhasedScheduler | None:
    """A timm scheduler updated every step (``step_update``), or None for a constant lr.

    ``sched.cooldown_epochs`` of the ``epochs`` run at ``min_lr`` after the schedule, as timm's train.py.
    ``phase_epochs`` (a model trained in phases): the schedule, warm-up included, restarts in each phase.
    """
    if cfg.name not in SCHEDULES:
        raise ConfigError(f"sched: unknown schedule '{cfg.name}'; valid names: {', '.join(SCHEDULES)}")
    if SCHEDULES[cfg.name] is None:
        return None
    if phase_epochs and len(phase_epochs) > 1:
        short = [n for n in phase_epochs if n <= cfg.warmup_epochs + cfg.cooldown_epochs]
        if short:
            raise ConfigError(f"sched.warmup_epochs={cfg.warmup_epochs} sched.cooldown_epochs={cfg.cooldown_epochs} "
                              f"do not fit a training phase of {short[0]} epochs (phases {phase_epochs}): use "
                              "fewer warm-up and cool-down epochs, or more trainer.epochs")
        schedulers = [build_scheduler(optimizer, cfg, n, steps_per_epoch) for n in phase_epochs]
        return PhasedScheduler(schedulers, [n * steps_per_epoch for n in phase_epochs])
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=SCHEDULES[cfg.name], num_epochs=epochs - cfg.cooldown_epochs,
        cooldown_epochs=cfg.cooldown_epochs, decay_milestones=list(cfg.decay_epochs),
        decay_epochs=1,  # timm's "step": x decay_rate every epoch (our "exponential")
        decay_rate=1.0 if cfg.name == "linear" else cfg.decay_rate,  # timm reads poly's power from decay_rate
        min_lr=cfg.min_lr, warmup_lr=cfg.warmup_lr,
        warmup_epochs=cfg.warmup_epochs, step_on_epochs=False, updates_per_epoch=steps_per_epoch,
    )
    return scheduler
