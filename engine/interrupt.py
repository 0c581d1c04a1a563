"""Stopping cleanly: signals (SLURM preemption, Ctrl-C) and checkpoints in the middle of an epoch."""
import signal
from collections.abc import Callable

from engine.hooks import fault_point

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
    """Mid-epoch checkpoints: every ``every`` steps, and when a stop signal arrived on any rank.

    The engine asks at its sync points (``train_one_epoch``), where the ranks exchange their signal
    flags in the same all-reduce as their non-finite-loss reports, so every rank stops after the
    same step.
    """

    def __init__(self, every: int | None, signals: StopSignals, save: Callable[[dict], None]):
        self.every, self.signals, self._save = every, signals, save

    def due(self, batches_done: int) -> bool:
        """Whether a periodic checkpoint falls after ``batches_done`` of the epoch's steps."""
        return bool(self.every and batches_done % self.every == 0)

    @property
    def requested(self) -> bool:
        """Whether this process received a stop signal."""
        return self.signals.received is not None

    def save(self, progress: dict) -> None:
        """Write the mid-epoch checkpoint; ``progress``: the epoch's ``batches`` done and loss totals."""
        self._save(progress)
        fault_point("after_step_checkpoint")
