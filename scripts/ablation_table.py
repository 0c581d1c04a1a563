"""Paper-style table (markdown, CSV) and plot of the runs under one or more directories.

Usage: python scripts/ablation_table.py DIR [DIR ...] [--x params|macs]
Reads every run (a directory with metrics.json and config.yaml) below the given directories. The
table's columns are the config keys that vary across the runs (rows in the order of their values,
numbers numerically, ``none`` first), the recipe's published number where its ``paper`` block has one,
then top-1 and top-5 error, with several seeds the difference to the baseline row (``attention.name``
none, else the paper block's ``baseline`` value) with a 95% confidence interval (Welch's t), mean AUROC
for multi-label runs, parameters, MACs and train images/s; runs that differ only in ``seed`` are
aggregated as mean ± std (n). Runs that did not complete are listed apart and never averaged in. The
CSV and a PNG are written to --out (default: the first DIR): top-1 error against the varied key where it is a number
(log scale for a geometric sweep such as r), seeds' spread as error bars and the paper's numbers as
crosses, beside top-1 error against parameters (or MACs).
Runs trained with ``data.val_split`` report their test-set error (``test_top1_err``: the final weights on the
data set's own val split), where every run has one. Run records (``docs/runs/``: a ``record.json`` beside
metrics.json, from scripts/run_record.py) add the command, the hardware and the wall time.
"""
import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import yaml

from _project import use_project

use_project()  # before the project's own imports

from _config import csv_bytes, write_file  # noqa: E402
from engine.tensorboard import flatten  # noqa: E402

# Keys that say how a run was executed, not what was trained: never table columns.
IGNORED_KEYS = {"seed", "data.root", "data.num_workers", "data.download", "data.decode", "data.in_memory",
                "trainer.progress", "trainer.resume", "trainer.eval_only", "trainer.device", "trainer.log_interval",
                "trainer.attention_maps", "trainer.checkpoint_every_steps"}
METRICS = ("top1_err", "top5_err")
GROUP_COLOURS = ("C0", "C1", "C2", "C4", "C5", "C6")  # C3 (red) marks the paper's numbers
BASELINE_NAME = "none"  # attention.name of the plain network: the baseline row wherever it is among the runs


def reported(metrics: dict, on_test: bool) -> dict[str, float]:
    """The errors a table row reports: the test set's (data.val_split runs) or the val set's."""
    return {k: metrics[f"test_{k}" if on_test else k] for k in METRICS}


def wall_time(seconds: float) -> str:
    """'1 h 02 min' or '48 min'."""
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


def load_runs(dirs: list[Path]) -> list[dict]:
    """Every run below ``dirs``: its path, flattened config and metrics."""
    runs = []
    for d in dirs:
        for metrics_path in sorted(d.rglob("metrics.json")):
            run_dir = metrics_path.parent
            config_path = run_dir / "config.yaml"
            raw = (yaml.safe_load(config_path.read_text()) if config_path.exists() else None) or {}
            runs.append({"dir": run_dir, "config": flatten({k: v for k, v in raw.items() if k != "paper"}),
                         "paper": paper_number(raw), "paper_block": raw.get("paper") or {},
                         "metrics": json.loads(metrics_path.read_text()),
                         "record": json.loads(record.read_text()) if (record := run_dir / "record.json").exists()
                         else None})
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


def aggregate(runs: list[dict], keys: list[str], on_test: bool = False) -> list[dict]:
    """One row per configuration (the varied keys' values), seeds pooled; ``on_test``: test-set errors."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault(tuple(str(run["config"].get(k, "-")) for k in keys), []).append(run)
    rows = []
    for values, members in groups.items():
        m = [r["metrics"] for r in members]
        errors = [reported(x, on_test) for x in m]
        records = [r["record"] for r in members if r["record"]]
        rows.append({
            **dict(zip(keys, values)),
            **{k: [e[k] for e in errors] for k in METRICS},
            "records": records, "dirs": [r["dir"] for r in members],
            "params": m[0].get("params"), "macs": m[0].get("macs"),
            "train_images_per_s": statistics.mean(x.get("train_images_per_s", 0.0) for x in m),
            "runs": len(members), "paper": members[0].get("paper"),
            "auroc": [x["auroc"] for x in m if x.get("auroc") is not None],
        })
    return sorted(rows, key=lambda r: tuple(value_order(r[k]) for k in keys))


def number(value: str) -> float | None:
    """A table value as a number, or None (``-``, names)."""
    try:
        return float(value)
    except ValueError:
        return None


def value_order(value: str) -> tuple:
    """Sort key of one column's value: ``none`` first, then numbers numerically, then names, then ``-``."""
    if value == BASELINE_NAME:
        return (0, 0.0, "")
    if value == "-":
        return (3, 0.0, "")
    as_number = number(value)
    return (1, as_number, "") if as_number is not None else (2, 0.0, value)


