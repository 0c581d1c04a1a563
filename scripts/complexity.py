"""Parameters and MACs of a configured model, without data or training.

Usage: python scripts/complexity.py model=resnet50 attention=se data=imagenet
Takes train.py's overrides. Prints parameters and MACs per stage (per branch for AG-CNN), the rest
(stem, head) and the total, attention blocks included, then the attention blocks' bottleneck widths
(C // r, at least 1); the last line printed is one JSON object.
"""
import json
import sys
from collections import Counter

from _project import use_project

use_project()  # before the project's own imports

from _config import compose_from_argv  # noqa: E402
from engine.complexity import bottleneck_widths, complexity_by_part  # noqa: E402
from models import ConfigError, build_model  # noqa: E402


def main(argv: list[str]) -> int:
    """Print a per-part table and a JSON line with the model's parameters and MACs."""
    cfg = compose_from_argv(argv)
    try:
        model = build_model(cfg.model, cfg.attention, cfg.attention_extra, cfg.data.num_classes,
                            cfg.data.image_size)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    size = cfg.data.image_size
    rows = complexity_by_part(model, (3, size, size))
    print(f"{cfg.model.name} + {cfg.attention.name} at {size}x{size}")
    print(f"{'part':<20}{'parameters':>14}{'MACs':>16}")
    for row in rows:
        print(f"{row['part']:<20}{row['params']:>14,}{row['macs']:>16,}")
    widths = bottleneck_widths(model)
    if widths:
        counts = Counter((w["type"], w["channels"], w["width"]) for w in widths)
        print("bottleneck widths: " + ", ".join(f"{kind} {c}->{w} (x{n})" for (kind, c, w), n in counts.items()))
    total = rows[-1]
    print(json.dumps({"params": total["params"], "macs": total["macs"], "input_size": size, "parts": rows,
                      "widths": widths}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
