"""Stopping cleanly: signals (SLURM preemption, Ctrl-C) and checkpoints in the middle of an epoch."""
import signal
from collections.abc import Callable

import torch
import torch.distributed as dist

from engine.checkpoint import pause_for_tests
from engine.distributed import cpu_group

STOP_SIGNALS = tuple(s for s in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGUSR1", None)) if s is not None)


class RunInterrupted(Exception):
    """The run stopped on a signal after writing a checkpoint; running the same command resumes it.

    ``handoff``: ``(handler, signum)`` of whoever handled the signal before the run (submitit's
    requeue-on-preemption under SLURM), to be called once the run has stopped.
    """

    def __init__(self, message: str, handoff: tuple[Callable, int] | None = None):
        super().__init__(message)
        self.handoff = handoff


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

    def handoff(self) -> tuple[Callable, int] | None:
        """The received signal's previous handler with the signal, when that handler is someone's own
        Python function (submitit's requeue), not a default; None otherwise."""
        if self.received is None:
            return None
        sig = signal.Signals[self.received]
        previous = self._previous.get(sig)
        if callable(previous) and previous is not signal.default_int_handler:
            return previous, int(sig)
        return None

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class StepCheckpointer:
    """After each step: is a mid-epoch checkpoint due (every ``every`` steps, or a signal on any rank)?

    With several ranks each step sends this rank's signal flag in an asynchronous all-reduce over a
    CPU (gloo) group and reads the previous step's result, so the GPU never waits for it and every
    rank stops after the same step: the step after the signal arrived.
    """

    def __init__(self, every: int | None, signals: StopSignals, save: Callable[[dict], None]):
        self.every, self.signals, self._save = every, signals, save
        self.stop = False
        self._group = cpu_group() if dist.is_initialized() and dist.get_world_size() > 1 else None
        self._exchange = None  # the previous step's (work, flag)

    def due(self, batches_done: int) -> bool:
        """Decide after a step; sets ``stop`` when a stop signal arrived here or on another rank."""
        requested = self.signals.received is not None
        if self._group is not None:
            requested = self._exchanged()
            flag = torch.tensor([float(self.signals.received is not None)])
            self._exchange = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True), flag)
        self.stop = requested
        return requested or bool(self.every and batches_done % self.every == 0)

    def _exchanged(self) -> bool:
        """Whether any rank had a signal by the previous step (False at the first step)."""
        if self._exchange is None:
            return False
        work, flag = self._exchange
        work.wait()
        self._exchange = None
        return bool(flag.item())

    def close(self) -> None:
        """Finish the last exchange (every rank calls this after its epoch's last step)."""
        self._exchanged()

    def save(self, progress: dict) -> None:
        """Write the mid-epoch checkpoint; ``progress``: the epoch's ``batches`` done and loss totals."""
        self._save(progress)
        pause_for_tests("ATTNLAB_TEST_PAUSE_AFTER_STEP_CHECKPOINT")
