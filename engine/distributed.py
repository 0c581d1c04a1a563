"""Where a process is set up, and small distributed helpers: the device and the seeds, torchrun's environment
in, rank queries and reductions out."""
import os
import random
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from engine.config import DEVICES
from engine.launcher import submitit_slurm_tasks
from errors import ConfigError, RankLostError


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


def check_sync_bn(sync_bn: bool, device: torch.device) -> None:
    """SyncBatchNorm runs on CUDA only (torch's kernels); on the CPU say what to use instead."""
    if sync_bn and device.type != "cuda":
        raise ConfigError("trainer.sync_bn=true needs CUDA devices; on the CPU use model.norm=group for "
                          "batch statistics that do not depend on the per-process batch")


def init_distributed(device: torch.device, timeout_s: float = 600) -> tuple[int, int]:
    """Join the process group when launched by torchrun or as several SLURM tasks; returns (rank, world_size).

    ``timeout_s`` bounds how long a collective waits for a rank that has stopped answering; on CUDA
    NCCL's async error handling (on by default) then aborts the collective instead of hanging.
    """
    if submitit_slurm_tasks():
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export()  # RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT from SLURM
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ or dist.is_initialized():
        return get_rank(), get_world_size()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    except RuntimeError as e:
        hint = ""
        if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) > 0 and \
                os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # torchrun keeps one rendezvous store across restarts, holding the first attempt's addresses
            hint = "; relaunch torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 so --max-restarts can reconnect"
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise RankLostError(f"could not join the process group ({first}){hint}") from e
    return dist.get_rank(), dist.get_world_size()


# How the backends word a lost peer or a timeout (gloo raises plain RuntimeErrors).
_LOST_PEER = ("gloo", "nccl", "processgroup", "connection reset", "connection closed", "broken pipe",
              "timed out", "timeout")


def _is_lost_peer(error: BaseException) -> bool:
    """Whether ``error`` is a backend's report of a peer that went away or timed out."""
    return isinstance(error, dist.DistError) or (
        isinstance(error, RuntimeError) and any(k in str(error).lower() for k in _LOST_PEER))


def as_rank_lost(error: BaseException, timeout_s: float) -> RankLostError | None:
    """A clear RankLostError for a collective that failed on a lost peer, else None."""
    if not dist.is_initialized() or dist.get_world_size() == 1 or isinstance(error, RankLostError):
        return None
    cause = error
    while cause is not None and not _is_lost_peer(cause):  # e.g. a data-loader worker error raised after it
        cause = cause.__context__
    if cause is None:
        return None
    text = str(cause).strip()
    first = text.splitlines()[0][:300] if text else type(cause).__name__
    return RankLostError(
        f"rank {dist.get_rank()} lost contact with another rank, which died or did not answer within "
        f"trainer.dist_timeout_s={timeout_s:g} s ({first}); stopped. Check the other ranks' logs, then run "
        "the same command to resume from the last complete checkpoint"
    )


_cpu_group = None


def cpu_group():
    """A gloo group over every rank for small host-side exchanges (the default group when it is gloo)."""
    global _cpu_group
    if dist.get_backend() == "gloo":
        return dist.group.WORLD
    if _cpu_group is None:  # collective: every rank reaches this at the same point
        _cpu_group = dist.new_group(backend="gloo")
    return _cpu_group


def agree_at_sync_point(stop: bool, first_nonfinite_step: int | None) -> tuple[bool, tuple[int, int] | None]:
    """What every rank learns at a sync point of the step loop, in one all-reduce over the CPU group:
    whether any rank wants to stop, and the first step (with its lowest rank) whose loss was not finite.

    Returns ``(stop, (step, rank) or None)``; without a process group, this process's own facts.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return stop, (None if first_nonfinite_step is None else (first_nonfinite_step, 0))
    world, rank = dist.get_world_size(), dist.get_rank()
    # MAX of the negated (step * world + rank): the earliest step, and the lowest rank that saw it there
    bad = -float("inf") if first_nonfinite_step is None else -float(first_nonfinite_step * world + rank)
    flags = torch.tensor([float(stop), bad], dtype=torch.float64)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=cpu_group())
    if flags[1].item() == -float("inf"):
        return bool(flags[0].item()), None
    code = int(-flags[1].item())
    return bool(flags[0].item()), (code // world, code % world)


def get_rank() -> int:
    """This process's rank, 0 when not distributed."""
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size() -> int:
    """Number of processes, 1 when not distributed."""
    return dist.get_world_size() if dist.is_initialized() else 1


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank (a picklable value, e.g. the run directory)."""
    if not dist.is_initialized():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def all_gather_objects(obj) -> list:
    """Every rank's ``obj``, in rank order (a one-element list when not distributed)."""
    if not dist.is_initialized():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over all processes (in place) and return it."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    """Wait until every rank gets here (nothing when not distributed)."""
    if dist.is_initialized():
        dist.barrier()


class ReplicasDivergedError(RuntimeError):
    """DDP replicas that should be identical are not."""


def check_replicas_agree(model: torch.nn.Module, when: str) -> None:
    """Raise if the ranks' weights differ (they must be bit-identical under DDP); costs two scalar all-reduces.

    A rank that took a different step (skipped an update the others made) would otherwise train on
    silently, and rank 0's checkpoint would not be what the other ranks computed.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    with torch.no_grad():
        checksum = sum(p.double().sum() for p in model.parameters())
    checksum = torch.nan_to_num(checksum, nan=-1e300)  # NaN on every rank still counts as agreeing
    low, high = checksum.clone().reshape(1), checksum.clone().reshape(1)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise ReplicasDivergedError(
            f"the ranks' weights differ after {when} (parameter sums {low.item():.17g} to {high.item():.17g}): "
            "some rank skipped or repeated an update; rank 0's checkpoints would not match the others"
        )


def cleanup() -> None:
    """Leave the process group if one was joined."""
    global _cpu_group
    if dist.is_initialized():
        dist.destroy_process_group()
    _cpu_group = None
