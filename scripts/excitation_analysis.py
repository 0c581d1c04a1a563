"""The SE paper's excitation analysis: mean channel gate per class at chosen blocks, over the val set.

Usage: python scripts/excitation_analysis.py [checkpoint=PATH] [blocks=[[2,1],[3,3]]] [max_images=N]
           [out=DIR] <train.py overrides>
``blocks`` are (stage, unit) pairs, both 1-based (the SE paper's SE_2_1 ... SE_5_3); the channel gate
is the "channel gate" map of the unit's first block that has one (SE, ECA, CBAM). For each block, the mean
excitation of every channel over the val images of each class and over all of them is written to
``out/excitation.csv`` (block, class, channel, mean) and plotted, one panel per block, as the paper's
Figure: if the per-class curves coincide the block is class-agnostic, if they part it is
class-specific. The last line printed is JSON with the paths and, per block, the mean over channels
of the per-class curves' standard deviation (larger: more class-specific).
"""
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from _project import use_project  # noqa: E402
from torch.utils.data import DataLoader, Subset  # noqa: E402

use_project()  # before the project's own imports

from _config import csv_bytes, write_file  # noqa: E402
from _inputs import load_model, split_args  # noqa: E402
from data import build_datasets  # noqa: E402
from engine.visualize import capture_block_inputs  # noqa: E402
from models import Backbone  # noqa: E402
from models.attention.maps import attention_maps, blocks_with_maps  # noqa: E402

DEFAULTS = {"checkpoint": None, "blocks": None, "max_images": None, "out": "excitation", "batch_size": 100}


@torch.no_grad()
def gate_blocks(model: Backbone, blocks: list[list[int]] | None,
                example: torch.Tensor) -> dict[str, torch.nn.Module]:
    """The channel-gate block of each (stage, unit); by default the last unit of every stage.

    ``example``: one model input (1, 3, H, W), run once so that each block's maps of the input it
    receives tell whether it has a "channel gate".
    """
    stages = [model.stage_units(index) for index in range(len(model.stages))]  # the plan's unit numbering
    chosen = blocks or [[s, len(stage)] for s, stage in enumerate(stages, start=1)]
    for stage, unit in chosen:
        if not 1 <= stage <= len(stages) or not 1 <= unit <= len(stages[stage - 1]):
            sys.exit(f"error: blocks: no unit {unit} in stage {stage}; stages have "
                     f"{[len(s) for s in stages]} units")
    with capture_block_inputs(model) as records:
        model(example)
    with_gate = {block for _, block, x in records if "channel gate" in attention_maps(block, x)}
    found = {}
    for stage, unit in chosen:
        gates = [block for _, block in blocks_with_maps(stages[stage - 1][unit - 1]) if block in with_gate]
        if not gates:
            sys.exit(f"error: stage {stage} unit {unit} has no channel gate (SE, ECA or CBAM); "
                     "train with attention=se|eca|cbam")
        found[f"stage{stage}_unit{unit}"] = gates[0]
    return found


@torch.no_grad()
def mean_excitations(model, gates: dict[str, torch.nn.Module], loader: DataLoader, num_classes: int):
    """Per block, (per-class sums (K, C), per-class counts (K,)) of the channel gates."""
    sums, counts = {}, torch.zeros(num_classes)
    with capture_block_inputs(model) as records:
        for images, labels in loader:
            records.clear()
            model(images)
            counts += torch.bincount(labels, minlength=num_classes).float()
            for name, module, x in records:
                for key, gate in gates.items():
                    if module is gate:
                        excitation = attention_maps(module, x)["channel gate"][1]  # B, C
                        total = sums.setdefault(key, torch.zeros(num_classes, excitation.shape[1]))
                        total.index_add_(0, labels, excitation.float())
    return sums, counts


def main(argv: list[str]) -> int:
    """Measure, write the CSV and the figure, print a summary."""
    args, overrides = split_args(argv, DEFAULTS)
    model, cfg = load_model(overrides, args["checkpoint"])
    val_set = build_datasets(cfg.data, seed=cfg.seed)[1]
    gates = gate_blocks(model, args["blocks"], val_set[0][0][None])
    if args["max_images"]:
        val_set = Subset(val_set, range(min(args["max_images"], len(val_set))))
    loader = DataLoader(val_set, batch_size=args["batch_size"], num_workers=0)
    sums, counts = mean_excitations(model, gates, loader, cfg.data.num_classes)
    out = Path(args["out"])
    out.mkdir(parents=True, exist_ok=True)
    present = counts > 0
    fig, axes = plt.subplots(1, len(gates), figsize=(4 * len(gates), 3), squeeze=False)
    spread = {}
    table = [["block", "class", "channel", "mean_excitation"]]
    for ax, key in zip(axes[0], gates):
        per_class = sums[key][present] / counts[present, None]  # K', C
        overall = sums[key].sum(0) / counts.sum()
        for k, row in zip(present.nonzero().flatten().tolist(), per_class):
            table += [[key, k, c, f"{v:.6f}"] for c, v in enumerate(row.tolist())]
            ax.plot(row.numpy(), linewidth=0.8, label=f"class {k}")
        table += [[key, "all", c, f"{v:.6f}"] for c, v in enumerate(overall.tolist())]
        ax.plot(overall.numpy(), color="black", linewidth=1.2, label="all")
        ax.set(title=key, xlabel="channel index", ylabel="activation", ylim=(0, 1))
        spread[key] = per_class.std(0).mean().item() if len(per_class) > 1 else 0.0
    axes[0][-1].legend(fontsize=6, loc="upper right")
    fig.tight_layout()
    data = csv_bytes(table)
    write_file(out / "excitation.csv", lambda f: f.write(data))
    write_file(out / "excitation.png", lambda f: fig.savefig(f, format="png", dpi=120))
    print(f"mean excitation per class at {', '.join(gates)} over {int(counts.sum())} val images -> {out}/")
    print(json.dumps({"csv": str(out / "excitation.csv"), "png": str(out / "excitation.png"),
                      "class_spread": spread}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
