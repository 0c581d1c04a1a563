"""Config composition: every group option composes and builds; typos are errors, not ignored keys; bad values
are one-line errors before anything runs."""
import json
import shutil
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from engine import config
from engine.complexity import count_params
from engine.config import RULES, DataConfig, OptimConfig, SchedConfig, TrainerConfig, check_config
from errors import ConfigError
from models import build_model
from models.attention import SqueezeExcite
from tests.helpers import CONFIG_DIR, compose_config, meta_device

GROUPS = ["model", "attention", "data", "optim", "sched", "trainer"]
SCHEMA = {"data": DataConfig, "optim": OptimConfig, "sched": SchedConfig, "trainer": TrainerConfig}


def options(group: str) -> list[str]:
    """The option names of a config group, read from its folder."""
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def test_every_group_has_options():
    assert all(options(g) for g in GROUPS)


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes(group, option):
    extra = ["data.root=/some/where"] if group == "data" and option in ("imagenet", "imagefolder") else []
    extra += ["data.num_classes=5"] if option == "imagefolder" else []
    cfg = compose_config(f"{group}={option}", *extra)
    # the option's own literal values, before composition
    own = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / group / f"{option}.yaml"), resolve=False)
    overridden = {e.split("=")[0].split(".", 1)[1] for e in extra}
    chosen = {k: v for k, v in (own or {}).items() if k != "defaults" and k not in overridden
              and not (isinstance(v, str) and ("${" in v or v == "???"))}
    assert {k: cfg[group][k] for k in chosen} == chosen
    check_config(cfg)  # every shipped option passes the value rules
    schema = SCHEMA.get(group)
    if schema is not None:  # defaults live in the schema: an option repeats none of them, except its name
        defaults = OmegaConf.to_container(OmegaConf.structured(schema))
        repeated = [k for k, v in chosen.items() if k != "name" and defaults.get(k, object()) == v]
        assert not repeated, f"configs/{group}/{option}.yaml repeats the schema's defaults of {repeated}"
    if not chosen:  # an option of defaults only (trainer=default): the schema's values, all of them
        assert OmegaConf.to_container(cfg[group]) == OmegaConf.to_container(OmegaConf.structured(schema))


@pytest.mark.parametrize("model", options("model"))
@pytest.mark.parametrize("attention", options("attention"))
def test_every_model_builds_with_every_attention(model, attention):
    cfg = compose_config(f"model={model}", f"attention={attention}")
    with meta_device():  # shapes and validation only: VOLO-D5 has 295M parameters
        net = build_model(cfg.model, cfg.attention, cfg.attention_extra, cfg.data.num_classes)
    assert net.get_classifier().out_features == cfg.data.num_classes


def test_model_stem_follows_the_data_config():
    assert compose_config("model=resnet50", "data=digits").model.stem == "cifar"
    assert compose_config("model=resnet50", "data=imagenet", "data.root=/x").model.stem == "imagenet"
    assert compose_config("model=resnet50", "data=digits", "model.stem=imagenet").model.stem == "imagenet"


def test_attention_hyperparameter_override_reaches_the_model():
    cfg = compose_config("attention=se", "attention.reduction=8", "model=resnet20")
    net = build_model(cfg.model, cfg.attention, num_classes=10)
    widths = {m.fc1.in_channels: m.fc1.out_channels for m in net.modules() if isinstance(m, SqueezeExcite)}
    assert widths == {16: 2, 32: 4, 64: 8}


def test_attention_extra_from_the_command_line():
    cfg = compose_config("attention=se", "attention_extra=[{name: se, reduction: 4, stages: [3]}]", "model=resnet20")
    net = build_model(cfg.model, cfg.attention, cfg.attention_extra, 10)
    assert len(net.layer3[0].attn_standard) == 2


def test_unknown_option_lists_the_valid_ones():
    with pytest.raises(ConfigCompositionException) as info:
        compose_config("attention=seee")
    assert "Available options in 'attention'" in str(info.value) and "se" in str(info.value)


@pytest.mark.parametrize("override", ["data.batchsize=4", "trainer.epoch=3", "attention.reductio=4", "optim.momentun=0.5"])
def test_unknown_key_override_is_an_error(override):
    with pytest.raises(ConfigCompositionException, match=override.split("=")[0].split(".")[-1]):
        compose_config(override)


