"""``train(cfg, run_dir)``: build a run from its config (``engine.build``), train it, evaluate, checkpoint."""
import contextlib
import functools
import logging
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from timm.utils import ModelEmaV3

from data import set_train_epoch
from engine import record
from engine.build import Run, build_run
from engine.checkpoint import TrainState, rank_progress, save_checkpoint
from engine.config import check_config, plain_config
from engine.distributed import (ReplicasDivergedError, all_gather_objects, as_rank_lost, barrier,
                                check_replicas_agree, cleanup)
from engine.interrupt import RunInterrupted, StepCheckpointer, StopSignals
from engine.lock import RunLock
from engine.launcher import launcher_rank
from engine.metrics import mark_failed, process_age_s, write_json
from engine.resume import ResumeRefused
from engine.resumed import Resumed, finished_metrics, load_resumed
from engine.trainer import NonFiniteLossError, evaluate, train_one_epoch
from errors import RunDirBusy, WriteError
from models import Backbone

log = logging.getLogger("attnlab")

# Errors every rank raises after the same step, having agreed on them through a collective.
AGREED_STOPS = (RunInterrupted, NonFiniteLossError, ReplicasDivergedError)


def train(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Train and evaluate as ``cfg`` says, writing everything under ``run_dir``.

    Returns the final metrics, which are also in ``run_dir/metrics.json``; a run that fails at any
    point is marked ``failed`` there, with the error, so sweeps can list it apart.
    """
    run_dir = Path(run_dir)
    try:
        check_config(cfg)
        resumed = load_resumed(cfg, run_dir)  # refuses a changed config before anything is built
        finished = finished_metrics(cfg, run_dir, resumed)
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


def _train(cfg: DictConfig, run_dir: Path, resumed: Resumed | None) -> dict[str, Any]:
    """The body of ``train``: build, then fit (or evaluate only)."""
    run, state = build_run(cfg, run_dir, resumed)
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


def _evaluate_only(run: Run, state: TrainState) -> dict[str, Any]:
    """``trainer.eval_only=true``: the resumed weights (and their EMA) on the val set, once."""
    tcfg, metrics = run.cfg.trainer, run.metrics
    _set_epoch(state.model, state.ema, tcfg.epochs, tcfg.epochs)
    result, ema_result = _evaluate(run, state, run.val_loader)
    metrics.update(record.epoch_metrics(result, ema_result))
    skipped = record.gather_skipped(result["skipped"])
    if skipped:
        metrics["skipped_images"] = record.report_skipped(run.run_dir, skipped, run.writes_outputs)
    metrics.update(status="completed", epoch=state.epoch, best_top1_err=metrics["top1_err"])
    _evaluate_test(run, state)
    return record.write_final(metrics, run.run_dir, run.writes_outputs, writer=None, cfg=run.cfg)


def _evaluate(run: Run, state: TrainState, loader) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The model's evaluation on ``loader``, and its EMA weights' where the run keeps them."""
    channels_last = run.cfg.trainer.channels_last
    result = evaluate(run.eval_model, loader, run.precision, channels_last)
    ema_result = evaluate(state.ema.module, loader, run.precision, channels_last) if state.ema else None
    return result, ema_result


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
    else:
        _evaluate_test(run, state)
        run.metrics["status"] = "completed"
    return record.write_final(run.metrics, run.run_dir, run.writes_outputs, run.writer, run.cfg)


def _train_epoch(run: Run, state: TrainState, epoch: int, signals: StopSignals) -> dict[str, Any]:
    """One epoch's steps (the rest of it, after a mid-epoch resume); a stop signal ends the run here."""
    tcfg = run.cfg.trainer
    resumed = rank_progress(state.partial, run.rank, run.world_size)
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
    if run.writes_outputs:
        save_checkpoint(state.checkpoint(plain_config(run.cfg), {"epoch": epoch, **progress}),
                        run.checkpoints / "last.pt")


def _evaluate_test(run: Run, state: TrainState) -> None:
    """``data.val_split`` or ``data.protocol=final``: the final weights (not best.pt's) on the test set, once,
    as ``test_*`` metrics."""
    if run.test_loader is None:
        return
    result, ema_result = _evaluate(run, state, run.test_loader)
    run.metrics.update(record.final_test_metrics(result, ema_result))
    log.info("test set (%s's own val split, final weights of epoch %d): top-1 err %.2f%%, "
             "top-5 err %.2f%%, loss %.4f", run.cfg.data.name, state.epoch, result["top1_err"], result["top5_err"],
             result["loss"])
    if run.writer is not None:
        run.writer.add_scalar("test/top1_err", result["top1_err"], state.epoch * run.steps_per_epoch)


def _end_epoch(run: Run, state: TrainState, epoch: int, stats: dict[str, Any], start: float) -> None:
    """Check the replicas, evaluate, record the epoch in the history and metrics.json, checkpoint."""
    check_replicas_agree(state.model, f"epoch {epoch}")
    evaluated = run.cfg.data.protocol != "final"  # final: nothing seen of the test set before the end
    result, ema_result = _evaluate(run, state, run.val_loader) if evaluated else ({"skipped": []}, None)
    epoch_record = record.train_record(epoch, stats, state.optimizer.param_groups[0]["lr"], run.precision.device)
    if evaluated:
        epoch_record.update(record.epoch_metrics(result, ema_result))
    epoch_record["epoch_s"] = round(time.perf_counter() - start, 2)  # this process's wall time: steps, evaluations
    record.add_skips(epoch_record, stats, result["skipped"] + (ema_result or {}).get("skipped", []), run.run_dir,
                     run.writes_outputs)
    is_best = evaluated and epoch_record["top1_err"] < state.best["top1_err"]
    state.history.append(epoch_record)
    state.epoch = epoch
    run.metrics.update(epoch_record)
    if evaluated:
        run.metrics.update(best_top1_err=state.best["top1_err"], best_epoch=state.best["epoch"])
    run.metrics["history"] = state.history
    _log_epoch(run, state, epoch_record, result, ema_result)
    if run.writes_outputs:
        saved = state.checkpoint(plain_config(run.cfg))
        save_checkpoint(saved, run.checkpoints / "last.pt")
        if is_best:
            save_checkpoint(saved, run.checkpoints / "best.pt")
        write_json(run.run_dir / "metrics.json", run.metrics)


def _log_epoch(run: Run, state: TrainState, epoch_record: dict, result: dict, ema_result: dict | None) -> None:
    """The epoch's log line, and its TensorBoard evaluation and attention figures."""
    tcfg, epoch = run.cfg.trainer, epoch_record["epoch"]
    if "top1_err" not in epoch_record:
        log.info("epoch %d/%d: train loss %.4f, lr %.4g (data.protocol=final: no evaluation before the end)",
                 epoch, tcfg.epochs, epoch_record["train_loss"], epoch_record["lr"])
        return
    log.info("epoch %d/%d: train loss %.4f, val top-1 err %.2f%%, top-5 err %.2f%%, loss %.4f%s",
             epoch, tcfg.epochs, epoch_record["train_loss"], result["top1_err"], result["top5_err"],
             result["loss"], f", EMA top-1 err {ema_result['top1_err']:.2f}%" if ema_result else "")
    if run.writes_outputs:
        steps = epoch * run.steps_per_epoch
        record.log_evaluation(run.writer, result, ema_result, steps)
        if tcfg.attention_maps:
            record.log_attention_maps(run.writer, state.model, run.val_loader, run.cfg.data, tcfg.attention_maps,
                                      steps)


def _set_epoch(model: Backbone, ema: ModelEmaV3 | None, epoch: int, epochs: int) -> None:
    """Tell the model (and its EMA copy) which epoch this is; one trained in stages (AG-CNN) picks its stage."""
    stage = model.set_epoch(epoch, epochs)
    if ema is not None:
        ema.module.set_epoch(epoch, epochs)
    if stage is not None:
        log.info("epoch %d: training stage '%s'", epoch, stage)
