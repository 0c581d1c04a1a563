"""``data.skip_corrupt=true``: unreadable images are left out of their batch and reported, never replaced."""
from dataclasses import dataclass

from torch.utils.data import Dataset, default_collate

from errors import DataError


@dataclass(frozen=True)
class Skipped:
    """Stands in for a sample whose image could not be read; ``reason`` names the file."""

    reason: str


class Batch(tuple):
    """(images, targets) of one batch, with the reasons its unreadable images were left out."""

    def __new__(cls, items, skipped=()):
        batch = super().__new__(cls, items)
        batch.skipped = tuple(skipped)
        return batch

    def __reduce__(self):
        return Batch, (tuple(self), self.skipped)

    def pin_memory(self) -> "Batch":
        """The batch in pinned memory, keeping ``skipped`` (torch's pin_memory would rebuild a plain tuple)."""
        from torch.utils.data._utils.pin_memory import pin_memory

        return Batch(tuple(pin_memory(item) for item in self), self.skipped)


class SkipCorrupt(Dataset):
    """``dataset`` whose unreadable samples come back as ``Skipped`` instead of raising."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        try:
            return self.dataset[i]
        except DataError as e:
            return Skipped(str(e))


def collate_skipping(samples: list) -> Batch:
    """Collate the readable samples; the unreadable ones' reasons ride along in ``Batch.skipped``.

    A batch with no readable image is ``(None, None)``: evaluation passes over it (a small val shard's
    last batch can be all unreadable), training refuses it (``require_images``).
    """
    good = [s for s in samples if not isinstance(s, Skipped)]
    skipped = [s.reason for s in samples if isinstance(s, Skipped)]
    return Batch(default_collate(good) if good else (None, None), skipped)


def require_images(batch) -> None:
    """Raise DataError for a training batch whose every image was unreadable (no step can be taken)."""
    if batch[0] is None:
        raise DataError(f"every image of a training batch is unreadable, e.g. {batch_skipped(batch)[0]}; "
                        "remove or replace the files, or use a larger data.batch_size")


def batch_skipped(batch) -> tuple[str, ...]:
    """The reasons images were left out of ``batch`` (none for an ordinary batch)."""
    return getattr(batch, "skipped", ())


__all__ = ["Batch", "SkipCorrupt", "Skipped", "batch_skipped", "collate_skipping", "require_images"]
