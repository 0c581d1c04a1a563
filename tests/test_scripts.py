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


def test_benchmark_attention_measures_every_block_and_timms_where_it_has_one():
    from models.attention import ATTENTION_BLOCKS

    proc = run_script("benchmark_attention.py", "--channels", "32", "--sizes", "8", "--batch", "2", "--repeats", "1")
    assert proc.returncode == 0, proc.stderr
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in proc.stdout.splitlines()
            if line.startswith("| ") and not line.startswith(("| block", "| ---"))}
    assert set(rows) == set(ATTENTION_BLOCKS)
    with_timm = {"se", "cbam", "eca", "coord", "gc", "nonlocal", "mhsa", "outlook"}
    for name, cells in rows.items():
        time_ratio = cells[3].strip()
        assert (time_ratio != "-") == (name in with_timm)
        if name in with_timm:
            assert float(time_ratio) > 0 and float(cells[6]) > 0
        assert float(cells[1]) > 0 and float(cells[4]) > 0  # our time and peak memory were measured