def test_added_attention_key_fails_at_build_with_the_valid_keys():
    cfg = compose_config("+attention.ratio=4")
    with pytest.raises(ConfigError, match="unknown key\\(s\\) ratio; valid keys: name, stages, position, every, units, by_stage, reduction, bias, squeeze, gate, divisor"):
        build_model(cfg.model, cfg.attention, num_classes=10)


def test_typo_inside_a_yaml_file_is_an_error(tmp_path: Path):
    configs = tmp_path / "configs"
    shutil.copytree(CONFIG_DIR, configs)
    (configs / "data" / "typo.yaml").write_text("defaults:\n  - digits\n  - _self_\nbatch_sise: 8\n")
    with pytest.raises(ConfigCompositionException) as info:
        compose_config("data=typo", config_dir=configs)
    assert "batch_sise" in str(info.value.__cause__ or info.value)


def test_wrong_type_is_an_error():
    with pytest.raises(ConfigCompositionException):
        compose_config("trainer.epochs=many")


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_starts_with_its_command_and_builds(experiment):
    lines = (CONFIG_DIR / "experiment" / f"{experiment}.yaml").read_text().splitlines()
    assert lines[0] == "# @package _global_"  # Hydra reads the package only from the first lines
    assert "train.py" in lines[1] and f"experiment={experiment}" in lines[1]
    cfg = compose_config(f"experiment={experiment}", "data.root=/data")
    with meta_device():
        net = build_model(cfg.model, cfg.attention, cfg.attention_extra, cfg.data.num_classes)
    assert count_params(net) > 0
    if experiment in COMPRESSED_SCHEDULES:  # shorter on purpose: its header says so and why
        assert "compressed" in "\n".join(lines[:12]) and cfg.trainer.epochs >= COMPRESSED_SCHEDULES[experiment]
    else:
        assert cfg.trainer.epochs >= 90  # a full paper schedule, not a smoke test


# Recipes whose schedule is a paper's shortened to fit the development CPU: the least epochs they keep.
COMPRESSED_SCHEDULES = {"cifar10_resnet20": 64, "cifar10_resnet20_step32": 32}


def test_the_resnet20_recipe_is_the_schedule_chosen_on_the_hold_out_run_in_final_mode():
    """docs/results.md names the winning candidate: the recipe is its command, on all 50k images, tested once."""
    record = json.loads((CONFIG_DIR.parent / "docs" / "runs" / "schedule" / CHOSEN_SCHEDULE / "record.json").read_text())
    candidate = [o for o in record["overrides"] if not o.startswith(("hydra.", "data.protocol="))]
    chosen = compose_config(*candidate, "data.protocol=final", "data.val_split=0")
    recipe = compose_config("experiment=cifar10_resnet20", *[o for o in candidate if o.startswith(RUN_SETTINGS)])
    as_dict = [OmegaConf.to_container(c, resolve=True) for c in (recipe, chosen)]
    for values in as_dict:
        del values["sched"]["decay_epochs"]  # the step schedule's milestones: unused by the chosen decay
    assert as_dict[0] == as_dict[1]
    assert recipe.data.protocol == "final" and recipe.data.val_split == 0 and recipe.trainer.epochs == 64


# The candidate docs/results.md names the winner, and the overrides of its record that say how it ran
# (where, with which data copy) rather than what it trained.
CHOSEN_SCHEDULE = "B"
RUN_SETTINGS = ("data.root=", "trainer.checkpoint_every_steps=", "trainer.progress=")


def test_the_resnet20_paper_recipe_is_he_et_als_schedule_on_resnet20_with_the_test_set_seen_once():
    """An alias of cifar10_resnet on the model Table 6 reports, not a copy of its settings."""
    from omegaconf import OmegaConf

    alias = compose_config("experiment=cifar10_resnet20_paper", "data.root=/data")
    spelled_out = compose_config("experiment=cifar10_resnet", "model=resnet20", "data.root=/data",
                                 "data.protocol=final")
    assert OmegaConf.to_container(alias, resolve=True) == OmegaConf.to_container(spelled_out, resolve=True)
    assert alias.model.name == "resnet20" and alias.trainer.epochs == 164 and list(alias.sched.decay_epochs) == [82, 123]
    assert alias.data.val_split == 0 and alias.data.protocol == "final"


