"""The GPU benchmark: training steps, input paths, train.py end to end, CIFAR ResNet-20 from memory.

Usage: python scripts/benchmark_gpu.py [--out DIR] [--only NAME[,NAME]] [--smoke] [--images N] [--cifar-root DIR]

Measurements, in priority order (the JSON is rewritten after each, so a killed run keeps the first ones):
  step_<model>           training steps of the engine (train_one_epoch) on in-memory batches of 256 at 224
                         px, bf16, channels_last: resnet50, se_resnet50, cbam_resnet50, mobilenetv2_ca, volo_d1
  cifar_resnet20         CIFAR ResNet-20, the tensor-resident path, batch 512, bf16 (eager, then compiled)
  input_pil, input_gpu   the input path alone on a generated JPEG folder (smooth random fields at ImageNet
                         sizes, about 100 KB each): PIL in loader workers against GPU decoding
  step_<model>_compiled  resnet50 and se_resnet50 under torch.compile (inductor; the cold compile is timed apart)
  train_resnet50_folder  train.py's training (engine.run.train) on that folder with the ResNet-50 recipe's
                         settings and data.decode=auto: images/s and the GPU's busy share (nvidia-smi)
Writes DIR/benchmark_gpu.json and, at the end, DIR/benchmark_gpu.md (also printed). ``--smoke`` runs every
measurement at toy sizes on the CPU (small models in fp32; compile traces with dynamo's eager backend) in
under a minute, for the tests.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing import Pool
from pathlib import Path

import torch

from _project import use_project

ROOT = use_project()  # before the project's own imports

from _config import compose_from_argv  # noqa: E402
from benchmark import timed  # noqa: E402
from data import build_datasets, build_loaders, set_train_epoch, train_transform  # noqa: E402
from data.device_decode import decode_on_device  # noqa: E402
from data.synthetic import write_jpeg_folder  # noqa: E402
from engine.checkpoint import TrainState  # noqa: E402
from engine.optim import build_optimizer, build_scheduler  # noqa: E402
from engine.trainer import StepOptions, build_precision, train_one_epoch  # noqa: E402
from models import build_model  # noqa: E402
from models.backbones.base import SMALL_OPTIONS  # noqa: E402

STEP_MODELS = {  # name -> train.py overrides
    "resnet50": ["model=resnet50", "attention=none"],
    "se_resnet50": ["model=resnet50", "attention=se"],
    "cbam_resnet50": ["model=resnet50", "attention=cbam"],
    "mobilenetv2_ca": ["model=mobilenetv2", "attention=coord"],
    "volo_d1": ["model=volo_d1", "attention=none"],
}
COMPILED = ("resnet50", "se_resnet50")
TARGETS = {  # measurement -> (what the issue asks, a test of the result)
    "train_resnet50_folder": ("≥ 4,000 img/s with the GPU busy ≥ 90%",
                              lambda r: r["images_per_s"] >= 4000 and (r.get("gpu_busy") or 0) >= 0.9),
    "step_se_resnet50": ("step time ≤ 1.10x ResNet-50's", lambda r: (r.get("vs_resnet50") or 9) <= 1.10),
    "cifar_resnet20": ("≥ 50,000 img/s", lambda r: max(r["images_per_s"], r.get("compiled_images_per_s", 0)) >= 50000),
}


class Sizes:
    """The full sizes on a GPU, toy ones with ``--smoke``."""

    def __init__(self, smoke: bool, images: int):
        self.smoke = smoke
        self.batch, self.side, self.steps, self.warmup = (2, 32, 1, 1) if smoke else (256, 224, 15, 5)
        self.cifar_batch = 16 if smoke else 512
        self.images = 16 if smoke else images
        self.jpeg_sizes = [(48, 64), (64, 48)] if smoke else [(375, 500), (500, 375), (333, 500), (480, 640)]
        self.device = "cpu" if smoke else "cuda"
        # fp32 in smoke mode: a CPU without native bf16 (no avx512_bf16 / AMX) emulates it some 50x slower,
        # which made the toy sizes outlast the tests' limit on such a machine
        self.amp = "none" if smoke else "bf16"


def small_model(overrides: list[str]) -> list[str]:
    """Overrides for the every-block tests' small instance of the overrides' backbone (smoke mode)."""
    name = next(o.split("=", 1)[1] for o in overrides if o.startswith("model="))
    show = lambda v: "[" + ",".join(map(str, v)) + "]" if isinstance(v, (list, tuple)) else str(v)  # noqa: E731
    return [f"++model.{k}={show(v)}" for k, v in SMALL_OPTIONS.get(name, {}).items()] + ["data.stem=cifar"]


def compiled_form(model: torch.nn.Module, sizes: Sizes) -> torch.nn.Module:
    """torch.compile with inductor; in smoke mode dynamo's tracing alone (the eager backend), which is quick."""
    return torch.compile(model, backend="eager" if sizes.smoke else "inductor")


