"""Export to ONNX and torch.export: a sample of the block x backbone matrix (``scripts/export.py --all`` runs all
of it), and a trained checkpoint's export checked on its own val images."""
import json

import pytest
import torch

from engine.checkpoint import save_checkpoint
from engine.config import plain_config
from engine.export import RTOL, check_export, matches, small_pair
from models import build_model
from tests.helpers import compose_config, run_script

# A sample that fits the suite's budget (about 8 s a pair here): a gate, pooling along each axis (coordinate
# attention's adaptive pools, a known ONNX trouble spot), unfold-and-fold windows (Col2Im), a sampling grid.
SAMPLE = [("resnet20", "se"), ("resnet20", "coord"), ("resnet20", "outlook"), ("resnet20", "stn")]


@pytest.mark.slow
@pytest.mark.parametrize("backbone,block", SAMPLE, ids=[f"{b}-{a}" for b, a in SAMPLE])
def test_a_block_exports_to_onnx_and_matches_eager_in_onnxruntime(backbone, block):
    check = check_export(small_pair(backbone, block), 32)
    assert matches(check), check
    assert check.torch_export, check.error


def test_a_trained_checkpoint_exports_and_matches_its_own_outputs_on_val_images(tmp_path):
    cfg = compose_config("model=resnet20", "attention=se", "data=digits")
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.attention, cfg.attention_extra, cfg.data.num_classes, cfg.data.image_size)
    checkpoint = tmp_path / "last.pt"
    save_checkpoint({"model": model.state_dict(), "ema": None, "epoch": 1, "config": plain_config(cfg)}, checkpoint)
    done = run_script("export.py", "--checkpoint", str(checkpoint), "--num-images", "4", "--out", str(tmp_path),
                      "data=digits")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["matches"] and result["images"] == 4 and result["max_diff"] <= RTOL
    assert (tmp_path / "model.onnx").stat().st_size > 100_000
