"""The compute-only step of a recipe: its model, batch, precision, memory format and optimiser on batches
already in memory, with no data path; the ceiling that ``scripts/benchmark.py --recipe`` holds train.py to.

Usage: python scripts/compute_loop.py [--steps N] [--warmup W] [--json] [train.py overrides, e.g.
       experiment=cifar10_resnet20 attention=se]

It builds the step train.py builds from the same overrides: ``models.build_model``, the loss and
mixup (``engine.losses``), the optimiser and precision, channels_last, ``trainer.compile``, gradient
clipping and the EMA as configured, glibc's allocator setting (``engine.allocator``) and
``trainer.deterministic``. It takes ``--warmup`` steps, then times ``--steps`` steps on eight random
batches in turn, and prints images per second. Threads: torch's default, or OMP_NUM_THREADS.
"""
import argparse
import json
import time

import torch
from timm.utils import ModelEmaV3
from torch import nn

from _project import use_project

use_project()  # before the project's own imports

from _config import compose_from_argv  # noqa: E402
from engine.allocator import keep_freed_memory  # noqa: E402
from engine.distributed import seed_everything, select_device  # noqa: E402
from engine.losses import build_criterion  # noqa: E402
from engine.optim import build_optimizer  # noqa: E402
from engine.trainer import build_precision  # noqa: E402
from models import build_model  # noqa: E402

BATCHES = 8  # distinct in-memory batches, taken in turn


def compute_rate(overrides: list[str], steps: int, warmup: int) -> dict:
    """Images per second of ``steps`` timed compute-only steps of the configured recipe."""
    malloc = keep_freed_memory()
    cfg = compose_from_argv(overrides)
    device = select_device(cfg.trainer.device)
    precision = build_precision(cfg.trainer.amp, device)
    seed_everything(cfg.seed, cfg.trainer.deterministic)  # deterministic kernels too, as the recipe runs
    memory_format = torch.channels_last if cfg.trainer.channels_last else torch.contiguous_format
    model = build_model(cfg.model, cfg.attention, cfg.attention_extra, cfg.data.num_classes, cfg.data.image_size)
    model.to(device, memory_format=memory_format).train()
    optimizer = build_optimizer(model, cfg.optim)
    ema = ModelEmaV3(model, decay=cfg.trainer.ema_decay) if cfg.trainer.ema else None
    trained = torch.compile(model) if cfg.trainer.compile else model
    size, batch = cfg.data.image_size, cfg.data.batch_size
    batches = [(torch.randn(batch, 3, size, size, device=device).to(memory_format=memory_format),
                torch.randint(0, cfg.data.num_classes, (batch,), device=device)) for _ in range(BATCHES)]
    criterion, mixup = build_criterion(cfg.data, mix_token=bool(cfg.model.get("mix_token")))

    def step(i: int) -> None:
        x, y = batches[i % BATCHES]
        if mixup is not None:
            x, y = mixup(x, y)
        with precision.autocast():
            loss = criterion(trained(x), y)
        precision.scaler.scale(loss).backward()
        if cfg.optim.clip_grad:
            precision.scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
        precision.scaler.step(optimizer)
        precision.scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(model, step=i)

    for i in range(warmup):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(steps):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"images_per_s": steps * batch / seconds, "steps": steps, "batch": batch, "seconds": seconds,
            "torch_threads": torch.get_num_threads(), "host_malloc": "tuned" if len(malloc) == 2 else "default",
            "deterministic": bool(cfg.trainer.deterministic), "compiled": bool(cfg.trainer.compile)}


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, time the steps, print the rate (or its JSON record)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100, help="timed steps")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first: kernels, allocator, caches")
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of a sentence")
    args, overrides = parser.parse_known_args(argv)
    result = compute_rate(overrides, args.steps, args.warmup)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"compute-only: {result['images_per_s']:.0f} img/s ({args.steps} steps of {result['batch']}, "
              f"{result['torch_threads']} thread(s), malloc {result['host_malloc']})")


if __name__ == "__main__":
    main()
