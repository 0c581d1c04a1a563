"""Fingerprints of built models (state-dict names and shapes, initial weights, logits), to show a refactor changed none.

``python tests/fingerprints.py`` records them in ``tests/data/model_fingerprints.json`` from the code as it is;
``tests/test_contract.py`` rebuilds every recorded model and compares.
"""
import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import build_model  # noqa: E402

RECORD = Path(__file__).parent / "data" / "model_fingerprints.json"

BACKBONES = {
    "resnet20": {"name": "resnet20"},
    "resnet50": {"name": "resnet50"},
    "mobilenetv2": {"name": "mobilenetv2", "stem": "cifar", "width_mult": 0.35},
    "mobilenext": {"name": "mobilenext", "stem": "cifar", "width_mult": 0.35},
    "volo_d1": {"name": "volo_d1", "stem": "cifar", "img_size": 32},
    "agcnn": {"name": "agcnn", "backbone": "resnet20", "stem": "cifar", "img_size": 32},
    "densenet121": {"name": "densenet121", "stem": "cifar"},
    "attention56": {"name": "attention56", "stem": "cifar", "width": 8},
}
# Every position and a composed pair; blocks at the last stage where they are costly.
ATTENTION = {
    "none": ({"name": "none"}, []),
    "se": ({"name": "se"}, []),
    "cbam_pre": ({"name": "cbam", "position": "pre", "stages": [-1]}, []),
    "eca_identity": ({"name": "eca", "position": "identity"}, []),
    "gc_after_spatial": ({"name": "gc", "position": "after_spatial"}, []),
    "mhsa_replace": ({"name": "mhsa", "stages": [-1], "heads": 2}, []),
    "stn_stem": ({"name": "stn", "position": "stem"}, []),
    "coord": ({"name": "coord"}, []),
    "se_and_nonlocal_post": ({"name": "se", "stages": [1]}, [{"name": "nonlocal", "stages": [-1], "every": 2}]),
}


def fingerprint(model_cfg: dict, attention: dict, extra: list) -> dict[str, Any]:
    """Names and shapes (hashed), parameter count, initial-weight sums and eval logits of one built model."""
    torch.manual_seed(0)
    try:
        model = build_model(model_cfg, attention, extra, num_classes=10).eval()
    except Exception as e:  # a combination the backbone refuses: its message is the fingerprint
        return {"error": f"{type(e).__name__}: {e}"}
    state = model.state_dict()
    names = sorted(f"{k}:{tuple(v.shape)}" for k, v in state.items())
    sums = [float(v.double().sum()) for _, v in sorted(state.items()) if v.is_floating_point()]
    torch.manual_seed(1)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = model(x)
    return {
        "names_sha1": hashlib.sha1("\n".join(names).encode()).hexdigest(),
        "tensors": len(names),
        "params": sum(p.numel() for p in model.parameters()),
        "weight_sum": sum(sums),
        "weight_abs_sum": sum(abs(s) for s in sums),
        "logits": logits.flatten().tolist(),
    }


def cases() -> dict[str, tuple[dict, dict, list]]:
    """Every recorded (backbone, attention) pair by its key."""
    return {f"{b}/{a}": (m, att, extra) for b, m in BACKBONES.items() for a, (att, extra) in ATTENTION.items()}


if __name__ == "__main__":
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    record = {"commit": commit, "models": {key: fingerprint(*case) for key, case in cases().items()}}
    RECORD.write_text(json.dumps(record, indent=1) + "\n")
    print(f"{len(record['models'])} fingerprints from {commit} -> {RECORD}")