# --- values refused when the config is composed ---------------------------------------------------

# One bad value for every key with a rule (engine.config.RULES), and for the model and attention keys
# that have one: what a user will try. Each must stop train.py in one line, before torch is loaded.
BAD_VALUES = {
    "seed": "-1", "data.name": "mnist", "data.num_classes": "0", "data.image_size": "0", "data.stem": "tiny",
    "data.mean": "[0.5,0.5]", "data.std": "[0.5,0,0.5]", "data.crop_pct": "0", "data.interpolation": "lanczos",
    "data.batch_size": "0", "data.eval_batch_size": "-8", "data.num_workers": "-1", "data.in_memory": "maybe", "data.decode": "fast",
    "data.max_train_samples": "0", "data.max_val_samples": "-5", "data.reprob": "1.5", "data.mixup": "-0.2",
    "data.cutmix": "-1", "data.label_smoothing": "1.0", "optim.name": "adam", "optim.lr": "0",
    "optim.weight_decay": "-1e-4", "optim.momentum": "1.0", "optim.betas": "[0.9,1.1]", "optim.clip_grad": "0",
    "optim.lr_reference_batch": "0", "sched.name": "poly", "sched.warmup_epochs": "-1", "sched.warmup_lr": "-1",
    "sched.min_lr": "-0.1", "sched.decay_epochs": "[0,5]", "sched.decay_rate": "0", "trainer.epochs": "-1",
    "trainer.device": "tpu", "trainer.amp": "fp8", "trainer.ema_decay": "1.5", "trainer.log_interval": "0",
    "trainer.attention_maps": "-2", "trainer.checkpoint_every_steps": "0", "trainer.dist_timeout_s": "0",
    "trainer.on_nonfinite": "ignore", "data.randaugment": "autoaugment", "model.norm": "layer", "model.stem": "tiny",
    "attention.reduction": "0", "attention.every": "0",
    "attention.divisor": "-8", "attention.bias": "maybe", "data.remode": "fill", "data.color_jitter": "-0.1",
    "sched.cooldown_epochs": "-1", "data.val_split": "-1", "trainer.stop_after_epochs": "0",
    "data.protocol": "both",
}
# Bad values that need a second override: a backbone that has the key, or a value they conflict with.
BAD_PAIRS = {"model.width_mult": ("model=mobilenetv2", "model.width_mult=0"),
             "model.drop_path_rate": ("model=volo_d1", "model.drop_path_rate=2"),
             "attention.kernel_size": ("attention=cbam", "attention.kernel_size=0"),
             "attention.heads": ("attention=mhsa", "attention.heads=0"),
             "attention.gamma": ("attention=eca", "attention.gamma=0"),
             "attention.units": ("attention=nonlocal", "attention.every=1", "+attention.units=[0]"),
             "attention.by_stage.kernel_size": ("attention=eca", "+attention.by_stage={kernel_size:[0,3,3]}"),
             "attention.scale": ("attention=nonlocal", "attention.scale=0"),
             "attention.init_std": ("attention=nonlocal", "attention.init_std=-1"),
             "sched.warmup_epochs": ("sched.warmup_epochs=20", "trainer.epochs=10"),
             "sched.cooldown_epochs": ("sched=step", "sched.cooldown_epochs=2"),
             "trainer.eval_only": ("trainer.eval_only=true",),
             "trainer.amp": ("trainer.amp=fp16", "trainer.device=cpu")}


def test_the_bad_value_table_covers_every_rule():
    assert set(RULES) <= set(BAD_VALUES)


