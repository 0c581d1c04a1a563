"""Stopping cleanly: signals (SLURM preemption, Ctrl-C) and checkpoints in the middle of an epoch."""
import signal
from collections.abc import Callable

import torch
import torch.distributed as dist

from engine.checkpoint import pause_for_tests

STOP_SIGNALS = tuple(s for s in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGUSR1", None)) if s is not None)


class RunInterrupted(Exception):
    """The run stopped on a signal after writing a checkpoint; running the same command resumes it."""


class StopSignals:
    """While active, SIGTERM, SIGUSR1 and SIGINT are recorded instead of killing the process."""

    def __init__(self):
        self.received: str | None = None
        self._previous = {}

    def _record(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def __enter__(self) -> "StopSignals":
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class StepCheckpointer:
    """After each step: is a mid-epoch checkpoint due (every ``every`` steps, or a signal on any rank)?

    With several ranks the signal flag is all-reduced every step, so every rank stops after the same
    step and the one checkpoint matches all of them.
    """

    def __init__(self, every: int | None, signals: StopSignals, save: Callable[[dict], None],
                 device: torch.device):
        self.every, self.signals, self._save, self.device = every, signals, save, device
        self.stop = False

    def due(self, batches_done: int) -> bool:
        """Decide after a step; sets ``stop`` when a stop signal arrived here or on another rank."""
        requested = self.signals.received is not None
        if dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([float(requested)], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            requested = bool(flag.item())
        self.stop = requested
        return requested or bool(self.every and batches_done % self.every == 0)

    def save(self, progress: dict) -> None:
        """Write the mid-epoch checkpoint; ``progress``: the epoch's ``batches`` done and loss totals."""
        self._save(progress)
        pause_for_tests("ATTNLAB_TEST_PAUSE_AFTER_STEP_CHECKPOINT")
