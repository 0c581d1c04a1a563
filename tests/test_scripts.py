"""The scripts as a user runs them: complexity's per-part table and JSON line, the benchmarks, the ablation table."""
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from engine.complexity import count_macs, count_params
from models import build_model
from tests.helpers import QUICK, compose_config, meta_device, read_metrics, run_cli, run_script


def test_complexity_prints_the_built_models_counts_as_json():
    proc = run_script("complexity.py", "model=resnet50", "attention=se", "data=imagenet")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    model = build_model({"name": "resnet50", "stem": "imagenet"}, {"name": "se"})
    parts, widths = result.pop("parts"), result.pop("widths")
    assert {(w["channels"], w["width"]) for w in widths} == {(c, c // 16) for c in (256, 512, 1024, 2048)}
    assert result == {"params": count_params(model), "macs": count_macs(model, (3, 224, 224)), "input_size": 224}
    assert result["params"] == 28_088_024
    stages = {p["part"]: p for p in parts}
    assert stages["stage 4"]["params"] == count_params(model.layer4)  # the SE blocks of stage 4 included
    assert stages["stage 1"]["macs"] == count_macs(nn.Sequential(model.layer1), (64, 56, 56))


@pytest.mark.parametrize("overrides,names", [
    (("model=mobilenext", "data=imagenet"), [f"stage {s}" for s in range(1, 9)]),
    (("model=volo_d1", "data=imagenet", "attention=none"), [f"stage {s}" for s in range(1, 5)]),
    (("model=agcnn", "model.backbone=resnet20", "data=cifar10"), ["global branch", "local branch", "fusion"]),
], ids=["mobilenext", "volo_d1", "agcnn"])
def test_complexity_parts_add_up_to_the_total(overrides, names):
    proc = run_script("complexity.py", *overrides)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    parts = result["parts"]
    assert [p["part"] for p in parts] == [*names, "rest (stem, head)", "total"]
    assert parts[-1]["params"] == result["params"] and parts[-1]["macs"] == result["macs"]
    # the rest, counted on its own: the parameters in no part (parts that overlapped would show here)
    cfg = compose_config(*overrides)
    with meta_device():
        model = build_model(cfg.model, cfg.attention, cfg.attention_extra, cfg.data.num_classes)
    in_parts = {id(p) for part in model.parts().values() for p in part.parameters()}
    assert parts[-2]["params"] == sum(p.numel() for p in model.parameters() if id(p) not in in_parts)
    assert [p["params"] for p in parts[:-2]] == [count_params(part) for part in model.parts().values()]
    assert all(p["macs"] > 0 for p in parts[:len(names)]) and 0 <= parts[-2]["macs"] < result["macs"]


def test_complexity_bad_override_is_a_short_error():
    """As a real process (the other script tests call main in-process): exit status, stderr, no traceback."""
    proc = run_script("complexity.py", "attention=sse", in_process=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "Available options in 'attention'" in proc.stderr
    value = run_script("complexity.py", "attention.reduction=0")  # the value rules, as train.py applies them
    assert value.returncode == 1 and value.stderr.strip() == (
        "error: attention.reduction=0 is not allowed: use an integer >= 1")


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


def test_the_compute_only_loop_times_the_recipes_own_model_and_settings():
    proc = run_script("compute_loop.py", "--steps=2", "--warmup=1", "--json", "experiment=cifar10_resnet20",
                      "attention=se", in_process=False)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["images_per_s"] > 0 and result["batch"] == 128 and result["steps"] == 2
    assert result["torch_threads"] == 1 and result["deterministic"] is True  # the recipe's kernels, one thread


@pytest.mark.slow
def test_the_recipe_benchmark_alternates_train_py_with_its_compute_only_loop(cifar10_root):
    proc = run_script("benchmark.py", "--recipe", "--threads=1", "--rounds=3", "--train-samples=512", "--steps=2",
                      f"--root={cifar10_root}", "experiment=cifar10_resnet20", "trainer.log_interval=1",
                      in_process=False)
    assert proc.returncode == 0, proc.stderr
    rounds = [line.split(": ", 1)[1].split()[0] for line in proc.stdout.splitlines() if line.startswith("round")]
    assert rounds == ["recipe", "compute", "compute", "recipe", "recipe", "compute"]  # alternating
    assert "1 process(es) x 1 thread(s)" in proc.stdout and "ratio" in proc.stdout


def test_the_recipe_benchmark_takes_at_least_three_rounds_and_one_process():
    proc = run_script("benchmark.py", "--recipe", "--rounds=2")
    assert proc.returncode == 1
    assert proc.stderr.strip() == "benchmark: --rounds=2; the protocol takes the median of at least 3 rounds"
    proc = run_script("benchmark.py", "--recipe", "--parallel=0")
    assert proc.returncode == 1 and proc.stderr.strip() == "benchmark: --parallel=0; use an integer >= 1"


def fake_run(root, name: str, config: dict, metrics: dict):
    """A run directory as train.py leaves it (config.yaml + metrics.json), with given contents."""
    import yaml

    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "metrics.json").write_text(json.dumps(metrics))
    return run


def test_ablation_table_aggregates_seeds_and_lists_failed_runs_apart(tmp_path):
    base = {"model": {"name": "resnet20"}, "data": {"root": "/a"}}  # data.root: never a column
    done = {"status": "completed", "top5_err": 1.0, "params": 1000, "macs": 2_000_000, "train_images_per_s": 50.0}
    for seed, err in enumerate([10.0, 12.0, 14.0]):
        fake_run(tmp_path, f"r8_s{seed}", {**base, "attention": {"name": "se", "reduction": 8}, "seed": seed},
                 {**done, "top1_err": err})
    fake_run(tmp_path, "r4", {**base, "attention": {"name": "se", "reduction": 4}, "seed": 0}, {**done, "top1_err": 9.0})
    fake_run(tmp_path, "plain", {**base, "attention": {"name": "none"}, "seed": 0},
             {**done, "top1_err": 20.0})  # has no attention.reduction: "-" in that column
    fake_run(tmp_path, "r2", {**base, "attention": {"name": "se", "reduction": 2}, "seed": 0},
             {"status": "failed", "error": "NonFiniteLossError: boom", "top1_err": 99.0})
    proc = run_script("ablation_table.py", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("| attention.name | attention.reduction | top-1 err (%) |")
    assert lines[2].startswith("| none | - | 20.00 | baseline |")  # the plain network first, then r in order
    assert lines[3].startswith("| se | 4 | 9.00 | -11.00 (one run: no CI) |")
    assert lines[4].startswith("| se | 8 | 12.00 ± 2.00 (3) |")
    assert "99.00" not in proc.stdout and "r2: failed NonFiniteLossError: boom" in proc.stdout
    assert (tmp_path / "ablation.csv").read_text().count("\n") == 4
    assert (tmp_path / "ablation.png").stat().st_size > 0


def test_ablation_table_puts_the_recipes_paper_number_beside_ours_and_never_varies_it(tmp_path):
    paper = {"source": "Hu et al., Table 10", "metric": "top1_err", "key": "attention.reduction",
             "values": [[4, 22.25], [8, 22.26]]}
    done = {"status": "completed", "top5_err": 1.0, "params": 1000, "macs": 2_000_000, "train_images_per_s": 50.0}
    for r, err in ((4, 30.0), (8, 31.0), (2, 29.0)):
        fake_run(tmp_path, f"r{r}", {"attention": {"name": "se", "reduction": r}, "paper": paper, "seed": 0},
                 {**done, "top1_err": err})
    proc = run_script("ablation_table.py", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("| attention.reduction | paper top-1 err (%) | top-1 err (%) |")  # paper.* not varied
    assert lines[2].startswith("| 2 | not in the paper | 29.00 |")
    assert lines[3].startswith("| 4 | 22.25 | 30.00 |") and lines[4].startswith("| 8 | 22.26 | 31.00 |")


DONE = {"status": "completed", "top5_err": 1.0, "params": 1000, "macs": 2_000_000, "train_images_per_s": 50.0}


def test_ablation_rows_follow_the_swept_values_with_a_welch_interval_against_the_baseline(tmp_path):
    from scipy.stats import ttest_ind

    errors = {"none": [20.0, 21.0, 23.0], 2: [18.0, 18.5, 19.5], 16: [17.0, 19.0, 18.0], 32: [19.0, 19.2, 20.1],
              4: [18.2, 18.1, 18.9]}
    for value, errs in errors.items():
        attention = {"name": "none"} if value == "none" else {"name": "se", "reduction": value}
        for seed, err in enumerate(errs):
            fake_run(tmp_path, f"{value}_s{seed}", {"attention": attention, "seed": seed}, {**DONE, "top1_err": err})
    proc = run_script("ablation_table.py", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    rows = [line.split(" | ") for line in proc.stdout.splitlines()[2:7]]
    assert [r[1] for r in rows] == ["-", "2", "4", "16", "32"]  # numerically, not 16 < 2 < 32 as text
    for row in rows[1:]:
        a, b = errors[int(row[1])], errors["none"]
        interval = ttest_ind(a, b, equal_var=False).confidence_interval(0.95)  # scipy's Welch interval
        delta, half = (float(v) for v in row[3].split(" ± "))
        assert delta == pytest.approx(sum(a) / 3 - sum(b) / 3, abs=0.006)
        assert half == pytest.approx((interval.high - interval.low) / 2, abs=0.006)
    assert rows[0][3] == "baseline"


def test_the_recipes_reference_value_is_the_baseline_without_a_plain_run_and_auroc_shows(tmp_path):
    paper = {"source": "Table 10", "metric": "top1_err", "key": "attention.reduction",
             "values": [[8, 22.26], [16, 22.28]], "baseline": 16}
    for value, errs in {8: [30.0, 31.0], 16: [29.0, 30.0]}.items():
        for seed, err in enumerate(errs):
            fake_run(tmp_path, f"r{value}_s{seed}", {"attention": {"name": "se", "reduction": value}, "seed": seed,
                                                      "paper": paper}, {**DONE, "top1_err": err, "auroc": 0.75 + seed / 10})
    proc = run_script("ablation_table.py", str(tmp_path))
    lines = proc.stdout.splitlines()
    assert lines[0] == ("| attention.reduction | paper top-1 err (%) | top-1 err (%) | Δ top-1 vs baseline ± 95% CI | "
                        "top-5 err (%) | mean AUROC | params | GMACs | train img/s |")
    assert lines[2].startswith("| 8 | 22.26 | 30.50 ± 0.71 (2) | +1.00 ± ") and "| 0.8000 |" in lines[2]
    assert lines[3].startswith("| 16 | 22.28 | 29.50 ± 0.71 (2) | baseline |")


def test_every_recipes_paper_block_names_a_key_its_runs_have():
    from tests.helpers import CONFIG_DIR, compose_config

    with_paper = []
    for path in sorted((CONFIG_DIR / "experiment").glob("*.yaml")):
        cfg = compose_config(f"experiment={path.stem}")
        if cfg.paper is None:
            continue
        with_paper.append(path.stem)
        assert cfg.paper.source and cfg.paper.metric == "top1_err", path.stem
        node = cfg
        for part in cfg.paper.key.split("."):
            node = node[part]  # the key exists in the composed config
        assert str(node) in {str(value) for value, _ in cfg.paper["values"]}, path.stem  # the recipe's own number
    without = {"cifar10_se_ratio"}  # no paper reports SE-ResNet-56 on CIFAR-10
    assert set(with_paper) == {p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml")} - without


def test_a_paper_block_the_table_cannot_read_is_one_line():
    from engine.config import check_config
    from models import ConfigError
    from tests.helpers import compose_config

    with pytest.raises(ConfigError, match="paper.key=attention.reductio is not allowed: use a key of this config"):
        check_config(compose_config("experiment=se_ratio_ablation", "paper.key=attention.reductio"))
    with pytest.raises(ConfigError, match=r"paper.values=\[\[2\]\] is not allowed"):
        check_config(compose_config("experiment=se_ratio_ablation", "paper.values=[[2]]"))


@pytest.mark.slow
@pytest.mark.parametrize("launcher", [(), ("hydra/launcher=joblib", "hydra.launcher.n_jobs=2")],
                         ids=["basic", "joblib"])
def test_ablation_table_of_a_real_two_point_sweep(tmp_path, launcher):
    sweep = run_cli("-m", *launcher, "attention.reduction=4,8", f"hydra.sweep.dir={tmp_path}", "trainer.epochs=1",
                    "data.max_train_samples=64", "data.max_val_samples=30", "trainer.progress=false")
    assert sweep.returncode == 0, sweep.stderr
    proc = run_script("ablation_table.py", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[0].startswith("| attention.reduction |") and len(rows) == 3
    import yaml

    runs = [d for d in tmp_path.iterdir() if (d / "metrics.json").exists()]
    assert len(runs) == 2
    for run in runs:
        metrics = read_metrics(run)
        reduction = yaml.safe_load((run / "config.yaml").read_text())["attention"]["reduction"]
        assert any(r.startswith(f"| {reduction} | {metrics['top1_err']:.2f} |") for r in rows[1:])


@pytest.mark.parametrize("attention,maps", [
    ("cbam", {"channel gate", "spatial gate"}),  # a channel strip and a spatial mask
    ("coord", {"a_h x a_w"}),
    ("nonlocal", {"query attention"}),  # the query position's weights
    ("stn", {"sampling grid"}),
])
def test_visualize_attention_writes_one_labelled_figure_per_image(tmp_path, attention, maps):
    from PIL import Image

    image = tmp_path / "cat.png"
    Image.new("RGB", (45, 30), (200, 100, 50)).save(image)
    proc = run_script("visualize_attention.py", f"attention={attention}", f"out={tmp_path / 'vis'}",
                      f"images=[{image}]", "query=[0.25,0.75]")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["files"] == [str(tmp_path / "vis" / "cat.png")]
    assert {label.split(" · ")[-1] for label in result["maps"]} == maps
    width, height = Image.open(result["files"][0]).size
    assert width > 1000 and height > 500  # the 32-pixel input drawn large, not at its own size


def test_attention_figure_labels_every_map_with_its_place_and_marks_the_query():
    """MobileNetV2 + CA (every unit with expansion, after the depthwise conv) and a non-local block."""
    from engine.visualize import attention_figure, collect_maps

    model = build_model({"name": "mobilenetv2", "stem": "cifar", "width_mult": 0.35}, {"name": "coord"},
                        [{"name": "nonlocal", "stages": [-2], "units": [1], "position": "post"}], num_classes=10).eval()
    maps, = collect_maps(model, torch.randn(1, 3, 32, 32), query=(0.25, 0.75))
    places = [m.place for m in maps if m.block == "coord"]
    assert len(places) == 16 and places[0] == "stage 2 · unit 1 · after_spatial" and places[-1].startswith("stage 7")
    query, = [m for m in maps if m.kind == "query"]
    assert query.place == "stage 6 · unit 1 · post" and query.block == "nonlocal"
    fig = attention_figure(torch.rand(3, 32, 32), maps, torch.rand(4, 4), "title", query=(0.25, 0.75))
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[:2] == ["input", titles[1]] and titles[1].startswith("Grad-CAM")
    assert sum(t.startswith("stage 2 · unit 1 · after_spatial\ncoord: a_h x a_w") for t in titles) == 1
    marked, = [ax for ax in fig.axes if ax.get_title().startswith("stage 6 · unit 1 · post")]
    (x,), (y,) = marked.lines[0].get_data()
    assert (y, x) == (8, 24)  # the query (0.25, 0.75) of a 32 x 32 input, marked on the upsampled map


def test_visualize_attention_reads_a_checkpoints_model(tmp_path, quick_config):
    from engine.run import train

    train(quick_config("attention=eca", "trainer.epochs=1", "data.max_train_samples=64"), tmp_path / "run")
    proc = run_script("visualize_attention.py", f"checkpoint={tmp_path / 'run' / 'checkpoints' / 'last.pt'}",
                      "num_images=2", f"out={tmp_path / 'vis'}", "gradcam=false")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(result["maps"]) == 9 and len(result["files"]) == 2  # nine ECA units, two val images: two figures
    bad = run_script("visualize_attention.py", f"checkpoint={tmp_path / 'missing.pt'}")
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and "missing.pt" in bad.stderr


def test_excitation_analysis_means_per_class_match_the_gates(tmp_path):
    """The CSV's per-class means equal the SE gates' outputs averaged by hand over the same images."""
    import csv

    import torch

    from data import build_datasets

    proc = run_script("excitation_analysis.py", "attention=se", "blocks=[[1,1],[3,3]]", "max_images=60",
                      f"out={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(open(tmp_path / "excitation.csv")))
    assert {r["block"] for r in rows} == {"stage1_unit1", "stage3_unit3"}
    assert (tmp_path / "excitation.png").stat().st_size > 0
    torch.manual_seed(0)
    cfg = compose_config("attention=se")
    model = build_model(cfg.model, cfg.attention, num_classes=10).eval()
    gates = []
    model.layer3[2].attn_standard.gate.register_forward_hook(lambda m, i, o: gates.append(o.flatten(1)))
    val = build_datasets(cfg.data, seed=cfg.seed)[1]
    images = torch.stack([val[i][0] for i in range(60)])
    labels = torch.tensor([val[i][1] for i in range(60)])
    with torch.no_grad():
        model(images)
    for k in labels.unique().tolist()[:3]:
        expected = gates[0][labels == k].mean(0)
        got = [float(r["mean_excitation"]) for r in rows if r["block"] == "stage3_unit3" and r["class"] == str(k)]
        torch.testing.assert_close(torch.tensor(got), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_the_gpu_benchmark_runs_every_measurement_at_toy_sizes_on_the_cpu(tmp_path):
    """``--smoke``: the script cannot rot while no GPU is at hand; the JSON holds every measurement in order."""
    proc = run_script("benchmark_gpu.py", "--smoke", f"--out={tmp_path}", in_process=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads((tmp_path / "benchmark_gpu.json").read_text())
    names = ["step_resnet50", "step_se_resnet50", "step_cbam_resnet50", "step_mobilenetv2_ca", "step_volo_d1",
             "cifar_resnet20", "input_pil", "input_gpu", "step_resnet50_compiled", "step_se_resnet50_compiled",
             "train_resnet50_folder"]
    assert list(saved["results"]) == names  # the priority order
    assert all("error" not in r and r["images_per_s"] > 0 for r in saved["results"].values()), saved["results"]
    assert saved["results"]["step_resnet50_compiled"]["first_step_s"] > 0
    table = (tmp_path / "benchmark_gpu.md").read_text()
    assert table.count("\n| ") == len(names) + 2 and "≥ 50,000 img/s" in table  # head, rule, a row each
    only = run_script("benchmark_gpu.py", "--smoke", f"--out={tmp_path / 'again'}", "--only=input_pil",
                      in_process=False)
    assert only.returncode == 0 and list(json.loads((tmp_path / "again" / "benchmark_gpu.json").read_text())
                                         ["results"]) == ["input_pil"]


def test_ablation_table_reports_the_test_error_of_val_split_runs_with_their_records(tmp_path):
    """Runs trained with data.val_split: the table shows test_top1_err (not the hold-out's), and a committed
    record's command, hardware and wall time."""
    for name, attention, val_err, test_err, wall in (("plain", "none", 9.5, 8.9, 2_460), ("se", "se", 9.1, 8.4, 3_000)):
        run = fake_run(tmp_path, name, {"attention": {"name": attention}, "seed": 0},
                       {**DONE, "top1_err": val_err, "test_top1_err": test_err, "test_top5_err": 0.5})
        (run / "record.json").write_text(json.dumps({"command": f"python train.py attention={attention}",
                                                     "hardware": "2 cores of X, no GPU", "wall_s": wall}))
    proc = run_script("ablation_table.py", str(tmp_path), "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("| attention.name | test top-1 err (%, final epoch) | test top-5 err (%) |")
    assert lines[0].rstrip().endswith("| command | hardware | wall time | record |")
    assert lines[2].startswith("| none | 8.90 | 0.50 |") and "| `python train.py attention=none` | 2 cores of X, no GPU | 41 min |" in lines[2]
    assert lines[3].startswith("| se | 8.40 | 0.50 |") and "| 50 min |" in lines[3]
    assert "9.50" not in proc.stdout and "9.10" not in proc.stdout
    assert (tmp_path / "out" / "ablation.csv").read_text().splitlines()[1].endswith(",test")


def test_run_record_writes_a_record_and_its_first_epochs_reproduce(tmp_path):
    """write copies config and history and names the command; check re-runs two epochs and finds them equal,
    and a record whose loss was changed is reported as different."""
    # a step schedule: its first epochs' lr does not depend on trainer.epochs (cosine's would)
    overrides = [*QUICK, "sched=step", "sched.decay_epochs=[2]", "trainer.epochs=3", "trainer.deterministic=true",
                 "data.num_workers=0"]
    ran = run_cli(*overrides, f"hydra.run.dir={tmp_path / 'run'}")
    assert ran.returncode == 0, ran.stderr
    record = tmp_path / "record"
    proc = run_script("run_record.py", "write", str(tmp_path / "run"), str(record), "--wall-s", "12.4",
                      "--commit", "abc1234", "--", *overrides, f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stderr
    written = json.loads((record / "record.json").read_text())
    assert written["command"].startswith("python train.py data.max_train_samples=256") and written["wall_s"] == 12
    assert written["commit"] == "abc1234" and written["epochs"] == 3 and "no GPU" in written["hardware"]
    assert len(json.loads((record / "metrics.json").read_text())["history"]) == 3
    proc = run_script("run_record.py", "check", str(record))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "epoch 2 train_loss" in proc.stdout and "epoch 2 lr" in proc.stdout and "reproduced" in proc.stdout
    metrics = json.loads((record / "metrics.json").read_text())
    metrics["history"][1]["train_loss"] += 1e-3
    (record / "metrics.json").write_text(json.dumps(metrics))
    proc = run_script("run_record.py", "check", str(record))
    assert proc.returncode == 1 and "epoch 2 train_loss" in proc.stdout and "DIFFERENT" in proc.stdout