def baseline_row(rows: list[dict], keys: list[str], runs: list[dict]) -> dict | None:
    """The row the others are compared with: ``attention.name=none``, else the paper block's ``baseline``."""
    if "attention.name" in keys:
        plain = [r for r in rows if r["attention.name"] == BASELINE_NAME]
        if plain:
            return plain[0]
    block = next((r["paper_block"] for r in runs if r["paper_block"].get("baseline") is not None), None)
    if block is None or block.get("key") not in keys:
        return None
    return next((r for r in rows if r[block["key"]] == str(block["baseline"])), None)


def difference(row: dict, base: dict) -> str:
    """Mean top-1 error minus the baseline's, ± the half-width of Welch's 95% confidence interval."""
    if row is base:
        return "baseline"
    a, b = row["top1_err"], base["top1_err"]
    delta = statistics.mean(a) - statistics.mean(b)
    if len(a) < 2 or len(b) < 2:
        return f"{delta:+.2f} (one run: no CI)"
    return f"{delta:+.2f} ± {welch_half_width(a, b):.2f}"


def welch_half_width(a: list[float], b: list[float]) -> float:
    """Half-width of the 95% confidence interval of mean(a) - mean(b) with unequal variances (Welch)."""
    from scipy.stats import t

    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    if va + vb == 0:
        return 0.0
    dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return float(t.ppf(0.975, dof)) * math.sqrt(va + vb)


def record_cells(row: dict) -> list[str]:
    """Command, hardware, wall time (mean over seeds) and record folder of a row's committed records."""
    records = row["records"]
    if not records:
        return ["-"] * 4
    walls = [r["wall_s"] for r in records]
    return [f"`{records[0]['command']}`", records[0]["hardware"],
            wall_time(statistics.mean(walls)) + (f" (mean of {len(walls)})" if len(walls) > 1 else ""),
            ", ".join(str(d) for d in row["dirs"])]


def markdown(rows: list[dict], keys: list[str], failed: list[dict], base: dict | None = None,
             on_test: bool = False) -> str:
    """The table (and the runs that did not complete) as markdown; a Δ column with several seeds and a ``base``."""
    with_paper = any(r.get("paper") is not None for r in rows)  # a recipe's runs: its published number beside ours
    with_delta = base is not None and any(r["runs"] > 1 for r in rows)
    with_auroc = any(r["auroc"] for r in rows)  # multi-label runs
    with_records = any(r["records"] for r in rows)  # committed run records: how each number was made
    error = "test top-1 err (%, final epoch)" if on_test else "top-1 err (%)"
    head = [*keys, *(["paper top-1 err (%)"] if with_paper else []), error,
            *(["Δ top-1 vs baseline ± 95% CI"] if with_delta else []), "test top-5 err (%)" if on_test else "top-5 err (%)",
            *(["mean AUROC"] if with_auroc else []), "params", "GMACs", "train img/s",
            *(["command", "hardware", "wall time", "record"] if with_records else [])]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        paper = ([f"{r['paper']:.2f}" if r.get("paper") is not None else "not in the paper"] if with_paper else [])
        delta = [difference(r, base)] if with_delta else []
        auroc = [(f"{statistics.mean(r['auroc']):.4f}" if r["auroc"] else "-")] if with_auroc else []
        cells = [r[k] for k in keys] + paper + [mean_std(r["top1_err"])] + delta + [mean_std(r["top5_err"])] + auroc
        cells += [f"{r['params']:,}", f"{r['macs'] / 1e9:.3f}", f"{r['train_images_per_s']:.0f}"]
        if with_records:
            cells += record_cells(r)
        lines.append("| " + " | ".join(cells) + " |")
    if failed:
        lines += ["", "Runs that did not complete (not in the table):", ""]
        lines += [f"- {r['dir']}: {r['metrics'].get('status')} {r['metrics'].get('error', '')}".rstrip() for r in failed]
    return "\n".join(lines)


def write_csv(rows: list[dict], keys: list[str], path: Path, on_test: bool = False) -> None:
    """One CSV row per configuration, with mean and std columns; ``errors_of`` says test or val set."""
    errors_of = "test" if on_test else "val"
    table = [[*keys, "paper_top1_err", "top1_err_mean", "top1_err_std", "top5_err_mean", "top5_err_std",
              "auroc_mean", "runs", "params", "macs", "train_images_per_s", "errors_of"]]
    sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0  # noqa: E731
    for r in rows:
        table.append([*(r[k] for k in keys), "" if r.get("paper") is None else r["paper"],
                      statistics.mean(r["top1_err"]), sd(r["top1_err"]),
                      statistics.mean(r["top5_err"]), sd(r["top5_err"]),
                      statistics.mean(r["auroc"]) if r["auroc"] else "", r["runs"], r["params"], r["macs"],
                      r["train_images_per_s"], errors_of])
    data = csv_bytes(table)
    write_file(path, lambda f: f.write(data))


