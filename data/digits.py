"""scikit-learn's bundled handwritten digits as a 32x32 RGB classification set (works offline)."""
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

CLASSES = [str(d) for d in range(10)]


class DigitsDataset(Dataset):
    """1,797 real 8x8 digits upsampled to ``image_size`` and repeated to 3 channels.

    The train/val split is fixed (stratified, 20% val, random_state=0) whatever the run's seed,
    so results of different runs are comparable.
    """

    def __init__(self, train: bool, image_size: int = 32, transform: Callable | None = None):
        from sklearn.datasets import load_digits  # scikit-learn takes a second to import: only for digits
        from sklearn.model_selection import train_test_split

        bunch = load_digits()
        images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0  # N, 1, 8, 8
        train_idx, val_idx = train_test_split(
            range(len(bunch.target)), test_size=0.2, stratify=bunch.target, random_state=0
        )
        idx = torch.tensor(train_idx if train else val_idx)
        images = F.interpolate(images[idx], size=image_size, mode="bilinear", align_corners=False)
        self.images = images.clamp(0, 1).expand(-1, 3, -1, -1).contiguous()  # N, 3, S, S in [0, 1]
        self.targets = [int(t) for t in bunch.target[idx.numpy()]]
        self.classes = CLASSES
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """Returns (image (3, S, S) float, label)."""
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]
