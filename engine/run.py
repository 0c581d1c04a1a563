"""``train(cfg, run_dir)``: build everything from a composed config, train, evaluate, checkpoint."""
import contextlib
import functools
import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from data import (build_datasets, build_eval_loader, build_loaders, build_test_set, check_in_memory,
                  set_train_epoch)
from data.fingerprint import fingerprint_mismatch, split_fingerprint
from engine.checkpoint import CheckpointError, TrainState, load_checkpoint, save_checkpoint
from engine.complexity import count_macs, count_params
from engine.config import DEVICES, check_config
from engine.distributed import (ReplicasDivergedError, all_gather_objects, all_reduce_sum, as_rank_lost, barrier,
                                broadcast_object, check_replicas_agree, cleanup, init_distributed)
from engine.interrupt import RunInterrupted, StepCheckpointer, StopSignals
from engine.lock import RunLock
from engine.losses import MixTokenLoss
from engine.metrics import launcher_rank, mark_failed, process_age_s, write_json
from engine.optim import build_optimizer, build_scheduler
from engine.resume import ConfigChange, ResumeRefused, compare_configs, log_changes
from engine.tensorboard import LazyWriter, log_hparams
from engine.trainer import NonFiniteLossError, Precision, StepOptions, build_precision, evaluate, train_one_epoch
from models import Backbone, build_model
from errors import ConfigError, RunDirBusy, WriteError

log = logging.getLogger("attnlab")


def select_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; ``cuda`` without a GPU is a config error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device=cuda but no CUDA device is visible; use trainer.device=cpu")
    if name not in DEVICES:
        raise ConfigError(f"trainer.device='{name}' is not valid; use {', '.join(DEVICES)}")
    return torch.device(name)


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed Python, NumPy and torch; optionally insist on deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = not deterministic
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def load_init_weights(model: Backbone, path: str | Path, new_head: bool) -> None:
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