def test_every_bad_value_is_one_line_from_train_py_before_anything_runs(tmp_path):
    """train.py with each bad value: exit status 1, one error line naming the key, the value and what is
    allowed, no traceback, no run started, and each in a few seconds (torch is never imported)."""
    import subprocess
    import sys
    import time

    from tests.helpers import ROOT

    def launch(key: str, overrides: tuple[str, ...]) -> tuple[subprocess.Popen, float]:
        cmd = [sys.executable, str(ROOT / "train.py"), *overrides, f"hydra.run.dir={tmp_path / key}"]
        return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), \
            time.monotonic()

    cases = {key: (f"{key}={value}",) for key, value in BAD_VALUES.items()}
    cases.update({f"{key}.pair": overrides for key, overrides in BAD_PAIRS.items()})
    pending, results = list(cases.items()), {}
    while pending:  # three at a time
        batch, pending = pending[:3], pending[3:]
        running = {key: launch(key, value) for key, value in batch}
        for key, (proc, start) in running.items():
            output = proc.communicate(timeout=60)[0]
            results[key] = (proc.returncode, output, time.monotonic() - start)
    for key, (returncode, output, seconds) in results.items():
        errors = [line for line in output.splitlines() if "error" in line.lower()]
        assert returncode == 1 and "Traceback" not in output, (key, output)
        named = key.removesuffix(".pair")
        assert len(errors) == 1 and f"error: {named}=" in errors[0], (key, output)
        if key in RULES:  # the allowed values as the rule words them
            assert errors[0].endswith(f"is not allowed: use {RULES[key].allowed}"), (key, errors[0])
        else:
            assert "is not allowed: use" in errors[0] or "do not go together: use" in errors[0], (key, errors[0])
        metrics = json.loads((tmp_path / key / "metrics.json").read_text())
        assert metrics["status"] == "failed" and "checkpoints" not in {p.name for p in (tmp_path / key).iterdir()}
        assert seconds < 10, (key, seconds)  # about 0.7 s on an idle 2-core machine


def test_a_bad_value_in_a_sweep_fails_that_job_and_the_sweep_goes_on(tmp_path):
    from tests.helpers import read_metrics, run_cli

    sweep = run_cli("-m", "data.batch_size=0,-4", f"hydra.sweep.dir={tmp_path}")
    assert sweep.returncode == 0, sweep.stderr
    assert (sweep.stdout + sweep.stderr).count("is not allowed: use an integer >= 1") == 2
    statuses = [read_metrics(run)["status"] for run in sorted(p for p in tmp_path.iterdir() if p.is_dir())]
    assert statuses == ["failed", "failed"]


def test_models_and_blocks_refuse_their_own_arguments_named_by_the_config_key():
    """The modules raise plain ValueErrors about their arguments; build_model names the config key."""
    with pytest.raises(ValueError, match=r"^reduction=0 must be an integer >= 1$"):
        SqueezeExcite(64, reduction=0)
    with pytest.raises(ConfigError, match=r"^attention_extra\[0\]\.heads=0 must be an integer >= 1$"):
        build_model({"name": "resnet20"}, {"name": "none"}, [{"name": "mhsa", "heads": 0, "stages": [3]}], 10)
    with pytest.raises(ConfigError, match=r"^model\.norm='layer' is not valid; use one of batch, group$"):
        build_model({"name": "resnet20", "norm": "layer"}, {"name": "none"}, num_classes=10)
    with pytest.raises(ConfigError, match=r"^model\.img_size=33 must be a multiple of 4 for the cifar stem$"):
        build_model({"name": "volo_d1", "stem": "cifar", "img_size": 33}, {"name": "none"}, num_classes=10)


def test_the_schemas_allowed_names_are_the_ones_the_code_accepts():
    import data
    import engine.optim
    import engine.trainer
    from data.in_memory import in_memory_setting

    assert set(config.DATASETS) == set(data.DATASETS)
    # stems, norms and the in-memory choices are defined once (choices.py): the code builds or takes each
    for stem in config.STEMS:
        for norm in config.NORMS:
            with meta_device():
                build_model({"name": "resnet20", "stem": stem, "norm": norm}, {"name": "none"}, num_classes=10)
    assert [in_memory_setting(choice) for choice in config.IN_MEMORY_CHOICES] == list(config.IN_MEMORY_CHOICES)
    assert set(config.SCHEDULES) == set(engine.optim.SCHEDULES)
    assert set(config.AMP_MODES) == set(engine.trainer.AMP_DTYPES)
