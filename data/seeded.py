"""Per-sample augmentation randomness: a function of (seed, epoch, index), not of the loader's workers."""
import random

import numpy as np
import torch
from torch.utils.data import Dataset


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample of one epoch."""
    return ((seed * 1_000_003 + epoch) * 1_000_003 + index) % (2**63 - 1)


class PerSampleSeed(Dataset):
    """Takes ``(index, epoch)`` keys (from ``EpochOrder``) and seeds torch, NumPy and Python's RNGs
    from (seed, epoch, index) before loading, so the sample is the same in any worker and after a resume."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, epoch = key
        s = sample_seed(self.seed, epoch, index)
        torch.manual_seed(s)
        np.random.seed(s % 2**32)
        random.seed(s)
        return self.dataset[index]
