"""The training set as the loader reads it: keyed by (index, epoch), augmented from (seed, epoch, index)."""
from torch.utils.data import Dataset

from data.corrupt import Skipped


class KeyedSamples(Dataset):
    """Takes ``(index, epoch)`` keys (from ``EpochOrder``) and augments sample ``index`` with
    ``transform(image, seed, epoch, index)``, so the sample is the same in any worker, on any rank and
    after a resume, and no process-global RNG is touched."""

    def __init__(self, dataset: Dataset, transform, seed: int):
        self.dataset, self.transform, self.seed = dataset, transform, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, epoch = key
        sample = self.dataset[index]
        if isinstance(sample, Skipped):  # data.skip_corrupt: an unreadable image passes through to the collate
            return sample
        image, target = sample
        return self.transform(image, self.seed, epoch, index), target
