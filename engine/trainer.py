"""One training epoch and one evaluation pass."""
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from data.corrupt import batch_skipped, require_images
from engine.checkpoint import TrainState
from engine.config import NONFINITE_ACTIONS
from engine.distributed import agree_at_sync_point, all_gather_objects, all_reduce_sum, get_world_size
from engine.hooks import fault_point
from errors import ConfigError, NonFiniteLossError

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
log = logging.getLogger("attnlab")


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


@dataclass
class StepOptions:
    """How every training step runs and reports: loss, precision, mixup, clipping, memory format, sync cadence."""

    criterion: nn.Module
    precision: Precision
    mixup: Any = None  # timm's Mixup, or None
    clip_grad: float | None = None
    channels_last: bool = False
    log_interval: int = 20  # steps between sync points
    on_nonfinite: str = "stop"
    progress_bar: bool = True  # tqdm's, on the console

    def __post_init__(self) -> None:
        if self.on_nonfinite not in NONFINITE_ACTIONS:
            raise ConfigError(f"trainer.on_nonfinite='{self.on_nonfinite}' is not valid; use one of "
                              f"{', '.join(NONFINITE_ACTIONS)}")


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    state: TrainState,
    options: StepOptions,
    *,
    resumed: dict[str, Any] | None = None,
    checkpointer=None,  # an engine.interrupt.StepCheckpointer
    writer=None,  # a SummaryWriter (or engine.tensorboard.LazyWriter)
) -> dict[str, Any]:
    """Train epoch ``state.epoch + 1`` on ``loader``; returns its loss totals, steps, images/s, skips.

    ``model`` runs the steps: ``state.model``, perhaps compiled or DDP-wrapped (the EMA and the
    checkpoints use ``state.model`` itself); ``state.step`` counts the
    optimizer steps taken (the schedule and the TensorBoard x-axis count steps) and grows by one a step.
    ``resumed``: a mid-epoch checkpoint's progress into this epoch (``batches`` already taken, which
    the loader skips, and their loss totals).

    The host waits for the device only at sync points: every ``log_interval`` steps, at a periodic
    checkpoint and at the epoch's end. There the losses are read back and the ranks exchange, in one
    small all-reduce, their stop signals and the first non-finite loss any of them saw. A non-finite
    loss, with ``on_nonfinite``:

    - ``stop``: raised on every rank with its exact step at the sync point that finds it, before any
      checkpoint could hold the damaged weights;
    - ``skip``: every step checks (one host sync and, with several ranks, one scalar all-reduce) that
      all ranks' losses and the gradients are finite, and otherwise every rank skips the update.

    ``checkpointer`` writes a mid-epoch checkpoint at its periodic steps, and on a stop signal (at the
    next sync point; in a single process at once), then stops the epoch there (``stopped``).
    """
    model.train()
    epoch = state.epoch + 1
    progress = {"batches": 0, "loss_sum": 0.0, "loss_steps": 0, "skipped_steps": 0, **(resumed or {})}
    bar = tqdm(loader, desc=f"epoch {epoch}", disable=not options.progress_bar, leave=False, dynamic_ncols=True)
    tally = LossTally(progress, options.on_nonfinite, bar, writer)
    single_process = get_world_size() == 1
    skipped: list[str] = []
    stopped, steps_run, start = False, 0, time.perf_counter()
    for i, batch in enumerate(bar):
        require_images(batch)
        skipped += batch_skipped(batch)
        state.step += 1
        loss, images, updated = train_step(model, batch, state, options)
        tally.add(loss, images)
        progress["skipped_steps"] += int(not updated)
        steps_run += 1
        progress["batches"] += 1
        checkpoint_due = checkpointer is not None and checkpointer.due(progress["batches"])
        signalled = checkpointer is not None and checkpointer.requested
        # the ranks meet at the same steps; a single process needs no meeting to act on a signal
        if tally.waiting == options.log_interval or i + 1 == len(loader) or checkpoint_due or (
                single_process and signalled):
            stop, nonfinite = agree_at_sync_point(signalled, tally.flush(state.step, state.optimizer.param_groups[0]["lr"]))
            if nonfinite is not None:
                _raise_nonfinite(*nonfinite, epoch)
            if checkpoint_due or stop:  # a checkpoint holds only checked losses
                checkpointer.save(dict(progress))
            if stop:
                stopped = True
                break
    elapsed = time.perf_counter() - start
    return {**progress, "steps": steps_run, "images_per_s": tally.images * get_world_size() / elapsed,
            "skipped": skipped, "stopped": stopped}


