"""Training steps/s of the engine's loop against a plain PyTorch loop, measured in one process.

Usage: python scripts/benchmark.py [train.py overrides] [--steps N] [--rounds R]
Both loops train the same model on the same in-memory batches with the same optimizer; rounds
alternate between them in ABBA order so drift in machine load hits both. Prints each median and
the ratio.
"""
import argparse
import statistics
import sys
import time

import torch
from _config import compose_from_argv
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from engine.optim import build_optimizer, build_scheduler
from engine.run import select_device
from engine.trainer import build_precision, train_one_epoch
from models import build_model


def plain_loop(model, criterion, loader, optimizer, precision) -> None:
    """The loop a user would write by hand: forward, backward, step."""
    model.train()
    for x, y in loader:
        x, y = x.to(precision.device, non_blocking=True), y.to(precision.device, non_blocking=True)
        with precision.autocast():
            loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def timed(fn) -> float:
    """Seconds ``fn()`` takes, with the device synchronised on both ends."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    """Parse arguments, run the alternating rounds, print the medians and their ratio."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per round")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per loop (after one warm-up)")
    args, overrides = parser.parse_known_args()
    cfg = compose_from_argv(overrides)
    device = select_device(cfg.trainer.device)
    precision = build_precision(cfg.trainer.amp, device)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.attention, cfg.attention_extra, cfg.data.num_classes).to(device)
    size, batch = cfg.data.image_size, cfg.data.batch_size
    data = TensorDataset(torch.randn(args.steps * batch, 3, size, size),
                         torch.randint(0, cfg.data.num_classes, (args.steps * batch,)))
    loader = DataLoader(data, batch_size=batch, pin_memory=device.type == "cuda")
    criterion = nn.CrossEntropyLoss()
    engine_opt, plain_opt = build_optimizer(model, cfg.optim), build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(engine_opt, cfg.sched, cfg.trainer.epochs, args.steps)

    def engine_round():
        """One pass of the engine's loop, as train.py runs it (schedule stepped every step)."""
        train_one_epoch(model, criterion, loader, engine_opt, precision, epoch=1, scheduler=scheduler,
                        log_interval=cfg.trainer.log_interval, progress=False)

    def plain_round():
        """One pass of the hand-written loop."""
        plain_loop(model, criterion, loader, plain_opt, precision)

    engine_round(), plain_round()  # warm-up: allocator, kernels, caches
    engine_s, plain_s = [], []
    for i in range(args.rounds):  # ABBA order, so whatever favours going first or second cancels
        pair = [(engine_s, engine_round), (plain_s, plain_round)]
        for times, fn in pair if i % 2 == 0 else pair[::-1]:
            times.append(timed(fn))
    engine_rate, plain_rate = args.steps / statistics.median(engine_s), args.steps / statistics.median(plain_s)
    print(f"model {cfg.model.name} + {cfg.attention.name}, batch {batch}, {size}x{size}, {device.type}, "
          f"{args.rounds} rounds x {args.steps} steps")
    print(f"engine: {engine_rate:.2f} steps/s   plain loop: {plain_rate:.2f} steps/s")
    print(f"engine / plain time ratio: {plain_rate / engine_rate:.3f} "
          f"(overhead {100 * (plain_rate / engine_rate - 1):+.1f}%, goal <= +3%)")


if __name__ == "__main__":
    main()
    sys.exit(0)