def numeric_key(rows: list[dict], keys: list[str]) -> str | None:
    """The one varied key whose values (where rows have it) are all numbers: the plot's first x-axis."""
    numeric = [k for k in keys if all(number(r[k]) is not None for r in rows if r[k] != "-")
               and any(r[k] != "-" for r in rows)]
    return numeric[0] if len(numeric) == 1 else None


def _draw(ax, xs: float, r: dict, label: str | None, paper_label: str | None, colour: str = "C0") -> None:
    """One configuration: mean top-1 error with the seeds' std as a bar, and the paper's number as a cross."""
    ys = r["top1_err"]
    ax.errorbar(xs, statistics.mean(ys), yerr=statistics.stdev(ys) if len(ys) > 1 else 0.0, fmt="o", capsize=3,
                color=colour, label=label)
    if r.get("paper") is not None:
        ax.plot(xs, r["paper"], "x", color="C3", markersize=8, label=paper_label)


def plot(rows: list[dict], keys: list[str], x: str, path: Path, base: dict | None = None) -> None:
    """Top-1 error against the numeric varied key (where there is one) and against params or MACs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    swept = numeric_key(rows, keys)
    fig, axes = plt.subplots(1, 2 if swept else 1, figsize=(11 if swept else 6, 4), dpi=120, squeeze=False)
    if swept:
        ax = axes[0][0]
        points = sorted(((number(r[swept]), r) for r in rows if r[swept] != "-"), key=lambda point: point[0])
        others = [k for k in keys if k != swept]  # rows that differ in another key get their own colour
        groups = list(dict.fromkeys(tuple(r[k] for k in others) for _, r in points))
        labelled, paper_labelled = set(), False
        for value, r in points:
            group = tuple(r[k] for k in others)
            has_paper = r.get("paper") is not None
            name = ", ".join(f"{k}={v}" for k, v in zip(others, group) if v != "-")
            _draw(ax, value, r, None if group in labelled else f"ours{': ' + name if name else ''} (mean ± std over seeds)",
                  "paper" if has_paper and not paper_labelled else None, GROUP_COLOURS[groups.index(group) % len(GROUP_COLOURS)])
            labelled.add(group)
            paper_labelled |= has_paper
        values = [v for v, _ in points]
        if min(values) > 0 and max(values) / min(values) >= 4:  # a geometric sweep (r = 2 ... 32)
            ax.set_xscale("log", base=2)
        ax.set_xticks(values, [f"{v:g}" for v in values])
        if base is not None and base[swept] == "-":  # the plain network has no such key: a line across
            ax.axhline(statistics.mean(base["top1_err"]), color="grey", linestyle="--",
                       label=f"{', '.join(f'{k}={base[k]}' for k in keys if base[k] != '-')} (ours)")
        ax.set_xlabel(swept)
        ax.set_ylabel("top-1 error (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax = axes[0][-1]
    for r in rows:
        xs = r[x] / (1e6 if x == "params" else 1e9)
        _draw(ax, xs, r, None, None)
        ax.annotate(", ".join(f"{k.split('.')[-1]}={r[k]}" for k in keys if r[k] != "-"), (xs, statistics.mean(r["top1_err"])),
                    textcoords="offset points", xytext=(5, 5), fontsize=7)
    ax.set_xlabel("parameters (M)" if x == "params" else "GMACs")
    ax.set_ylabel("top-1 error (%)")
    ax.grid(alpha=0.3)
    write_file(path, lambda f: fig.savefig(f, format="png", bbox_inches="tight"))
    plt.close(fig)


def main(argv: list[str]) -> int:
    """Read the runs, print the markdown table, write the CSV and the plot."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="+", type=Path)
    parser.add_argument("--x", choices=["params", "macs"], default="params", help="the plot's x-axis")
    parser.add_argument("--out", type=Path, help="where the CSV and the PNG go (default: the first DIR)")
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
    on_test = bool(done) and all("test_top1_err" in r["metrics"] for r in done)
    rows = aggregate(done, keys, on_test)
    base = baseline_row(rows, keys, done)
    print(markdown(rows, keys, failed, base, on_test))
    if rows:
        out = args.out or args.dirs[0]
        out.mkdir(parents=True, exist_ok=True)
        write_csv(rows, keys, out / "ablation.csv", on_test)
        plot(rows, keys, args.x, out / "ablation.png", base)
        print(f"\nwrote {out / 'ablation.csv'} and {out / 'ablation.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
