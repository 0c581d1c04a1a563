"""TensorBoard helpers: the run's hyper-parameters and final metrics for the HParams plugin."""
from collections.abc import Mapping
from typing import Any

from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams


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


def log_hparams(writer: SummaryWriter, config: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
    """Write hyper-parameters and final metrics into the run's own event file.

    ``SummaryWriter.add_hparams`` would open a second run in a subdirectory; writing the summaries
    through the existing file writer keeps one run per directory in the HParams table.
    """
    exp, ssi, sei = hparams(flatten(config), dict(metrics))
    file_writer = writer._get_file_writer()
    for summary in (exp, ssi, sei):
        file_writer.add_summary(summary)
    for tag, value in metrics.items():
        writer.add_scalar(tag, value)
    writer.flush()
