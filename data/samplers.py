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


class EpochOrder(Sampler[tuple[int, int]]):
    """The training order: a permutation that depends only on (seed, epoch), sharded over ranks.

    Yields ``(index, epoch)`` so the dataset can seed each sample's augmentation from (seed, epoch,
    index) whatever worker loads it. ``set_epoch(epoch, skip)`` starts the epoch ``skip`` samples in,
    which is how a run resumed mid-epoch sees exactly the batches it had left. With several ranks the
    permutation is padded to a multiple of the world size (as DistributedSampler does for training).
    """

    def __init__(self, size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.size, self.seed, self.rank, self.world_size = size, seed, rank, world_size
        self.per_rank = -(-size // world_size)
        self.epoch, self.skip = 1, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Use ``epoch``'s order from its ``skip``-th sample on (a checkpoint written on the epoch's last
        step leaves nothing: its last batch may be partial, so ``skip`` can exceed the rank's share)."""
        self.epoch, self.skip = epoch, min(skip, self.per_rank)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(self.seed * 10_000 + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        order += order[: self.per_rank * self.world_size - self.size]
        mine = order[self.rank::self.world_size]
        return iter([(i, self.epoch) for i in mine[self.skip:]])

    def __len__(self) -> int:
        return self.per_rank - self.skip