def train_step(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], state: TrainState,
               options: StepOptions) -> tuple[torch.Tensor, int, bool]:
    """Forward, backward and update on one batch as optimizer step ``state.step``; returns the loss,
    the batch's image count and whether the weights were updated.

    The loss stays on the device (read back at the next sync point). With ``on_nonfinite=skip`` a
    non-finite loss or gradient on any rank skips the update on every rank.
    """
    x, y = batch
    x = x.to(options.precision.device, non_blocking=True,
             memory_format=torch.channels_last if options.channels_last else torch.preserve_format)
    y = y.to(options.precision.device, non_blocking=True)
    if options.mixup is not None:
        x, y = options.mixup(x, y)
    optimizer, scaler = state.optimizer, state.scaler
    with options.precision.autocast():
        loss = options.criterion(model(x), y)
    loss = fault_point("loss", loss, step=state.step)
    scaler.scale(loss).backward()
    if options.clip_grad:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        nn.utils.clip_grad_norm_(model.parameters(), options.clip_grad)
    if options.on_nonfinite == "skip" and not _finite_on_every_rank(loss, model, scaler):
        optimizer.zero_grad(set_to_none=True)
        if scaler.is_enabled():
            scaler.update(scaler.get_scale())  # keep the scale; clear this step's unscale_ record
        log.warning("step %d (epoch %d): non-finite loss or gradient; update skipped on every rank "
                    "(trainer.on_nonfinite=skip)", state.step, state.epoch + 1)
        updated = False
    else:
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if state.ema is not None:
            state.ema.update(state.model, step=state.step)
        updated = True
    if state.scheduler is not None:
        state.scheduler.step_update(state.step)
    return loss.detach(), x.shape[0], updated


class LossTally:
    """The step losses not yet read back, and the epoch's checked loss totals (in ``progress``)."""

    def __init__(self, progress: dict[str, Any], on_nonfinite: str, bar: tqdm, writer=None):
        self.progress, self.on_nonfinite, self.bar, self.writer = progress, on_nonfinite, bar, writer
        self.pending: list[torch.Tensor] = []
        self.images, self.interval_images = 0, 0
        self.last_read = time.perf_counter()

    @property
    def waiting(self) -> int:
        """How many steps' losses wait to be read back."""
        return len(self.pending)

    def add(self, loss: torch.Tensor, images: int) -> None:
        """Keep a step's loss (on the device) and count its images."""
        self.pending.append(loss)
        self.images += images
        self.interval_images += images

    def flush(self, step: int, lr: float) -> int | None:
        """Read the pending losses (of the steps up to ``step``) back, add them up and log them;
        returns the step of the first non-finite one when ``on_nonfinite=stop``."""
        if not self.pending:
            return None
        losses = torch.stack(self.pending).cpu().double()  # float32 values add up exactly in float64, in any grouping
        finite = torch.isfinite(losses)
        bad = (~finite).nonzero()
        first_bad = step - len(losses) + 1 + int(bad[0]) if len(bad) and self.on_nonfinite == "stop" else None
        self.progress["loss_sum"] += losses[finite].sum().item()
        self.progress["loss_steps"] += int(finite.sum())
        now = time.perf_counter()
        rate = self.interval_images * get_world_size() / max(now - self.last_read, 1e-9)
        mean = losses[finite].mean().item() if finite.any() else float("nan")
        self.bar.set_postfix(loss=f"{mean:.4f}", lr=f"{lr:.3g}", img_s=f"{rate:.0f}")
        if self.writer is not None:
            self.writer.add_scalar("train/loss", mean, step)
            self.writer.add_scalar("train/lr", lr, step)
            self.writer.add_scalar("train/images_per_s", rate, step)
        self.pending.clear()
        self.interval_images, self.last_read = 0, now
        return first_bad


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
    with at least one label, and ``auroc`` is scikit-learn's ROC AUC of each class over the scores
    gathered from every process, averaged over the classes that have positives and negatives (None when
    none has). Sums are reduced across processes, so with a non-padding sampler each image counts once.
    """
    model.eval()
    device = precision.device
    memory_format = torch.channels_last if channels_last else torch.preserve_format
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, top-1 hits, top-5 hits
    scored_multi = torch.zeros((), dtype=torch.float64, device=device)  # multi-hot images with a label
    images = scored_single = 0  # counted on the host: no device tensor built from a host number per batch
    start = time.perf_counter()
    skipped: list[str] = []
    multi_scores: list[torch.Tensor] = []  # multi-hot only: (logits, targets) per batch, for AUROC
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
            multi_scores.append(torch.stack([logits, y.float()]))  # read back once, after the loop
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
    result = {
        "top1_err": 100.0 * (1 - top1 / scored), "top5_err": 100.0 * (1 - top5 / scored), "loss": loss / n,
        "images_per_s": n / elapsed, "count": int(n), "skipped": skipped,
    }
    if scored_multi:
        mine = torch.cat(multi_scores, 1).cpu() if multi_scores else None  # None: this rank had no batch
        result["auroc"] = mean_auroc(torch.cat([t for t in all_gather_objects(mine) if t is not None], 1))
    return result


def mean_auroc(scores_and_targets: torch.Tensor) -> float | None:
    """(2, N, K) logits and multi-hot targets -> scikit-learn's ROC AUC per class, averaged over the classes
    with both positives and negatives (None where no class has both)."""
    from sklearn.metrics import roc_auc_score

    scores, targets = scores_and_targets.double().numpy()
    both = [k for k in range(targets.shape[1]) if 0 < targets[:, k].sum() < len(targets)]
    if not both:
        return None
    return float(roc_auc_score(targets[:, both], scores[:, both], average="macro"))