def step_rate(overrides: list[str], sizes: Sizes, compiled: bool = False) -> dict:
    """Images/s of the engine's training steps on one in-memory batch, repeated (and the cold compile's seconds)."""
    cfg = compose_from_argv([*overrides, "data=imagenet", "data.root=unused", f"data.image_size={sizes.side}",
                             f"data.batch_size={sizes.batch}", f"trainer.device={sizes.device}",
                             f"trainer.amp={sizes.amp}", "trainer.channels_last=true",
                             *(small_model(overrides) if sizes.smoke else [])])
    device = torch.device(sizes.device)
    precision = build_precision(sizes.amp, device)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.attention, cfg.attention_extra, cfg.data.num_classes, sizes.side)
    model = model.to(device, memory_format=torch.channels_last)
    batch = (torch.randn(sizes.batch, 3, sizes.side, sizes.side, device=device).to(memory_format=torch.channels_last),
             torch.randint(0, cfg.data.num_classes, (sizes.batch,), device=device))
    optimizer = build_optimizer(model, cfg.optim)
    state = TrainState(model, optimizer, build_scheduler(optimizer, cfg.sched, 1, 10_000), precision.scaler)
    options = StepOptions(torch.nn.CrossEntropyLoss(), precision, channels_last=True, progress_bar=False)
    runner = compiled_form(model, sizes) if compiled else model
    compile_s = timed(lambda: train_one_epoch(runner, [batch], state, options))  # the first step: compiles
    timed(lambda: train_one_epoch(runner, [batch] * sizes.warmup, state, options))
    seconds = timed(lambda: train_one_epoch(runner, [batch] * sizes.steps, state, options))
    result = {"images_per_s": sizes.batch * sizes.steps / seconds, "step_ms": 1000 * seconds / sizes.steps}
    if compiled:
        result["first_step_s"] = compile_s
    return result


