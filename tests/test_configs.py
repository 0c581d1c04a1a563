"""Config composition: every group option composes and builds; typos are errors, not ignored keys."""
import shutil
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from engine.complexity import count_params
from models import ConfigError, build_model
from models.attention import SqueezeExcite
from tests.helpers import CONFIG_DIR, compose_config, meta_device

GROUPS = ["model", "attention", "data", "optim", "sched", "trainer"]


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
    chosen = {k: v for k, v in own.items() if k != "defaults" and k not in overridden
              and not (isinstance(v, str) and ("${" in v or v == "???"))}
    assert chosen and {k: cfg[group][k] for k in chosen} == chosen


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
    with pytest.raises(ConfigError, match="unknown key\\(s\\) ratio; valid keys: name, stages, position, every, reduction, bias, squeeze, gate, divisor"):
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
    assert count_params(net) > 0 and cfg.trainer.epochs >= 90  # a full paper schedule, not a smoke test
