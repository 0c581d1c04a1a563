"""Index selection: class-balanced subsets and an exact (non-padding) evaluation shard."""
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


def balanced_indices(targets: Sequence[int], n: int, seed: int = 0) -> list[int]:
    """``n`` indices spread as evenly over the classes as the data allows, chosen by ``seed``.

    Each class gets ``n // C`` (the first ``n % C`` classes one more); a class with too few samples
    gives all it has and the rest is not redistributed.
    """
    targets = torch.as_tensor(list(targets))
    classes = torch.unique(targets).tolist()
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for i, c in enumerate(classes):
        quota = n // len(classes) + (1 if i < n % len(classes) else 0)
        members = torch.nonzero(targets == c).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        chosen += members[:quota].tolist()
    return sorted(chosen)


class ShardSampler(Sampler[int]):
    """Rank r of w takes indices r, r+w, r+2w, ...: every sample counted exactly once, no padding."""

    def __init__(self, size: int, rank: int = 0, world_size: int = 1):
        self.indices = range(rank, size, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