def jpeg_folder(root: Path, sizes: Sizes) -> Path:
    """train/ (and a small val/) of two classes of generated JPEGs, written in parallel; reused when present."""
    if (root / "train").is_dir():
        return root
    per_class = sizes.images // 2
    jobs = [(root / split, 2, n, sizes.jpeg_sizes, seed) for split, n, seed in
            (("train", per_class, 0), ("val", max(4, per_class // 20), 1))]
    with Pool(min(len(jobs), os.cpu_count() or 1)) as pool:
        pool.starmap(write_jpeg_folder, jobs)
    return root


def folder_config(folder: Path, sizes: Sizes, *overrides: str):
    """The ResNet-50 ImageNet recipe's config on the generated folder."""
    return compose_from_argv(["experiment=se_resnet50_imagenet", "attention=none", "data=imagefolder",
                              f"data.root={folder}", "data.num_classes=2", f"data.image_size={sizes.side}",
                              f"data.batch_size={sizes.batch}", f"trainer.device={sizes.device}",
                              f"trainer.amp={sizes.amp}", "trainer.channels_last=true", "trainer.progress=false",
                              *overrides])


def input_rate(folder: Path, sizes: Sizes, decode: str) -> dict:
    """Images/s of the training loader alone (decode, crop, flip, normalise; on the device with ``gpu``)."""
    cfg = folder_config(folder, sizes, f"data.decode={decode}")
    train_set, val_set = build_datasets(cfg.data)
    loader, _ = build_loaders(cfg.data, train_set, val_set, drop_last=True, device=sizes.device)
    set_train_epoch(loader, 1)
    batches = iter(loader)
    next(batches)  # the workers' start
    count, start = 0, time.perf_counter()
    for x, _ in batches:
        count += len(x)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return {"images_per_s": count / (time.perf_counter() - start), "workers": loader.loader.num_workers
            if hasattr(loader, "loader") else loader.num_workers}


class GpuBusy:
    """The GPU's busy share (nvidia-smi's utilization.gpu, sampled every 100 ms) while the block runs."""

    def __enter__(self):
        self.samples: list[float] = []
        try:
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                          "-lms", "100", "-i", "0"], stdout=subprocess.PIPE, text=True)
        except (FileNotFoundError, OSError):
            self.proc = None
            return self
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        return self

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.strip().isdigit():
                self.samples.append(int(line) / 100)

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.terminate()

    def share(self, skip: int = 20) -> float | None:
        """The mean after the first ``skip`` samples (start-up), or None without nvidia-smi."""
        kept = self.samples[skip:] or self.samples
        return statistics.mean(kept) if kept else None


def train_rate(folder: Path, sizes: Sizes, out: Path) -> dict:
    """engine.run.train on the folder (one epoch): its steady images/s, and the GPU's busy share meanwhile."""
    from engine.run import train

    # lr 0.01: speed does not depend on it, and the recipe's 0.6 (for 8 x 128 images) diverges at toy batches
    cfg = folder_config(folder, sizes, "trainer.epochs=1", "data.decode=auto", "trainer.log_interval=10", "optim.lr=0.01")
    with GpuBusy() as busy:
        metrics = train(cfg, out / "train_resnet50_folder")
    return {"images_per_s": metrics["train_images_per_s"], "gpu_busy": busy.share(),
            "decode": "gpu" if decode_on_device(cfg.data, build_datasets(cfg.data)[0], torch.device(sizes.device),
                                                train_transform(cfg.data)) else "cpu"}


def cifar_rate(cifar_root: Path | None, sizes: Sizes) -> dict:
    """CIFAR ResNet-20 from memory at batch 512 (digits in smoke mode): an epoch's images/s after a warm-up
    epoch, eager and compiled."""
    data = (["data=digits", "data.max_train_samples=96"] if sizes.smoke or cifar_root is None
            else ["data=cifar10", f"data.root={cifar_root}"])
    cfg = compose_from_argv(["model=resnet20", *data, f"data.batch_size={sizes.cifar_batch}",
                             f"trainer.amp={sizes.amp}", "trainer.channels_last=true", f"trainer.device={sizes.device}",
                             "data.in_memory=true"])
    device = torch.device(sizes.device)
    train_set, val_set = build_datasets(cfg.data)
    loader, _ = build_loaders(cfg.data, train_set, val_set, drop_last=True, device=device)
    result = {"data": cfg.data.name, "images": len(train_set)}
    for compiled in (False, True):
        torch.manual_seed(0)
        model = build_model(cfg.model, cfg.attention, cfg.attention_extra, cfg.data.num_classes, cfg.data.image_size)
        model = model.to(device, memory_format=torch.channels_last)
        optimizer = build_optimizer(model, cfg.optim)
        state = TrainState(model, optimizer, build_scheduler(optimizer, cfg.sched, 3, len(loader)),
                           build_precision(sizes.amp, device).scaler)
        options = StepOptions(torch.nn.CrossEntropyLoss(), build_precision(sizes.amp, device), channels_last=True,
                              progress_bar=False)
        runner = compiled_form(model, sizes) if compiled else model
        seconds = []
        for epoch in (1, 2):
            set_train_epoch(loader, epoch)
            seconds.append(timed(lambda: train_one_epoch(runner, loader, state, options)))
        rate = len(loader) * sizes.cifar_batch / seconds[-1]
        result["compiled_images_per_s" if compiled else "images_per_s"] = rate
    return result


def measurements(args, sizes: Sizes, scratch: Path) -> list[tuple[str, callable]]:
    """(name, thunk) in priority order."""
    folder = lambda: jpeg_folder(scratch / "jpegs", sizes)  # noqa: E731  (made on first use)
    cifar = Path(args.cifar_root) if args.cifar_root else next(
        (p for p in (ROOT / ".device" / "cifar10-sub", ROOT.parent / "shared" / "data" / "cifar10") if p.is_dir()), None)
    items = [(f"step_{name}", lambda o=o: step_rate(o, sizes)) for name, o in STEP_MODELS.items()]
    items += [("cifar_resnet20", lambda: cifar_rate(cifar, sizes)),
              ("input_pil", lambda: input_rate(folder(), sizes, "cpu")),
              ("input_gpu", lambda: input_rate(folder(), sizes, "gpu"))]
    items += [(f"step_{name}_compiled", lambda o=STEP_MODELS[name]: step_rate(o, sizes, compiled=True))
              for name in COMPILED]
    items += [("train_resnet50_folder", lambda: train_rate(folder(), sizes, scratch))]
    return items


def markdown(results: dict, meta: dict) -> str:
    """The results as a table, with the issue's targets where they apply."""
    lines = [f"{meta['device']}, torch {meta['torch']}, {meta['date']}{' (smoke: toy sizes)' if meta['smoke'] else ''}",
             "", "| measurement | images/s | details | target |", "| --- | ---: | --- | --- |"]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | - | failed: {r['error']} | |")
            continue
        details = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()
                            if k != "images_per_s")
        target = ""
        if name in TARGETS:
            what, met = TARGETS[name]
            target = f"{what}: {'met' if met(r) else 'missed'}"
        lines.append(f"| {name} | {r['images_per_s']:,.0f} | {details} | {target} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """Run the measurements in priority order, saving the JSON after each; print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmark_gpu"))
    parser.add_argument("--only", default=None, help="comma-separated measurement names")
    parser.add_argument("--smoke", action="store_true", help="toy sizes on the CPU")
    parser.add_argument("--images", type=int, default=3000, help="JPEGs in the generated folder")
    parser.add_argument("--cifar-root", default=None)
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("error: no CUDA device; run with --smoke on a CPU", file=sys.stderr)
        return 1
    sizes = Sizes(args.smoke, args.images)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.smoke else "CPU",
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "smoke": args.smoke}
    wanted = set(args.only.split(",")) if args.only else None
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, measure in measurements(args, sizes, Path(tmp)):
            if wanted and name not in wanted:
                continue
            start = time.perf_counter()
            try:
                results[name] = measure()
            except Exception as e:  # noqa: BLE001 - one failed measurement must not lose the others
                results[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            results[name]["seconds"] = time.perf_counter() - start
            if name == "step_se_resnet50" and "step_resnet50" in results and "step_ms" in results[name]:
                results[name]["vs_resnet50"] = results[name]["step_ms"] / results["step_resnet50"]["step_ms"]
            (args.out / "benchmark_gpu.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
            print(f"{name}: {results[name]}", flush=True)
    table = markdown(results, meta)
    (args.out / "benchmark_gpu.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
