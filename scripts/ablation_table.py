"""Paper-style table (markdown, CSV) and plot of the runs under one or more directories.

Usage: python scripts/ablation_table.py DIR [DIR ...] [--x params|macs]
Reads every run (a directory with metrics.json and config.yaml) below the given directories. The
table's columns are the config keys that vary across the runs, then top-1 and top-5 error,
parameters, MACs and train images/s; runs that differ only in ``seed`` are aggregated as
mean ± std (n). Runs that did not complete are listed apart and never averaged in. The CSV and a
PNG of top-1 error against parameters (or MACs) are written beside the first DIR.
"""
import argparse
import csv
import json
import statistics
import sys
from pathlib import Path

import yaml
from _config import ROOT  # noqa: F401  (puts the repo on the path)

from engine.tensorboard import flatten

# Keys that say how a run was executed, not what was trained: never table columns.
IGNORED_KEYS = {"seed", "data.root", "data.num_workers", "data.download", "trainer.progress", "trainer.resume",
                "trainer.eval_only", "trainer.device", "trainer.log_interval"}
METRICS = ("top1_err", "top5_err")


def load_runs(dirs: list[Path]) -> list[dict]:
    """Every run below ``dirs``: its path, flattened config and metrics."""
    runs = []
    for d in dirs:
        for metrics_path in sorted(d.rglob("metrics.json")):
            run_dir = metrics_path.parent
            config_path = run_dir / "config.yaml"
            raw = (yaml.safe_load(config_path.read_text()) if config_path.exists() else None) or {}
            runs.append({"dir": run_dir, "config": flatten({k: v for k, v in raw.items() if k != "paper"}),
                         "paper": paper_number(raw), "metrics": json.loads(metrics_path.read_text())})
    return runs


def paper_number(config: dict) -> float | None:
    """The recipe's published number for this run's configuration (its ``paper`` block), if it has one."""
    paper = config.get("paper") or {}
    node: object = config
    for part in str(paper.get("key", "")).split("."):
        node = node.get(part) if isinstance(node, dict) else None
    values = {str(k): v for k, v in paper.get("values") or []}  # [config value, number] pairs
    return values.get(str(node)) if node is not None else None


def varied_keys(runs: list[dict]) -> list[str]:
    """Config keys that take two or more values among the runs that have them, in config order.

    A key only some runs have and that never changes (SE's ``reduction`` beside ``attention=none``)
    follows from one that varies (``attention.name``), so it is not a column; runs without a key
    show "-" in its column.
    """
    keys = []
    for run in runs:
        keys += [k for k in run["config"] if k not in keys]
    return [k for k in keys if k not in IGNORED_KEYS
            and len({str(r["config"][k]) for r in runs if k in r["config"]}) > 1]


def mean_std(values: list[float]) -> str:
    """'mean ± std (n)' for several values, the value alone for one."""
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} ({len(values)})"


def aggregate(runs: list[dict], keys: list[str]) -> list[dict]:
    """One row per configuration (the varied keys' values), seeds pooled."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault(tuple(str(run["config"].get(k, "-")) for k in keys), []).append(run)
    rows = []
    for values, members in groups.items():
        m = [r["metrics"] for r in members]
        rows.append({
            **dict(zip(keys, values)),
            **{k: [x[k] for x in m] for k in METRICS},
            "params": m[0].get("params"), "macs": m[0].get("macs"),
            "train_images_per_s": statistics.mean(x.get("train_images_per_s", 0.0) for x in m),
            "runs": len(members), "paper": members[0].get("paper"),
        })
    return sorted(rows, key=lambda r: statistics.mean(r["top1_err"]))


def markdown(rows: list[dict], keys: list[str], failed: list[dict]) -> str:
    """The table (and the runs that did not complete) as markdown."""
    with_paper = any(r.get("paper") is not None for r in rows)  # a recipe's runs: its published number beside ours
    head = [*keys, *(["paper top-1 err (%)"] if with_paper else []), "top-1 err (%)", "top-5 err (%)", "params",
            "GMACs", "train img/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        paper = ([f"{r['paper']:.2f}" if r.get("paper") is not None else "not in the paper"] if with_paper else [])
        cells = [r[k] for k in keys] + paper + [mean_std(r["top1_err"]), mean_std(r["top5_err"]), f"{r['params']:,}",
                                                f"{r['macs'] / 1e9:.3f}", f"{r['train_images_per_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    if failed:
        lines += ["", "Runs that did not complete (not in the table):", ""]
        lines += [f"- {r['dir']}: {r['metrics'].get('status')} {r['metrics'].get('error', '')}".rstrip() for r in failed]
    return "\n".join(lines)


def write_csv(rows: list[dict], keys: list[str], path: Path) -> None:
    """One CSV row per configuration, with mean and std columns."""
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow([*keys, "paper_top1_err", "top1_err_mean", "top1_err_std", "top5_err_mean", "top5_err_std",
                      "runs", "params", "macs", "train_images_per_s"])
        for r in rows:
            sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0  # noqa: E731
            out.writerow([*(r[k] for k in keys), "" if r.get("paper") is None else r["paper"],
                          statistics.mean(r["top1_err"]), sd(r["top1_err"]),
                          statistics.mean(r["top5_err"]), sd(r["top5_err"]), r["runs"], r["params"], r["macs"],
                          r["train_images_per_s"]])


def plot(rows: list[dict], keys: list[str], x: str, path: Path) -> None:
    """Top-1 error against params or MACs, one labelled marker (with std bars) per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for r in rows:
        xs = r[x] / (1e6 if x == "params" else 1e9)
        ys = r["top1_err"]
        err = statistics.stdev(ys) if len(ys) > 1 else 0.0
        ax.errorbar(xs, statistics.mean(ys), yerr=err, fmt="o", capsize=3)
        ax.annotate(", ".join(f"{k.split('.')[-1]}={r[k]}" for k in keys), (xs, statistics.mean(ys)),
                    textcoords="offset points", xytext=(5, 5), fontsize=7)
    ax.set_xlabel("parameters (M)" if x == "params" else "GMACs")
    ax.set_ylabel("top-1 error (%)")
    ax.grid(alpha=0.3)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str]) -> int:
    """Read the runs, print the markdown table, write the CSV and the plot."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="+", type=Path)
    parser.add_argument("--x", choices=["params", "macs"], default="params", help="the plot's x-axis")
    args = parser.parse_args(argv)
    missing = [d for d in args.dirs if not d.is_dir()]
    if missing:
        print(f"error: {missing[0]} is not a directory", file=sys.stderr)
        return 1
    runs = load_runs(args.dirs)
    if not runs:
        print(f"error: no runs (metrics.json) below {', '.join(map(str, args.dirs))}", file=sys.stderr)
        return 1
    done = [r for r in runs if r["metrics"].get("status") == "completed"]
    failed = [r for r in runs if r["metrics"].get("status") != "completed"]
    keys = varied_keys(done or runs)
    rows = aggregate(done, keys)
    print(markdown(rows, keys, failed))
    if rows:
        out = args.dirs[0]
        write_csv(rows, keys, out / "ablation.csv")
        plot(rows, keys, args.x, out / "ablation.png")
        print(f"\nwrote {out / 'ablation.csv'} and {out / 'ablation.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
