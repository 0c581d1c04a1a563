"""model.pretrained: torchvision's and timm's state dicts (random weights saved to files: no download) and timm
names through a local Hugging Face cache, loaded into backbones with and without attention blocks."""
import logging

import pytest
import timm
import torch
import torchvision

from engine.run import train
from models import ConfigError, build_model
from tests.helpers import compose_config

SOURCES = {  # (our backbone, the source model, input side)
    "torchvision resnet50": ("resnet50", lambda: torchvision.models.resnet50(), 64),
    "timm resnet50": ("resnet50", lambda: timm.create_model("resnet50"), 64),
    "torchvision mobilenet_v2": ("mobilenetv2", lambda: torchvision.models.mobilenet_v2(), 64),
    "timm mobilenetv2_100": ("mobilenetv2", lambda: timm.create_model("mobilenetv2_100"), 64),
    "torchvision densenet121": ("densenet121", lambda: torchvision.models.densenet121(), 64),
    "timm densenet121": ("densenet121", lambda: timm.create_model("densenet121"), 64),
    "timm volo_d1_224": ("volo_d1", lambda: timm.create_model("volo_d1_224"), 224),
}


def saved(model: torch.nn.Module, path) -> str:
    """``model``'s state dict in a file, with its BN statistics randomised so that they show when lost."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    torch.save(model.state_dict(), path)
    return str(path)


@pytest.mark.parametrize("attention", ["none", "gc"])  # GC starts as the identity (its last conv is zero)
@pytest.mark.parametrize("source", sorted(SOURCES))
def test_pretrained_weights_give_the_source_models_logits(source, attention, tmp_path):
    backbone, make, side = SOURCES[source]
    torch.manual_seed(0)
    theirs = make().eval()
    path = saved(theirs, tmp_path / "weights.pth")
    ours = build_model({"name": backbone, "pretrained": path}, {"name": attention}, num_classes=1000).eval()
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-4)


def test_another_class_count_keeps_a_fresh_classifier_and_the_rest(tmp_path, caplog):
    theirs = torchvision.models.resnet50().eval()
    path = saved(theirs, tmp_path / "r50.pth")
    with caplog.at_level(logging.INFO, logger="models"):
        ours = build_model({"name": "resnet50", "pretrained": path}, {"name": "se"}, num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        features = theirs.avgpool(theirs.layer4(theirs.layer3(theirs.layer2(theirs.layer1(
            theirs.maxpool(theirs.relu(theirs.bn1(theirs.conv1(x)))))))))
    plain = build_model({"name": "resnet50", "pretrained": path}, {"name": "none"}, num_classes=10).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain.forward_head(plain.forward_features(x), pre_logits=True), features.flatten(1))
    assert ours.fc.out_features == 10
    n_se = sum(1 for k in ours.state_dict() if ".attn_" in k)
    line = next(r.getMessage() for r in caplog.records if "tensors loaded" in r.getMessage())
    total = len(theirs.state_dict())
    assert line.startswith(f"model.pretrained={path}: {total - 2} tensors loaded, {n_se + 2} new")
    assert "2 skipped (fc.weight, fc.bias)" in line


def test_another_architectures_file_is_one_line_naming_what_loads(tmp_path):
    path = saved(torchvision.models.mobilenet_v2(), tmp_path / "mbv2.pth")
    with pytest.raises(ConfigError) as e:
        build_model({"name": "resnet50", "pretrained": path}, {"name": "none"})
    message = str(e.value)
    assert "\n" not in message and "another architecture than model.name=resnet50" in message
    assert "conv1.weight: expected (64, 3, 7, 7), found absent" in message and "torchvision `resnet50`" in message
    for bad, says in [(tmp_path / "missing.pth", "no such file"), ("no_such_timm_model", "neither a file nor a timm")]:
        with pytest.raises(ConfigError, match=says):
            build_model({"name": "resnet50", "pretrained": str(bad)}, {"name": "none"})


def fake_hub_cache(root, name: str, model: torch.nn.Module) -> None:
    """``model``'s weights as the Hugging Face cache holds a download of ``timm/<name>``."""
    from safetensors.torch import save_file

    repo = root / f"models--timm--{name}"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    save_file(model.state_dict(), str(snapshot / "model.safetensors"))


def test_a_timm_name_loads_from_the_local_cache_offline_and_else_fails_in_one_line(tmp_path, monkeypatch):
    from huggingface_hub import constants

    import models.pretrained

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(models.pretrained, "_reachable", lambda host, timeout_s=3.0: False)
    theirs = timm.create_model("resnet18").eval()
    fake_hub_cache(tmp_path, "resnet18.a1_in1k", theirs)
    ours = build_model({"name": "resnet18", "pretrained": "resnet18.a1_in1k"}, {"name": "none"}).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x))
    with pytest.raises(ConfigError, match=r"not in the local Hugging Face cache .* cannot be reached"):
        build_model({"name": "resnet50", "pretrained": "resnet50.a1_in1k"}, {"name": "none"})


def test_train_loads_pretrained_weights_and_init_from_wins(quick_config, tmp_path, caplog):
    """Precedence: resume > trainer.init_from > model.pretrained."""
    source = build_model({"name": "resnet20"}, {"name": "none"}, num_classes=10)
    path = saved(source, tmp_path / "r20.pth")
    overrides = ("model=resnet20", "attention=none", "trainer.epochs=1", "data.max_train_samples=32", "data.max_val_samples=16",
                 "sched=step")  # a step schedule may be extended on resume
    with caplog.at_level(logging.INFO):
        train(quick_config(*overrides, f"model.pretrained={path}"), tmp_path / "first")
    loaded = f"model.pretrained={path}: {len(source.state_dict())} tensors loaded, 0 new, 0 skipped"
    assert any(r.getMessage() == loaded for r in caplog.records)
    checkpoint = tmp_path / "first" / "checkpoints" / "last.pt"
    caplog.clear()
    with caplog.at_level(logging.INFO):  # a pretrained source that does not exist is not read at all
        metrics = train(quick_config(*overrides, "model.pretrained=/nowhere/weights.pth",
                                     f"trainer.init_from={checkpoint}"), tmp_path / "second")
    assert metrics["status"] == "completed"
    assert any("not loaded: the resumed or trainer.init_from weights replace it" in r.getMessage()
               for r in caplog.records)
    resumed = train(quick_config(*overrides, "trainer.epochs=2", "model.pretrained=/nowhere/weights.pth"),
                    tmp_path / "first")  # a resume of the first run: its last.pt wins, the source is not read
    assert resumed["status"] == "completed" and resumed["epoch"] == 2


def test_pretrained_must_be_a_path_or_a_name():
    from engine.config import check_config

    with pytest.raises(ConfigError, match=r"model.pretrained=5 is not allowed: use a state-dict file, a timm model"):
        check_config(compose_config("model.pretrained=5"))
