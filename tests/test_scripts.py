"""The scripts as a user runs them: complexity's JSON line."""
import json
import subprocess
import sys

from engine.complexity import count_macs, count_params
from models import build_model
from tests.conftest import ROOT


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / name), *args], capture_output=True,
                          text=True, timeout=300)


def test_complexity_prints_the_built_models_counts_as_json():
    proc = run_script("complexity.py", "model=resnet50", "attention=se", "data=imagenet")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    model = build_model({"name": "resnet50", "stem": "imagenet"}, {"name": "se"})
    assert result == {"params": count_params(model), "macs": count_macs(model, (3, 224, 224)), "input_size": 224}
    assert result["params"] == 28_088_024


def test_complexity_bad_override_is_a_short_error():
    proc = run_script("complexity.py", "attention=sse")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "Available options in 'attention'" in proc.stderr
