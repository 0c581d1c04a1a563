"""How fast attnlab trains what users run, side by side with the loop they would write by hand.

Usage: python scripts/benchmark.py [--root DIR] [--train-samples N] [--val-samples M] [--epochs E]
       [--rounds R] [--steps S] [train.py overrides, e.g. model=resnet20 attention=se]
       python scripts/benchmark.py --recipe [--threads T] [--parallel P] [--root DIR] [--train-samples N]
       [--rounds R] [--steps S] experiment=cifar10_resnet20 [attention=se ...]

``--recipe``: the recipe as users run it against its compute-only step (``scripts/compute_loop.py``: the same
model, batch, precision, memory format, optimiser and allocator on batches already in memory). Protocol:
``--rounds`` (at least 3) rounds, the two sides alternating (the recipe first in rounds 1, 3, 5, ...), every
process with ``OMP_NUM_THREADS=--threads``; ``--parallel P`` starts P copies of a side at
once (the recipe's with seeds 0..P-1: P seeds side by side) and adds their rates. The recipe's rate is
train.py's steady state (the median of its logged ``train/images_per_s`` after the first interval) over one
epoch of ``--train-samples`` images (default 20,000; ``trainer.stop_after_epochs=1``); the compute side's is
``--steps`` timed steps (default 100) after 10 untimed. Prints each side's median and their ratio (target >= 0.95).

Without ``--recipe``:

One invocation, each comparison's two sides in ABBA order (the whole processes over the rounds, the
in-memory loops within each round), so drift in machine load hits both sides alike:

1. Real data, whole process: ``train.py data=cifar10`` on an image folder with its defaults (the
   in-memory path, fp32 unless the overrides say otherwise) against ``scripts/plain_loop.py`` (a
   torchvision ImageFolder + PIL transforms in DataLoader workers, the same model, batch, images
   and epochs). Prints each median wall time and the ratio.
2. Engine overhead: the engine's ``train_one_epoch`` against a bare forward/backward/step loop on
   the same in-memory batches, in this process.
3. Steady state: train.py's training rate on real data (the median of its logged intervals after the
   first, which holds the warm-up) against the engine's in-memory step rate of (2) at the same precision.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from _project import use_project

ROOT = use_project()  # before the project's own imports

from _config import compose_from_argv  # noqa: E402
from engine.checkpoint import TrainState  # noqa: E402
from engine.optim import build_optimizer, build_scheduler  # noqa: E402
from engine.distributed import select_device  # noqa: E402
from engine.trainer import StepOptions, build_precision, train_one_epoch  # noqa: E402
from models import build_model  # noqa: E402


RECIPE_TRAIN_SAMPLES = 20_000  # --recipe: 157 steps at batch 128, so seven logged intervals after the first
PLAIN_TRAIN_SAMPLES = 10_000


def plain_steps(model, criterion, batches, optimizer, precision) -> None:
    """The loop a user would write by hand: forward, backward, step."""
    model.train()
    for x, y in batches:
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


class InMemory:
    """Engine and plain loop on the same in-memory batches (random tensors), one round each at a time."""

    def __init__(self, overrides: list[str], steps: int):
        cfg = compose_from_argv(overrides)
        self.cfg, self.steps = cfg, steps
        device = select_device(cfg.trainer.device)
        self.precision = build_precision(cfg.trainer.amp, device)
        torch.manual_seed(0)
        self.model = build_model(cfg.model, cfg.attention, cfg.attention_extra, cfg.data.num_classes,
                                 cfg.data.image_size).to(device)
        memory_format = torch.channels_last if cfg.trainer.channels_last else torch.contiguous_format
        self.model.to(memory_format=memory_format)
        size, batch = cfg.data.image_size, cfg.data.batch_size
        self.batches = [(torch.randn(batch, 3, size, size, device=device).to(memory_format=memory_format),
                         torch.randint(0, cfg.data.num_classes, (batch,), device=device)) for _ in range(steps)]
        self.criterion = nn.CrossEntropyLoss()
        self.engine_opt, self.plain_opt = build_optimizer(self.model, cfg.optim), build_optimizer(self.model, cfg.optim)
        scheduler = build_scheduler(self.engine_opt, cfg.sched, cfg.trainer.epochs, steps)
        self.state = TrainState(self.model, self.engine_opt, scheduler, self.precision.scaler)
        self.options = StepOptions(self.criterion, self.precision, channels_last=cfg.trainer.channels_last,
                                   log_interval=cfg.trainer.log_interval, progress_bar=False)
        self.engine(), self.plain()  # warm-up: allocator, kernels, caches

    def engine(self) -> float:
        """Seconds of one pass of the engine's loop, as train.py runs it (schedule stepped every step)."""
        self.state.step = 0  # every pass follows the same stretch of the schedule
        return timed(lambda: train_one_epoch(self.model, self.batches, self.state, self.options))

    def plain(self) -> float:
        """Seconds of one pass of the hand-written loop."""
        return timed(lambda: plain_steps(self.model, self.criterion, self.batches, self.plain_opt, self.precision))


