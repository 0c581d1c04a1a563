"""One training epoch and one evaluation pass."""
import logging
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from data.corrupt import batch_skipped, require_images
from engine.distributed import agree_at_sync_point, all_reduce_sum, get_world_size
from engine.hooks import fault_point
from models.placement import ConfigError

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
NONFINITE_ACTIONS = ("stop", "skip")
log = logging.getLogger("attnlab")


class NonFiniteLossError(RuntimeError):
    """A rank's loss became NaN or infinite; every rank stops before the next checkpoint is written."""


@dataclass
class Precision:
    """Where the model runs, the autocast dtype (None: full precision) and the loss scaler."""

    device: torch.device
    dtype: torch.dtype | None
    scaler: torch.amp.GradScaler

    def autocast(self) -> torch.autocast:
        """The autocast context for forward passes."""
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None)


def build_precision(amp: str, device: torch.device) -> Precision:
    """bf16 autocast on CPU or CUDA; fp16 autocast with a GradScaler on CUDA only."""
    if amp not in AMP_DTYPES:
        raise ConfigError(f"trainer.amp='{amp}' is not valid; use one of {', '.join(AMP_DTYPES)}")
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError("trainer.amp=fp16 needs a CUDA device; use trainer.amp=bf16 on the CPU")
    if amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"trainer.amp=bf16 but {torch.cuda.get_device_name(device)} has no bf16; "
                          "use trainer.amp=fp16")
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    return Precision(device, AMP_DTYPES[amp], scaler)


def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    precision: Precision,
    epoch: int,
    start_step: int = 0,
    scheduler=None,
    ema: nn.Module | None = None,
    mixup=None,
    clip_grad: float | None = None,
    channels_last: bool = False,
    log_interval: int = 20,
    writer=None,  # a SummaryWriter (or engine.tensorboard.LazyWriter)
    progress: bool = True,
    skip_batches: int = 0,
    checkpointer=None,
    on_nonfinite: str = "stop",
    resumed: dict | None = None,
) -> dict[str, float]:
    """Train for one pass over ``loader``; returns the epoch's mean loss, loss totals, steps and images/s.

    ``start_step`` is the number of optimizer steps taken before this epoch (the schedule and the
    TensorBoard x-axis count steps); ``skip_batches`` how many of this epoch's steps a resumed run
    already took (the loader starts after them) and ``resumed`` their totals (a mid-epoch checkpoint's
    ``partial``).

    The host waits for the device only at sync points: every ``log_interval`` steps, at a periodic
    checkpoint and at the epoch's end. There the losses are read back and the ranks exchange, in one
    small all-reduce, their stop signals and the first non-finite loss any of them saw. A non-finite
    loss, with ``on_nonfinite``:

    - ``stop``: raised on every rank with its exact step at the sync point that finds it, before any
      checkpoint could hold the damaged weights;
    - ``skip``: every step checks (one host sync and, with several ranks, one scalar all-reduce) that
      all ranks' losses and the gradients are finite, and otherwise every rank skips the update.

    ``checkpointer`` (``engine.interrupt.StepCheckpointer``) writes a mid-epoch checkpoint at its
    periodic steps, and on a stop signal (at the next sync point; in a single process at once), then
    stops the epoch there (``stopped`` in the result).
    """
    if on_nonfinite not in NONFINITE_ACTIONS:
        raise ConfigError(f"trainer.on_nonfinite='{on_nonfinite}' is not valid; use one of "
                          f"{', '.join(NONFINITE_ACTIONS)}")
    model.train()
    device, scaler = precision.device, precision.scaler
    memory_format = torch.channels_last if channels_last else torch.preserve_format
    totals = {"loss_sum": 0.0, "loss_steps": 0, "skipped_steps": 0, **(resumed or {})}
    pending: list[torch.Tensor] = []  # losses not yet read back
    images, interval_images, steps_run = 0, 0, 0
    single_process = get_world_size() == 1
    start = last_log = time.perf_counter()

    def flush(step: int) -> int | None:
        """Read the pending losses back, add them up, log them; returns the first non-finite one's step."""
        nonlocal interval_images, last_log
        if not pending:
            return None
        losses = torch.stack(pending).cpu().double()  # float32 values add up exactly in float64, in any grouping
        finite = torch.isfinite(losses)
        bad = (~finite).nonzero()
        first_bad = step - len(losses) + 1 + int(bad[0]) if len(bad) and on_nonfinite == "stop" else None
        totals["loss_sum"] += losses[finite].sum().item()
        totals["loss_steps"] += int(finite.sum())
        now = time.perf_counter()
        rate = interval_images * get_world_size() / max(now - last_log, 1e-9)
        lr = optimizer.param_groups[0]["lr"]
        mean = losses[finite].mean().item() if finite.any() else float("nan")
        bar.set_postfix(loss=f"{mean:.4f}", lr=f"{lr:.3g}", img_s=f"{rate:.0f}")
        if writer is not None:
            writer.add_scalar("train/loss", mean, step)
            writer.add_scalar("train/lr", lr, step)
            writer.add_scalar("train/images_per_s", rate, step)
        pending.clear()
        interval_images, last_log = 0, now
        return first_bad

    bar = tqdm(loader, desc=f"epoch {epoch}", disable=not progress, leave=False, dynamic_ncols=True)
    skipped: list[str] = []
    stopped = False
    for i, batch in enumerate(bar):
        require_images(batch)
        x, y = batch
        skipped += batch_skipped(batch)
        step = start_step + skip_batches + i + 1  # 1-based number of this optimizer step
        x = x.to(device, non_blocking=True, memory_format=memory_format)
        y = y.to(device, non_blocking=True)
        if mixup is not None:
            x, y = mixup(x, y)
        with precision.autocast():
            loss = criterion(model(x), y)
        loss = fault_point("loss", loss, step=step)
        scaler.scale(loss).backward()
        if clip_grad:
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        if on_nonfinite == "skip" and not _finite_on_every_rank(loss, model, scaler):
            optimizer.zero_grad(set_to_none=True)
            if scaler.is_enabled():
                scaler.update(scaler.get_scale())  # keep the scale; clear this step's unscale_ record
            totals["skipped_steps"] += 1
            log.warning("step %d (epoch %d): non-finite loss or gradient; update skipped on every rank "
                        "(trainer.on_nonfinite=skip)", step, epoch)
        else:
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(model.module if hasattr(model, "module") else model, step=step)
        if scheduler is not None:
            scheduler.step_update(step)
        pending.append(loss.detach())
        images += x.shape[0]
        interval_images += x.shape[0]
        steps_run += 1
        batches_done = skip_batches + i + 1
        checkpoint_due = checkpointer is not None and checkpointer.due(batches_done)
        signalled = checkpointer is not None and checkpointer.requested
        # the ranks meet at the same steps; a single process needs no meeting to act on a signal
        if len(pending) == log_interval or i + 1 == len(loader) or checkpoint_due or (single_process and signalled):
            stop, nonfinite = agree_at_sync_point(signalled, flush(step))
            if nonfinite is not None:
                _raise_nonfinite(*nonfinite, epoch)
            if checkpoint_due or stop:  # a checkpoint holds only checked losses
                checkpointer.save({"batches": batches_done, **totals})
            if stop:
                stopped = True
                break
    elapsed = time.perf_counter() - start
    return {**totals, "loss": totals["loss_sum"] / max(totals["loss_steps"], 1), "steps": steps_run,
            "images_per_s": images * get_world_size() / elapsed, "skipped": skipped, "stopped": stopped}


