"""What the step loop's own synchronisation costs with several ranks: the engine's ``train_one_epoch``
(with a stop-signal checkpointer, as train.py runs it) on a tiny DDP model with gloo on the CPU, so
that per-step collectives and host syncs, not the model, dominate.

Usage: python scripts/benchmark_ranks.py [--ranks 2] [--steps 400] [--rounds 3] [--log-interval 20]
Prints the median time per step of the engine and of a bare forward/backward/step loop on the same DDP
model, for 1 rank and for ``--ranks`` ranks: the bare loop's extra with several ranks is DDP's gradient
all-reduce, the engine's extra beyond that its own stop-signal and non-finite-loss exchanges.
"""
import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from _project import use_project

use_project()  # before the project's own imports

from engine.interrupt import StepCheckpointer, StopSignals  # noqa: E402
from engine.checkpoint import TrainState  # noqa: E402
from engine.trainer import StepOptions, build_precision, train_one_epoch  # noqa: E402


def one_rank(rank: int, world: int, store: str, args: argparse.Namespace, out: str) -> None:
    """Time ``args.rounds`` epochs of ``args.steps`` steps on this rank; rank 0 writes the median."""
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model)
    batches = [(torch.randn(8, 16), torch.randint(0, 4, (8,))) for _ in range(args.steps)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    precision = build_precision("none", torch.device("cpu"))
    criterion = nn.CrossEntropyLoss()
    options = StepOptions(criterion, precision, log_interval=args.log_interval, progress_bar=False)
    engine, bare = [], []
    with StopSignals() as signals:
        for epoch in range(args.rounds + 1):  # the first is a warm-up
            checkpointer = StepCheckpointer(None, signals, lambda progress: None)
            start = time.perf_counter()
            state = TrainState(model, optimizer, None, precision.scaler, epoch=epoch)
            train_one_epoch(model, batches, state, options, checkpointer=checkpointer)
            getattr(checkpointer, "close", lambda: None)()  # engines before the sync points had one
            engine.append(time.perf_counter() - start)
            start = time.perf_counter()
            for x, y in batches:
                criterion(model(x), y).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            bare.append(time.perf_counter() - start)
    if rank == 0:
        Path(out).write_text(f"{statistics.median(engine[1:]) / args.steps} {statistics.median(bare[1:]) / args.steps}")
    if world > 1:
        dist.destroy_process_group()


def per_step(world: int, args: argparse.Namespace) -> tuple[float, float]:
    """Median seconds per step of the engine and of the bare loop with ``world`` ranks."""
    with tempfile.TemporaryDirectory() as tmp:
        store, out = os.path.join(tmp, "store"), os.path.join(tmp, "out")
        mp.spawn(one_rank, args=(world, store, args, out), nprocs=world)
        engine, bare = Path(out).read_text().split()
        return float(engine), float(bare)


def main() -> None:
    """Parse arguments, time 1 and N ranks, print both."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--log-interval", type=int, default=20)
    args = parser.parse_args()
    print(f"tiny DDP model, gloo, {args.steps} steps x {args.rounds} rounds, log interval {args.log_interval}:")
    for world in (1, args.ranks):
        engine, bare = per_step(world, args)
        print(f"{world} rank(s): engine {1e6 * engine:.0f} us/step, bare loop {1e6 * bare:.0f} us/step, "
              f"engine's own {1e6 * (engine - bare):+.0f} us/step")


if __name__ == "__main__":
    main()
