"""TensorBoard helpers: a writer made on first use, and the run's hyper-parameters and final metrics
for the HParams plugin."""
import functools
import threading
from collections.abc import Callable, Mapping
from typing import Any

from engine.files import reported_as_write_error


class LazyWriter:
    """A ``SummaryWriter`` for ``log_dir`` that is imported and created when first written to, so
    TensorBoard's import (a third of a second) stays out of the time to the first training step.

    A failed write of its event file (a full disk) raises ``WriteError`` naming ``log_dir``, from the call
    that meets it: the writer's thread keeps its error for the next call, which re-raises it.
    """

    def __init__(self, log_dir: str):
        self.log_dir = log_dir
        self._writer = None

    def __getattr__(self, name: str):
        if name == "_writer" or name.startswith("__"):  # copying, pickling, probes: no writer, no recursion
            raise AttributeError(name)
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            _quiet_writer_threads()
            with reported_as_write_error(self.log_dir):
                self._writer = SummaryWriter(self.log_dir)
        attribute = getattr(self._writer, name)
        return _reporting(attribute, self.log_dir) if callable(attribute) else attribute

    def close(self) -> None:
        """Close the writer if one was made."""
        if self._writer is not None:
            with reported_as_write_error(self.log_dir):
                self._writer.close()


def _reporting(method: Callable, log_dir: str) -> Callable:
    """``method``, raising ``WriteError`` for a failed write of the event file."""

    @functools.wraps(method)
    def call(*args, **kwargs):
        with reported_as_write_error(log_dir):
            return method(*args, **kwargs)

    return call


@functools.cache
def _quiet_writer_threads() -> None:
    """Keep the event writer thread's OSError off stderr: its traceback would bury the one-line error that
    the next call on the writer raises."""
    from tensorboard.summary.writer.event_file_writer import _AsyncWriterThread

    previous = threading.excepthook

    def hook(args) -> None:
        if not (isinstance(args.thread, _AsyncWriterThread) and isinstance(args.exc_value, OSError)):
            previous(args)

    threading.excepthook = hook


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> {"a.b": value}, with values TensorBoard's HParams accepts."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        elif value is None or isinstance(value, (list, tuple)):
            flat[name] = str(value)
        else:
            flat[name] = value
    return flat


def log_hparams(writer, config: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
    """Write hyper-parameters and final metrics into the run's own event file.

    ``SummaryWriter.add_hparams`` would open a second run in a subdirectory; writing the summaries
    through the existing file writer keeps one run per directory in the HParams table.
    """
    from torch.utils.tensorboard.summary import hparams

    exp, ssi, sei = hparams(flatten({k: v for k, v in config.items() if k != "paper"}), dict(metrics))  # not a setting
    with reported_as_write_error(writer.log_dir):
        file_writer = writer._get_file_writer()
        for summary in (exp, ssi, sei):
            file_writer.add_summary(summary)
    for tag, value in metrics.items():
        writer.add_scalar(tag, value)
    writer.flush()
