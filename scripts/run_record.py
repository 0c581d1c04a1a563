"""Commit-sized records of finished runs (docs/runs/), and the check that a record's first epochs reproduce.

Usage:
  python scripts/run_record.py write RUN_DIR OUT_DIR --wall-s SECONDS [--commit SHA] [--note TEXT] -- OVERRIDE ...
      copies RUN_DIR's config.yaml and metrics.json (the per-epoch history) to OUT_DIR and writes record.json:
      the command (train.py and OVERRIDEs, as run), the commit, the hardware and the wall time.
  python scripts/run_record.py check OUT_DIR [--epochs 2]
      re-runs the record's command for the first epochs (in a temporary directory) and compares each epoch's
      lr, train loss, val loss and top-1 error with the record's: equal to 4 decimals, as trainer.deterministic
      promises on the same machine kind. The re-run keeps the record's trainer.epochs and stops after the
      first epochs (trainer.stop_after_epochs), so a schedule that follows the run's length replays exactly;
      a value the record's epochs lack (no per-epoch evaluation) is not compared. It runs with the record's
      thread count (metrics.json's torch_threads), since one and two threads round differently.
"""
import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from _project import ROOT

COMPARED = ("lr", "train_loss", "val_loss", "top1_err")
DECIMALS = 4
RUN_ONLY = ("hydra.run.dir=", "trainer.stop_after_epochs=")  # overrides the check replaces


def hardware() -> str:
    """The CPU model and the cores this process may use, or the GPU, in words."""
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    model = platform.processor() or "CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        model = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                      if line.startswith("model name")), model)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cores} cores of {model}, no GPU"


def git_commit() -> str:
    """HEAD of the work tree."""
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()


def write(run_dir: Path, out: Path, wall_s: float, commit: str | None, overrides: list[str], note: str = "") -> None:
    """Copy the run's config and metrics and describe how they were made."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    if metrics.get("status") != "completed":
        sys.exit(f"error: {run_dir} has status {metrics.get('status')}; record finished runs only")
    import torch

    out.mkdir(parents=True, exist_ok=True)
    for name in ("config.yaml", "metrics.json"):
        shutil.copyfile(run_dir / name, out / name)
    record = {"command": " ".join(["python train.py", *overrides]), "overrides": overrides,
              "commit": commit or git_commit(), "hardware": hardware(), "torch": torch.__version__,
              "wall_s": round(wall_s), "epochs": metrics["epoch"], **({"note": note} if note else {})}
    (out / "record.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}: {record['command']}")


def check(out: Path, epochs: int) -> int:
    """Re-run the first ``epochs`` of a record; 0 when every compared value agrees to DECIMALS decimals."""
    record = json.loads((out / "record.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    history = metrics["history"][:epochs]
    overrides = [o for o in record["overrides"] if not o.startswith(RUN_ONLY)]
    env = dict(os.environ)
    if "torch_threads" in metrics:  # one and two threads round differently: re-run with the record's count
        env["OMP_NUM_THREADS"] = str(metrics["torch_threads"])
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, str(ROOT / "train.py"), *overrides, f"trainer.stop_after_epochs={epochs}",
                   f"hydra.run.dir={tmp}"]
        print(f"running with {env.get('OMP_NUM_THREADS', 'the default')} thread(s):", " ".join(command[1:]),
              flush=True)
        subprocess.run(command, cwd=ROOT, check=True, env=env)
        rerun = json.loads((Path(tmp) / "metrics.json").read_text())["history"]
    mismatches = 0
    for old, new in zip(history, rerun, strict=True):
        for key in (k for k in COMPARED if k in old):
            same = round(old[key], DECIMALS) == round(new[key], DECIMALS)
            mismatches += not same
            print(f"epoch {old['epoch']} {key}: record {old[key]:.{DECIMALS}f}, re-run {new[key]:.{DECIMALS}f}"
                  f"{'' if same else '  DIFFERENT'}")
    print("reproduced" if not mismatches else f"{mismatches} value(s) differ")
    return 1 if mismatches else 0


def main(argv: list[str]) -> int:
    """Parse the sub-command and run it."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="action", required=True)
    w = sub.add_parser("write", help="record a finished run")
    w.add_argument("run_dir", type=Path)
    w.add_argument("out", type=Path)
    w.add_argument("--wall-s", type=float, required=True, help="the command's wall time in seconds")
    w.add_argument("--commit", help="the commit that ran (default: HEAD)")
    w.add_argument("--note", default="", help="what a reader of the record should know (e.g. what ran beside it)")
    c = sub.add_parser("check", help="re-run a record's first epochs and compare")
    c.add_argument("out", type=Path)
    c.add_argument("--epochs", type=int, default=2)
    split = argv.index("--") if "--" in argv else len(argv)  # train.py's overrides, as run, follow "--"
    args = parser.parse_args(argv[:split])
    if args.action == "write":
        write(args.run_dir, args.out, args.wall_s, args.commit, argv[split + 1:], args.note)
        return 0
    return check(args.out, args.epochs)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