def train(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Train and evaluate as ``cfg`` says, writing everything under ``run_dir``.

    Returns the final metrics, which are also in ``run_dir/metrics.json``; a run that fails at any
    point is marked ``failed`` there, with the error, so sweeps can list it apart.
    """
    run_dir = Path(run_dir)
    try:
        check_config(cfg)
        resumed = _load_resumed(cfg, run_dir)  # refuses a changed config before anything is built
        finished = _finished_metrics(cfg, run_dir, resumed)
        if finished is not None:
            return finished
        with RunLock(run_dir) if launcher_rank() == 0 else contextlib.nullcontext():  # one run per directory
            return _train(cfg, run_dir, resumed)
    except (ResumeRefused, RunDirBusy):
        raise  # the run directory stays as it was: refusing to start is not the run failing
    except BaseException as e:
        lost = as_rank_lost(e, cfg.trainer.dist_timeout_s)  # a collective failed: name it plainly
        if launcher_rank() == 0:
            mark_failed(run_dir, lost or e, "interrupted" if isinstance(e, RunInterrupted) else "failed")
        if isinstance(e, AGREED_STOPS):
            # every rank raised this at the same step: leave together, or torchrun would stop rank 0
            # (SIGTERM) as soon as another rank exits, perhaps before its status was written
            barrier()
        if lost is not None:
            raise lost from e
        raise
    finally:
        cleanup()


# Errors every rank raises after the same step, having agreed on them through a collective.
AGREED_STOPS = (RunInterrupted, NonFiniteLossError, ReplicasDivergedError)


def result_line(metrics: dict[str, Any]) -> str:
    """A run's result in words: the val error (and best) where it was evaluated each epoch, the test error."""
    parts = []
    if "top1_err" in metrics:
        best = f" (best {metrics['best_top1_err']:.2f}%)" if "best_top1_err" in metrics else ""
        parts.append(f"top-1 error {metrics['top1_err']:.2f}%{best}")
    if "test_top1_err" in metrics:
        parts.append(f"test top-1 error {metrics['test_top1_err']:.2f}% (final weights)")
    return f"{', '.join(parts) or 'no evaluation'} after {metrics['epoch']} epochs"


@dataclass
class Resumed:
    """The checkpoint a run resumes from, where it came from, and the config keys the resume changes."""

    path: Path
    saved: dict[str, Any]
    changes: list[ConfigChange]


def _load_resumed(cfg: DictConfig, run_dir: Path) -> Resumed | None:
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
        changes = compare_configs(saved["config"], _config(cfg), saved["epoch"],
                                  trained_in_phases="stage_fractions" in cfg.model, source=str(path))
    return Resumed(path, saved, changes)


def _finished_metrics(cfg: DictConfig, run_dir: Path, resumed: Resumed | None) -> dict[str, Any] | None:
    """A completed run's metrics when this command is that run's again: nothing to train, nothing to write."""
    metrics_path = run_dir / "metrics.json"
    if resumed is None or cfg.trainer.resume or cfg.trainer.eval_only or not metrics_path.exists():
        return None
    metrics = json.loads(metrics_path.read_text())
    if metrics.get("status") != "completed" or resumed.saved["epoch"] < cfg.trainer.epochs:
        return None
    log.info("already complete: %s; %s is left as it is", result_line(metrics), run_dir)
    return metrics


@dataclass
class Run:
    """What a run built around its training state: config, processes, data, loss, the modules that run."""

    cfg: DictConfig
    run_dir: Path
    precision: Precision
    rank: int
    world_size: int
    train_loader: Any
    val_loader: Any
    step_options: StepOptions  # loss, mixup, precision, clipping: how each training step runs
    train_model: nn.Module  # what the steps run: the model, compiled and DDP-wrapped as configured
    eval_model: nn.Module  # the same without DDP
    steps_per_epoch: int  # of a whole epoch (a resumed loader's length is what is left of its epoch)
    test_loader: Any = None  # data.val_split: the data set's own val split, evaluated once at the end
    writer: LazyWriter | None = None
    metrics: dict[str, Any] = field(default_factory=dict)  # what metrics.json holds

    @property
    def main(self) -> bool:
        """Whether this process writes the outputs (rank 0)."""
        return self.rank == 0

    @property
    def checkpoints(self) -> Path:
        """The folder of ``last.pt`` and ``best.pt``."""
        return self.run_dir / "checkpoints"


def _train(cfg: DictConfig, run_dir: Path, resumed: Resumed | None) -> dict[str, Any]:
    """The body of ``train``: build, then fit (or evaluate only)."""
    run, state = _build(cfg, run_dir, resumed)
    finished = False
    try:
        metrics = _evaluate_only(run, state) if cfg.trainer.eval_only else fit(run, state)
        finished = True
        return metrics
    finally:
        if run.writer is not None:
            try:
                run.writer.close()
            except WriteError:
                if finished:
                    raise
                # else the error that stopped the run is the one to report; the disk is likely the same


def _build(cfg: DictConfig, run_dir: Path, resumed: Resumed | None) -> tuple[Run, TrainState]:
    """Devices and processes, the model (checked first), data, loss, optimiser, schedule, EMA; resumed."""
    tcfg = cfg.trainer
    device = select_device(tcfg.device)
    precision = build_precision(tcfg.amp, device)
    if launcher_rank() != 0:
        logging.getLogger().setLevel(logging.WARNING)
    if tcfg.eval_only and not tcfg.resume:
        raise ConfigError("trainer.eval_only=true needs trainer.resume=PATH/TO/checkpoint.pt")
    seed_everything(cfg.seed, tcfg.deterministic)  # the same initial weights on every rank
    # Model first: a bad model or attention spec fails in seconds, before any process group starts
    # or any data is read.
    resuming = resumed is not None
    model, summary = _build_checked_model(cfg, weights_follow=resuming or bool(tcfg.init_from))
    check_sync_bn(tcfg.sync_bn, device)
    check_in_memory(cfg.data)
    rank, world_size = init_distributed(device, tcfg.dist_timeout_s)
    if rank:
        seed_everything(cfg.seed + rank, tcfg.deterministic)  # each rank its own augmentation stream
    # Hydra computes ${now:...} in every process: all ranks write to rank 0's directory
    run_dir = Path(broadcast_object(str(run_dir)))
    continuing_here = resumed is not None and resumed.path == run_dir / "checkpoints" / "last.pt"
    if rank == 0 and not continuing_here:  # config.yaml keeps what the run started with
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    train_set, val_set = build_datasets(cfg.data, seed=cfg.seed)
    fingerprint = {"train": split_fingerprint(train_set), "val": split_fingerprint(val_set)}
    _check_resumed_data(resumed, fingerprint, tcfg.eval_only)
    criterion, mixup = _build_criterion(cfg.data)
    if cfg.model.get("mix_token"):  # VOLO's MixToken forward returns class and token logits in training
        criterion = MixTokenLoss(criterion, cfg.data.num_classes, 0.0 if mixup else cfg.data.label_smoothing)
    train_loader, val_loader = build_loaders(  # mixup pairs samples within a batch: keep batches full
        cfg.data, train_set, val_set, rank, world_size, drop_last=mixup is not None, seed=cfg.seed, device=device
    )
    test_set = build_test_set(cfg.data)
    test_loader = (None if test_set is None else
                   build_eval_loader(cfg.data, test_set, val_loader, rank, world_size, cfg.seed, device))
    if cfg.data.protocol == "final" and not tcfg.eval_only:
        test_loader = val_loader  # the data set's own val split is the test set: seen once, at the end
    log.info("data %s: %d train / %d val images%s", cfg.data.name, len(train_set), len(val_set),
             f" (held out of train, data.val_split), {len(test_set)} test images" if test_set is not None else
             " (data.protocol=final: the val split is the test set, evaluated once at the end)"
             if test_loader is val_loader else "")
    if tcfg.init_from and not resuming:  # a resume wins
        load_init_weights(model, tcfg.init_from, tcfg.new_head)
        log.info("initialised from %s%s", tcfg.init_from, " with a new classifier" if tcfg.new_head else "")
    model, train_model, eval_model = _place_model(model, tcfg, device, world_size)
    step_options = StepOptions(criterion, precision, mixup, cfg.optim.clip_grad, tcfg.channels_last,
                               tcfg.log_interval, tcfg.on_nonfinite, progress_bar=tcfg.progress and rank == 0)
    run = Run(cfg, run_dir, precision, rank, world_size, train_loader, val_loader, step_options,
              train_model, eval_model, len(train_loader), test_loader)
    state = _build_state(cfg, model, precision, world_size, run.steps_per_epoch)
    state.data_fingerprint = fingerprint
    _resume(run, state, resumed)
    run.writer = LazyWriter(str(run_dir / "tensorboard")) if run.main else None
    run.metrics = {"status": "running", "epoch": state.epoch if not tcfg.eval_only else 0,
                   "epochs": tcfg.epochs, **summary,
                   "torch_threads": torch.get_num_threads()}  # one and two threads round differently
    if state.history:
        run.metrics.update(state.history[-1], history=state.history)
        if "top1_err" in state.history[-1]:  # evaluated every epoch (not data.protocol=final)
            run.metrics.update(best_top1_err=state.best["top1_err"], best_epoch=state.best["epoch"])
    if state.config_changes:
        run.metrics["config_changes"] = state.config_changes
        if run.main:
            write_json(run_dir / "config_changes.json", {"changes": state.config_changes})
    if run.main:
        write_json(run_dir / "metrics.json", run.metrics)  # "running" from the start, for anyone watching
    return run, state


def _place_model(model: Backbone, tcfg, device: torch.device, world_size: int
                 ) -> tuple[Backbone, nn.Module, nn.Module]:
    """SyncBN, device and memory format, compile, DDP: (the saved module, the one trained, the one evaluated)."""
    if tcfg.sync_bn and world_size > 1:  # same parameter names: checkpoints stay interchangeable
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        log.info("batch norm statistics synchronised over %d processes", world_size)
    model.to(device, memory_format=torch.channels_last if tcfg.channels_last else torch.preserve_format)
    eval_model = torch.compile(model) if tcfg.compile else model
    train_model = eval_model
    if world_size > 1:
        train_model = DistributedDataParallel(eval_model, device_ids=[device.index] if device.type == "cuda" else None,
                                              find_unused_parameters=bool(model.unused_in_some_phase))
    return model, train_model, eval_model


def _build_state(cfg: DictConfig, model: Backbone, precision: Precision, world_size: int,
                 steps_per_epoch: int) -> TrainState:
    """A fresh training state: the optimiser (lr scaled to the global batch), the schedule, EMA."""
    optimizer = build_optimizer(model, cfg.optim, global_batch=cfg.data.batch_size * world_size)
    if cfg.optim.lr_reference_batch:
        log.info("lr %g: %g x global batch %d / %d", optimizer.param_groups[0]["lr"], cfg.optim.lr,
                 cfg.data.batch_size * world_size, cfg.optim.lr_reference_batch)
    scheduler = build_scheduler(optimizer, cfg.sched, cfg.trainer.epochs, steps_per_epoch,
                                model.phase_epochs(cfg.trainer.epochs))
    ema = ModelEmaV3(model, decay=cfg.trainer.ema_decay) if cfg.trainer.ema else None
    return TrainState(model, optimizer, scheduler, precision.scaler, ema, world_size=world_size)


def _check_resumed_data(resumed: Resumed | None, fingerprint: dict[str, Any], eval_only: bool) -> None:
    """Refuse a resume on other files than the run started on: the per-sample order and the exact-resume
    promise depend on them (checkpoints older than the fingerprint are not checked)."""
    saved = resumed.saved.get("data_fingerprint") if resumed is not None and not eval_only else None
    mismatch = fingerprint_mismatch(saved, fingerprint) if saved else None
    if mismatch:
        raise ResumeRefused(f"resuming from {resumed.path}: {mismatch}; resume on the run's own data, or start a "
                            "new run (another hydra.run.dir) from its weights with trainer.init_from=PATH/TO/last.pt")


def _resume(run: Run, state: TrainState, resumed: Resumed | None) -> None:
    """Restore the checkpoint ``_load_resumed`` found, and record the config keys this resume changes."""
    if resumed is None:
        return
    path, tcfg = resumed.path, run.cfg.trainer
    state.restore(resumed.saved, path, weights_only=tcfg.eval_only)
    if tcfg.eval_only:
        return
    changes = list(resumed.changes)
    saved_world = resumed.saved.get("world_size", run.world_size)  # older checkpoints did not record it
    if saved_world != run.world_size:
        changes.append(ConfigChange("world_size", saved_world, run.world_size, "not_bit_exact"))
    log_changes(changes, str(path))
    state.config_changes += [change.as_record(state.epoch) for change in changes]
    batches = state.partial["batches"]
    log.info("resumed from %s (epoch %d%s)", path, state.epoch,
             f", then {batches} steps of epoch {state.epoch + 1}" if batches else "")


def _evaluate_only(run: Run, state: TrainState) -> dict[str, Any]:
    """``trainer.eval_only=true``: the resumed weights (and their EMA) on the val set, once."""
    tcfg, metrics = run.cfg.trainer, run.metrics
    _set_epoch(state.model, state.ema, tcfg.epochs, tcfg.epochs)
    result = evaluate(run.eval_model, run.val_loader, run.precision, tcfg.channels_last)
    metrics.update(_epoch_metrics(result, state.ema and evaluate(state.ema.module, run.val_loader, run.precision)))
    skipped = _gather_skipped(result["skipped"])
    if skipped:
        metrics["skipped_images"] = _report_skipped(run.run_dir, skipped, run.main)
    metrics.update(status="completed", epoch=state.epoch, best_top1_err=metrics["top1_err"])
    _evaluate_test(run, state)
    return _finish(metrics, run.run_dir, run.main, writer=None, cfg=run.cfg)


def fit(run: Run, state: TrainState) -> dict[str, Any]:
    """Train from ``state`` to ``trainer.epochs``, evaluating and checkpointing after every epoch."""
    epochs = run.cfg.trainer.epochs
    last_epoch = min(epochs, run.cfg.trainer.stop_after_epochs or epochs)
    if state.epoch >= epochs:
        log.info("run already finished %d epochs; nothing to do", epochs)
    if state.scheduler is not None:  # the lr of the next step
        state.scheduler.step_update(state.epoch * run.steps_per_epoch + state.partial["batches"])
    run.metrics["startup_s"] = round(process_age_s(), 2)  # the command to the first step: imports, data, model
    log.info("ready to train %.1f s after the command started", run.metrics["startup_s"])
    with StopSignals() as signals:
        for epoch in range(state.epoch + 1, last_epoch + 1):
            start = time.perf_counter()
            stats = _train_epoch(run, state, epoch, signals)
            _end_epoch(run, state, epoch, stats, start)
    if last_epoch < epochs:  # trainer.stop_after_epochs: the checkpoint of this epoch resumes the rest
        log.info("stopped after epoch %d of %d (trainer.stop_after_epochs); the same command without it resumes",
                 state.epoch, epochs)
        run.metrics["status"] = "stopped"
        return _finish(run.metrics, run.run_dir, run.main, run.writer, run.cfg)
    _evaluate_test(run, state)
    run.metrics["status"] = "completed"
    return _finish(run.metrics, run.run_dir, run.main, run.writer, run.cfg)


def _train_epoch(run: Run, state: TrainState, epoch: int, signals: StopSignals) -> dict[str, Any]:
    """One epoch's steps (the rest of it, after a mid-epoch resume); a stop signal ends the run here."""
    tcfg = run.cfg.trainer
    resumed = _rank_share(state.partial, run.rank, run.world_size)
    state.partial = {"batches": 0}
    set_train_epoch(run.train_loader, epoch, resumed["batches"])
    _set_epoch(state.model, state.ema, epoch, tcfg.epochs)
    checkpointer = StepCheckpointer(tcfg.checkpoint_every_steps, signals,
                                    functools.partial(_save_partial, run, state, epoch))
    state.step = (epoch - 1) * run.steps_per_epoch + resumed["batches"]
    stats = train_one_epoch(run.train_model, run.train_loader, state, run.step_options, resumed=resumed,
                            checkpointer=checkpointer, writer=run.writer)
    if stats["stopped"]:
        raise RunInterrupted(
            f"{signals.received or 'a signal on another rank'}: stopped after step {state.step} (epoch {epoch}) with a "
            f"checkpoint in {run.checkpoints / 'last.pt'}; run the same command to resume", handoff=signals.handoff()
        )
    return stats


def _save_partial(run: Run, state: TrainState, epoch: int, progress: dict[str, Any]) -> None:
    """The mid-epoch checkpoint: the epochs done, and ``progress`` (steps, losses) into ``epoch``."""
    # each rank's own loss totals, so a resume adds up exactly what the full run does
    per_rank = all_gather_objects((progress["loss_sum"], progress["loss_steps"]))
    progress = {**progress, "loss_sum": [s for s, _ in per_rank], "loss_steps": [n for _, n in per_rank]}
    if run.main:
        save_checkpoint(state.checkpoint(_config(run.cfg), {"epoch": epoch, **progress}), run.checkpoints / "last.pt")


def _evaluate_test(run: Run, state: TrainState) -> None:
    """``data.val_split`` or ``data.protocol=final``: the final weights (not best.pt's) on the test set, once,
    as ``test_*`` metrics."""
    if run.test_loader is None:
        return
    tcfg = run.cfg.trainer
    result = evaluate(run.eval_model, run.test_loader, run.precision, tcfg.channels_last)
    ema_result = evaluate(state.ema.module, run.test_loader, run.precision, tcfg.channels_last) if state.ema else None
    test = {f"test_{k}": v for k, v in _epoch_metrics(result, ema_result).items()}
    test["test_loss"] = test.pop("test_val_loss")
    test["test_images"] = test.pop("test_val_images")
    run.metrics.update(test)
    log.info("test set (%s's own val split, final weights of epoch %d): top-1 err %.2f%%, "
             "top-5 err %.2f%%, loss %.4f", run.cfg.data.name, state.epoch, result["top1_err"], result["top5_err"],
             result["loss"])
    if run.writer is not None:
        run.writer.add_scalar("test/top1_err", result["top1_err"], state.epoch * run.steps_per_epoch)


def _end_epoch(run: Run, state: TrainState, epoch: int, stats: dict[str, Any], start: float) -> None:
    """Check the replicas, evaluate, record the epoch in the history and metrics.json, checkpoint."""
    tcfg = run.cfg.trainer
    check_replicas_agree(state.model, f"epoch {epoch}")
    if run.cfg.data.protocol == "final":  # no evaluation on the test set before the end, nothing chosen by it
        _end_final_epoch(run, state, epoch, stats, start)
        return
    result = evaluate(run.eval_model, run.val_loader, run.precision, tcfg.channels_last)
    ema_result = evaluate(state.ema.module, run.val_loader, run.precision, tcfg.channels_last) if state.ema else None
    record = {**_train_record(run, state, epoch, stats), **_epoch_metrics(result, ema_result)}
    record["epoch_s"] = round(time.perf_counter() - start, 2)  # this process's wall time: steps and evaluations
    _add_skips(run, record, stats, result["skipped"] + (ema_result or {}).get("skipped", []))
    is_best = record["top1_err"] < state.best["top1_err"]
    state.history.append(record)
    state.epoch = epoch
    best = state.best
    run.metrics.update(record, best_top1_err=best["top1_err"], best_epoch=best["epoch"], history=state.history)
    log.info("epoch %d/%d: train loss %.4f, val top-1 err %.2f%%, top-5 err %.2f%%, loss %.4f%s",
             epoch, tcfg.epochs, record["train_loss"], result["top1_err"], result["top5_err"],
             result["loss"], f", EMA top-1 err {ema_result['top1_err']:.2f}%" if ema_result else "")
    if run.main:
        steps = epoch * run.steps_per_epoch
        _log_evaluation(run.writer, result, ema_result, steps)
        if tcfg.attention_maps:
            _log_attention_maps(run.writer, state.model, run.val_loader, run.cfg.data, tcfg.attention_maps, steps)
        saved = state.checkpoint(_config(run.cfg))
        save_checkpoint(saved, run.checkpoints / "last.pt")
        if is_best:
            save_checkpoint(saved, run.checkpoints / "best.pt")
        write_json(run.run_dir / "metrics.json", run.metrics)


def _train_record(run: Run, state: TrainState, epoch: int, stats: dict[str, Any]) -> dict[str, Any]:
    """An epoch's history record of its training: the mean loss over every rank's batches, lr, speed."""
    totals = torch.tensor([stats["loss_sum"], stats["loss_steps"]], dtype=torch.float64,
                          device=run.precision.device)
    loss_sum, loss_steps = all_reduce_sum(totals).tolist()
    return {"epoch": epoch, "train_loss": loss_sum / max(loss_steps, 1), "lr": state.optimizer.param_groups[0]["lr"],
            "train_images_per_s": stats["images_per_s"]}


def _add_skips(run: Run, record: dict[str, Any], stats: dict[str, Any], eval_skipped: list[str]) -> None:
    """Note in an epoch's record the updates ``on_nonfinite=skip`` left out and the unreadable images of every rank."""
    if stats["skipped_steps"]:
        record["skipped_steps"] = stats["skipped_steps"]
    skipped = _gather_skipped(stats["skipped"] + eval_skipped)
    if skipped:
        record["skipped_images"] = _report_skipped(run.run_dir, skipped, run.main)


def _end_final_epoch(run: Run, state: TrainState, epoch: int, stats: dict[str, Any], start: float) -> None:
    """``data.protocol=final``: the epoch's training record and last.pt, no evaluation and no best.pt."""
    record = _train_record(run, state, epoch, stats)
    record["epoch_s"] = round(time.perf_counter() - start, 2)
    _add_skips(run, record, stats, [])
    state.history.append(record)
    state.epoch = epoch
    run.metrics.update(record, history=state.history)
    log.info("epoch %d/%d: train loss %.4f, lr %.4g (data.protocol=final: no evaluation before the end)",
             epoch, run.cfg.trainer.epochs, record["train_loss"], record["lr"])
    if run.main:
        save_checkpoint(state.checkpoint(_config(run.cfg)), run.checkpoints / "last.pt")
        write_json(run.run_dir / "metrics.json", run.metrics)


def _config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain containers, as checkpoints store it."""
    return OmegaConf.to_container(cfg, resolve=True)


def _rank_share(partial: dict, rank: int, world_size: int) -> dict:
    """This rank's part of a mid-epoch checkpoint's progress: ``batches``, its own loss totals, skips."""
    share = dict(partial)
    sums, steps = share.get("loss_sum", 0.0), share.get("loss_steps", partial["batches"])
    if isinstance(sums, list) and len(sums) == world_size:
        share.update(loss_sum=sums[rank], loss_steps=steps[rank])
    else:  # another world size: rank 0 carries the totals (the epoch's mean is then not bit-exact)
        total = (sum(sums), sum(steps)) if isinstance(sums, list) else (sums, steps)
        share.update(zip(("loss_sum", "loss_steps"), total if rank == 0 else (0.0, 0)))
    return share


def _gather_skipped(reasons: list[str]) -> list[str]:
    """The unreadable images every rank left out, once each."""
    return sorted({r for rank_reasons in all_gather_objects(reasons) for r in rank_reasons})


def _report_skipped(run_dir: Path, reasons: list[str], main: bool) -> int:
    """Log the images left out this epoch and add them to ``skipped_images.txt``; returns the total so far."""
    if not main:
        return 0
    path = run_dir / "skipped_images.txt"
    known = set(path.read_text().splitlines()) if path.exists() else set()
    new = [r for r in reasons if r not in known]
    log.warning("left out %d unreadable image(s) (data.skip_corrupt=true), e.g. %s; all listed in %s",
                len(reasons), reasons[0], path)
    with open(path, "a") as f:
        f.writelines(r + "\n" for r in new)
    return len(known) + len(new)


def _set_epoch(model: Backbone, ema: ModelEmaV3 | None, epoch: int, epochs: int) -> None:
    """Tell the model (and its EMA copy) which epoch this is; one trained in stages (AG-CNN) picks its stage."""
    stage = model.set_epoch(epoch, epochs)
    if ema is not None:
        ema.module.set_epoch(epoch, epochs)
    if stage is not None:
        log.info("epoch %d: training stage '%s'", epoch, stage)


def check_sync_bn(sync_bn: bool, device: torch.device) -> None:
    """SyncBatchNorm runs on CUDA only (torch's kernels); on the CPU say what to use instead."""
    if sync_bn and device.type != "cuda":
        raise ConfigError("trainer.sync_bn=true needs CUDA devices; on the CPU use model.norm=group for "
                          "batch statistics that do not depend on the per-process batch")


def _build_checked_model(cfg: DictConfig, weights_follow: bool = False) -> tuple[nn.Module, dict[str, int]]:
    """The configured model and its size; one forward pass at the input size checks it can run.

    ``weights_follow``: a resume or ``trainer.init_from`` loads the weights next, so ``model.pretrained`` is not read
    (precedence: resume > init_from > pretrained).
    """
    model_cfg = cfg.model
    if weights_follow and cfg.model.get("pretrained"):
        log.info("model.pretrained=%s not loaded: the resumed or trainer.init_from weights replace it",
                 cfg.model.pretrained)
        model_cfg = {**OmegaConf.to_container(cfg.model, resolve=True), "pretrained": None}
    model = build_model(model_cfg, cfg.attention, cfg.attention_extra, cfg.data.num_classes, cfg.data.image_size)
    size = cfg.data.image_size
    try:  # a block that cannot take this size fails here, not mid-epoch
        macs = count_macs(model, (3, size, size))
    except RuntimeError as e:
        raise ConfigError(
            f"model {cfg.model.name} with attention {cfg.attention.name} cannot run on {size}x{size} "
            f"inputs ({str(e).splitlines()[0]}); check data.image_size and model.stem"
        ) from None
    summary = {"params": count_params(model), "macs": macs, "input_size": size}
    log.info("model %s + attention %s: %s params, %s MACs at %dx%d", cfg.model.name, cfg.attention.name,
             f"{summary['params']:,}", f"{summary['macs']:,}", size, size)
    return model, summary


def _build_criterion(data_cfg) -> tuple[nn.Module, Mixup | None]:
    """Soft-target cross-entropy with timm's mixup/cutmix, cross-entropy with label smoothing, or
    binary cross-entropy for multi-label data."""
    if data_cfg.multi_label:
        if data_cfg.mixup > 0 or data_cfg.cutmix > 0 or data_cfg.label_smoothing > 0:
            raise ConfigError("data.multi_label=true takes no data.mixup, data.cutmix or data.label_smoothing; "
                              "set them to 0")
        return nn.BCEWithLogitsLoss(), None
    if data_cfg.mixup > 0 or data_cfg.cutmix > 0:
        if data_cfg.skip_corrupt:
            raise ConfigError("data.skip_corrupt=true cannot go with data.mixup/cutmix (a batch that loses an "
                              "image can be odd-sized, which timm's Mixup refuses); turn one off")
        mixup = Mixup(mixup_alpha=data_cfg.mixup, cutmix_alpha=data_cfg.cutmix,
                      label_smoothing=data_cfg.label_smoothing, num_classes=data_cfg.num_classes)
        return SoftTargetCrossEntropy(), mixup
    return nn.CrossEntropyLoss(label_smoothing=data_cfg.label_smoothing), None


def _log_evaluation(writer: LazyWriter, result: dict, ema_result: dict | None, step: int) -> None:
    """The val/* TensorBoard scalars of one evaluation."""
    writer.add_scalar("val/top1_err", result["top1_err"], step)
    writer.add_scalar("val/top5_err", result["top5_err"], step)
    writer.add_scalar("val/loss", result["loss"], step)
    if result.get("auroc") is not None:
        writer.add_scalar("val/auroc", result["auroc"], step)
    if ema_result:
        writer.add_scalar("val/ema_top1_err", ema_result["top1_err"], step)


def _log_attention_maps(writer: LazyWriter, model: nn.Module, val_loader, data_cfg, count: int,
                        step: int) -> None:
    """The first ``count`` val images' attention maps and Grad-CAM, as TensorBoard images."""
    images = next((x for x, _ in val_loader if x is not None), None)  # skip all-unreadable batches
    if images is None:
        return
    from engine.visualize import log_attention_figures  # captum and matplotlib: imported only when maps are asked for

    images = images[:count].cpu()
    device = next(model.parameters()).device
    mean = torch.tensor(data_cfg.mean).view(1, 3, 1, 1)
    std = torch.tensor(data_cfg.std).view(1, 3, 1, 1)
    log_attention_figures(writer, model, images.to(device), (images * std + mean).clamp(0, 1), step)


def _epoch_metrics(result: dict[str, float], ema_result: dict[str, float] | None) -> dict[str, float]:
    """The metrics.json fields of one evaluation (and of the EMA weights' evaluation)."""
    out = {"top1_err": result["top1_err"], "top5_err": result["top5_err"], "val_loss": result["loss"],
           "val_images": result["count"], "eval_images_per_s": result["images_per_s"]}
    if "auroc" in result:  # multi-label data: mean AUROC beside the one-error
        out["auroc"] = result["auroc"]
    if ema_result:
        out.update(ema_top1_err=ema_result["top1_err"], ema_top5_err=ema_result["top5_err"])
    return out


def _finish(metrics: dict[str, Any], run_dir: Path, main: bool, writer: LazyWriter | None,
            cfg: DictConfig) -> dict[str, Any]:
    """Write the final metrics.json and the HParams summary; return the metrics."""
    if main:
        write_json(run_dir / "metrics.json", metrics)
        if writer is not None:
            final = {f"final/{k}": metrics[k] for k in ("top1_err", "top5_err", "val_loss", "best_top1_err", "auroc",
                                                        "test_top1_err", "test_top5_err")
                     if metrics.get(k) is not None}
            log_hparams(writer, OmegaConf.to_container(cfg, resolve=True), final)
    return metrics
