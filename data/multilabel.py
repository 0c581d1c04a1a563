"""Multi-label image sets listed in CSV files (``DIR/train.csv``, ``DIR/val.csv``), e.g. ChestX-ray14."""
import csv
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset

from errors import DataError
from data.folder import load_rgb


class MultiLabelCSV(Dataset):
    """Rows ``image,labels``: a path relative to the root and class names joined by ``|`` (empty: none).

    Samples are (image, multi-hot float vector of ``len(classes)``). ``targets`` holds each image's
    first label (``len(classes)`` for none), the key class-balanced subsets stratify by.
    """

    def __init__(self, root: Path, split: str, classes: Sequence[str], transform: Callable | None = None):
        path = root / f"{split}.csv"
        if not path.is_file():
            raise DataError(f"{path} does not exist; data.root must hold train.csv and val.csv "
                            "(columns image,labels)")
        self.classes, self.transform = list(classes), transform
        index = {name: i for i, name in enumerate(self.classes)}
        self.samples: list[tuple[str, torch.Tensor]] = []
        with open(path, newline="") as f:
            for line, row in enumerate(csv.DictReader(f), start=2):
                if "image" not in row or "labels" not in row:
                    raise DataError(f"{path}: the header must name the columns image,labels")
                names = [n for n in (row["labels"] or "").split("|") if n]
                unknown = [n for n in names if n not in index]
                if unknown:
                    raise DataError(f"{path}:{line}: unknown label(s) {', '.join(unknown)}; "
                                    f"data.classes lists {', '.join(self.classes)}")
                target = torch.zeros(len(self.classes))
                target[[index[n] for n in names]] = 1.0
                self.samples.append((str(root / row["image"]), target))
        self.targets = [int(t.argmax()) if t.any() else len(self.classes) for _, t in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(image, multi-hot target)."""
        path, target = self.samples[i]
        image = load_rgb(path)
        return (self.transform(image) if self.transform else image), target