def _raise_nonfinite(step: int, rank: int, epoch: int) -> None:
    """Every rank raises NonFiniteLossError after the sync point that found ``rank``'s loss not finite at ``step``."""
    where = f" on rank {rank}" if get_world_size() > 1 else ""
    raise NonFiniteLossError(
        f"non-finite loss at step {step} (epoch {epoch}){where}; every rank stopped without writing a "
        "checkpoint, the last good one is kept. Lower optim.lr, set optim.clip_grad, use trainer.amp=bf16 "
        "instead of fp16, or set trainer.on_nonfinite=skip."
    )


def _finite_on_every_rank(loss: torch.Tensor, model: nn.Module, scaler: torch.amp.GradScaler) -> bool:
    """Whether every rank's loss and the (all-reduced, so shared) gradients are finite."""
    ok = torch.isfinite(loss.detach()).all()
    if not scaler.is_enabled():  # with fp16 the scaler skips overflowing gradients itself
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        ok = ok & torch.isfinite(nn.utils.get_total_norm(grads))
    flag = ok.float().reshape(1)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: DataLoader, precision: Precision, channels_last: bool = False
) -> dict[str, float]:
    """Top-1 / top-5 error (percent) and mean loss over every sample of ``loader``.

    Single-label targets (class indices): cross-entropy; an image is a top-k error when its class is
    not among the k highest logits. Multi-hot targets: binary cross-entropy; top-k error is the
    multi-label one-error, an image whose k highest logits hold none of its labels, over the images
    with at least one label. Sums are reduced across processes, so with a non-padding sampler each
    image counts once.
    """
    model.eval()
    device = precision.device
    memory_format = torch.channels_last if channels_last else torch.preserve_format
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, top-1 hits, top-5 hits
    scored_multi = torch.zeros((), dtype=torch.float64, device=device)  # multi-hot images with a label
    images = scored_single = 0  # counted on the host: no device tensor built from a host number per batch
    start = time.perf_counter()
    skipped: list[str] = []
    for batch in loader:
        x, y = batch
        skipped += batch_skipped(batch)
        if x is None:  # every image of this batch was unreadable
            continue
        x = x.to(device, non_blocking=True, memory_format=memory_format)
        y = y.to(device, non_blocking=True)
        with precision.autocast():
            logits = model(x)
        logits = logits.float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        if y.dim() == 2:  # multi-hot
            loss = F.binary_cross_entropy_with_logits(logits, y.float(), reduction="none").mean(1).sum()
            hits = y.gather(1, top) > 0
            scored_multi += (y > 0).any(1).sum()
        else:
            loss = F.cross_entropy(logits, y, reduction="sum")
            hits = top.eq(y[:, None])
            scored_single += len(y)
        images += len(y)
        sums += torch.stack([loss, hits[:, 0].sum(), hits.any(1).sum()]).double()
    elapsed = time.perf_counter() - start
    counts = torch.tensor([scored_single, images], dtype=torch.float64, device=device)
    loss, top1, top5, scored_multi, scored_single, n = all_reduce_sum(
        torch.cat([sums, scored_multi.reshape(1), counts])).tolist()
    n, scored = max(n, 1), max(scored_multi + scored_single, 1)
    return {
        "top1_err": 100.0 * (1 - top1 / scored), "top5_err": 100.0 * (1 - top5 / scored), "loss": loss / n,
        "images_per_s": n / elapsed, "count": int(n), "skipped": skipped,
    }