def steady_rate(run_dir: Path) -> float:
    """A run's training rate after its first logging interval (which holds the kernels' warm-up): the
    median of its ``train/images_per_s`` TensorBoard points."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    points = [p.value for p in events.Scalars("train/images_per_s")][1:]
    if not points:
        sys.exit(f"benchmark: {run_dir} logged fewer than two intervals; use more --train-samples")
    return statistics.median(points)


def run_process(cmd: list[str]) -> float:
    """Wall seconds of a whole process (start-up included); stops the benchmark if it fails."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        sys.exit(f"benchmark: {' '.join(cmd[:3])} ... failed:\n{proc.stderr[-2000:]}")
    return time.perf_counter() - start


def recipe_report(args: argparse.Namespace, overrides: list[str], cfg, python: str, scratch: Path) -> None:
    """``--recipe``: train.py's steady rate against the compute-only loop's, alternating, medians and ratio."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    sizes = [f"data.max_train_samples={args.train_samples}", "trainer.stop_after_epochs=1", "trainer.progress=false"]

    epoch_rates: list[float] = []  # the whole epoch's, first steps (and a compile) included

    def recipe_round(r: int) -> float:
        dirs = [scratch / f"recipe{r}_{k}" for k in range(args.parallel)]
        run_together([[python, "train.py", *overrides, f"data.root={args.root}", *sizes, f"seed={k}",
                       f"hydra.run.dir={d}"] for k, d in enumerate(dirs)], env, scratch / f"recipe{r}")
        epoch_rates.append(sum(json.loads((d / "metrics.json").read_text())["history"][-1]["train_images_per_s"]
                               for d in dirs))
        return sum(steady_rate(d) for d in dirs)

    def compute_round(r: int) -> float:
        outputs = run_together([[python, "scripts/compute_loop.py", "--json", f"--steps={args.steps}",
                                 *overrides]] * args.parallel, env, scratch / f"compute{r}")
        return sum(json.loads(out.splitlines()[-1])["images_per_s"] for out in outputs)

    rates: dict[str, list[float]] = {"recipe": [], "compute": []}
    for r in range(args.rounds):
        for name, side in ([("recipe", recipe_round), ("compute", compute_round)][::1 if r % 2 == 0 else -1]):
            rates[name].append(side(r))
            print(f"round {r + 1}: {name} {rates[name][-1]:.0f} img/s", flush=True)
    recipe, compute = statistics.median(rates["recipe"]), statistics.median(rates["compute"])
    print(f"recipe {' '.join(overrides)}: {args.parallel} process(es) x {args.threads} thread(s), "
          f"{os.cpu_count()} CPUs, {args.rounds} rounds, {args.train_samples} images an epoch")
    print(f"train.py {recipe:.0f} img/s, compute-only {compute:.0f} img/s (medians), ratio {recipe / compute:.3f} "
          f"(target >= 0.95); train.py's whole epoch, first steps included: {statistics.median(epoch_rates):.0f} img/s")


def run_together(commands: list[list[str]], env: dict[str, str], logs: Path) -> list[str]:
    """Start every command at once, wait for all; their stdout, or stop the benchmark when one fails.

    Output goes to files under ``logs`` (not pipes, which a process could fill and then wait on while timed).
    """
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for k, cmd in enumerate(commands):
        with open(logs / f"{k}.out", "w") as out, open(logs / f"{k}.err", "w") as err:
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err))
    for k, (cmd, proc) in enumerate(zip(commands, procs)):
        if proc.wait() != 0:
            sys.exit(f"benchmark: process {k} of {logs} ({' '.join(cmd[1:3])} ...) failed:\n"
                     f"{(logs / f'{k}.err').read_text()[-2000:]}")
    return [(logs / f"{k}.out").read_text() for k in range(len(commands))]


def report(args: argparse.Namespace, overrides: list[str], cfg, python: str, scratch: Path) -> None:
    """Run the rounds (train.py's runs under ``scratch``) and print the three comparisons."""
    sizes = [f"data.max_train_samples={args.train_samples}", f"data.max_val_samples={args.val_samples}",
             f"trainer.epochs={args.epochs}"]
    rates: list[float] = []

    def attnlab_round() -> float:
        run_dir = scratch / f"run{len(rates)}"
        seconds = run_process([python, "train.py", *overrides, f"data.root={args.root}", *sizes,
                               f"hydra.run.dir={run_dir}"])
        rates.append(steady_rate(run_dir))
        return seconds

    def plain_round() -> float:
        model_args = [o for o in overrides if o.split("=")[0].split(".")[0] in ("model", "attention", "seed")]
        return run_process([python, "scripts/plain_loop.py", args.root, f"--train-samples={args.train_samples}",
                            f"--val-samples={args.val_samples}", f"--epochs={args.epochs}",
                            f"--batch={cfg.data.batch_size}", *model_args])

    in_memory = InMemory(overrides, args.steps)
    pairs = [{"attnlab": attnlab_round, "plain": plain_round}, {"engine": in_memory.engine, "bare": in_memory.plain}]
    times: dict[str, list[float]] = {name: [] for pair in pairs for name in pair}
    for r in range(args.rounds):
        processes, loops = list(pairs[0]), list(pairs[1])
        for name in (processes if r % 2 == 0 else processes[::-1]):  # ABBA over the rounds
            times[name].append(pairs[0][name]())
        for name in loops + loops[::-1]:  # ABBA within the round: neither always follows a process's exit
            times[name].append(pairs[1][name]())
    median = {name: statistics.median(t) for name, t in times.items()}
    engine_rate = args.steps * cfg.data.batch_size / median["engine"]
    real_rate = statistics.median(rates)
    print(f"model {cfg.model.name} + {cfg.attention.name}, batch {cfg.data.batch_size}, amp {cfg.trainer.amp}, "
          f"channels_last {cfg.trainer.channels_last}, {os.cpu_count()} CPUs / "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}, {args.rounds} rounds")
    print(f"real data, whole process ({args.train_samples} train / {args.val_samples} val images, {args.epochs} "
          f"epoch(s)): attnlab {median['attnlab']:.1f} s, hand-written PIL loop {median['plain']:.1f} s, "
          f"ratio {median['attnlab'] / median['plain']:.3f} (goal <= 0.80)")
    print(f"in memory, {args.steps} steps: engine {median['engine']:.2f} s, bare loop {median['bare']:.2f} s, "
          f"overhead {100 * (median['engine'] / median['bare'] - 1):+.1f}% (goal <= +3%)")
    print(f"steady state: real data {real_rate:.0f} img/s, in-memory engine {engine_rate:.0f} img/s, "
          f"ratio {real_rate / engine_rate:.3f} (goal >= 0.90)")


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run the alternating rounds, print medians and ratios."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=str(ROOT.parent / "shared" / "data" / "cifar10"),
                        help="a CIFAR-10 image folder (train/<class>/*, val/<class>/*)")
    parser.add_argument("--train-samples", type=int, default=None,
                        help=f"default {PLAIN_TRAIN_SAMPLES:,}; --recipe: {RECIPE_TRAIN_SAMPLES:,}")
    parser.add_argument("--val-samples", type=int, default=2_000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=4, help="timed rounds of each side (even: ABBA balances)")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps per in-memory round (default 30; --recipe: 100 compute-only steps)")
    parser.add_argument("--recipe", action="store_true", help="train.py against its compute-only loop (above)")
    parser.add_argument("--threads", type=int, default=None, help="--recipe: OMP_NUM_THREADS of each process "
                        "(default: this machine's CPUs)")
    parser.add_argument("--parallel", type=int, default=1, help="--recipe: processes of each side at once")
    args, overrides = parser.parse_known_args(argv)
    if args.recipe and args.rounds < 3:
        sys.exit(f"benchmark: --rounds={args.rounds}; the protocol takes the median of at least 3 rounds")
    for name in ("threads", "parallel", "steps", "train_samples"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            sys.exit(f"benchmark: --{name.replace('_', '-')}={getattr(args, name)}; use an integer >= 1")
    if not (Path(args.root) / "train").is_dir():
        sys.exit(f"benchmark: no image folder at {args.root}; pass --root DIR")
    args.steps = args.steps or (100 if args.recipe else 30)
    args.threads = args.threads or os.cpu_count()
    args.train_samples = args.train_samples or (RECIPE_TRAIN_SAMPLES if args.recipe else PLAIN_TRAIN_SAMPLES)
    overrides = ["data=cifar10", *overrides]
    cfg = compose_from_argv(overrides)
    python = sys.executable
    with tempfile.TemporaryDirectory(prefix="attnlab-benchmark-") as scratch:
        (recipe_report if args.recipe else report)(args, overrides, cfg, python, Path(scratch))


if __name__ == "__main__":
    main()
    sys.exit(0)
