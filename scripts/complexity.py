"""Parameters and MACs of a configured model, without data or training.

Usage: python scripts/complexity.py model=resnet50 attention=se data=imagenet
Takes train.py's overrides; the last line printed is one JSON object.
"""
import json
import sys

from _config import compose_from_argv

from engine.complexity import count_macs, count_params
from models import ConfigError, build_model


def main(argv: list[str]) -> int:
    """Print a readable line and a JSON line with the model's parameters and MACs."""
    cfg = compose_from_argv(argv)
    try:
        model = build_model(cfg.model, cfg.attention, cfg.attention_extra, cfg.data.num_classes)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    size = cfg.data.image_size
    params, macs = count_params(model), count_macs(model, (3, size, size))
    print(f"{cfg.model.name} + {cfg.attention.name}: {params:,} parameters, "
          f"{macs / 1e9:.3f} GMACs at {size}x{size}")
    print(json.dumps({"params": params, "macs": macs, "input_size": size}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
