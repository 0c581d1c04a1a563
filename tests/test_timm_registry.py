"""attnlab's backbones in timm's registry: ``timm.create_model`` builds what the config builds, with the input
``resolve_data_config`` needs, timm's keywords, and attnlab checkpoints."""
import pytest
import timm
import torch
from timm.data import resolve_data_config

from engine.checkpoint import save_checkpoint
from engine.config import plain_config
from models import build_model, model_from_checkpoint
from models.timm_models import MODELS, PRETRAINED
from tests.helpers import compose_config, meta_device


def built_by_config(*overrides: str) -> torch.nn.Module:
    """The model ``train.py *overrides`` builds."""
    cfg = compose_config(*overrides)
    return build_model(cfg.model, cfg.attention, cfg.attention_extra, cfg.data.num_classes, cfg.data.image_size)


def layout(model: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """Every state-dict tensor's name and shape."""
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


def test_every_backbone_is_in_timms_registry():
    assert set(timm.list_models("attnlab_*")) == set(MODELS)
    assert {config for config, _, _ in MODELS.values()} >= {"resnet50", "mobilenetv2", "mobilenext", "volo_d1",
                                                            "densenet121", "attention56"}


@pytest.mark.parametrize("timm_name,overrides", [
    ("attnlab_resnet50", ("model=resnet50", "attention=cbam", "data=imagenet")),
    ("attnlab_mobilenetv2_100", ("model=mobilenetv2", "attention=coord", "data=imagenet")),
    ("attnlab_volo_d1", ("model=volo_d1", "attention=none", "data=imagenet")),
    ("attnlab_attention56", ("model=attention56", "attention=se", "data=imagenet")),
], ids=lambda v: v if isinstance(v, str) else "")
def test_create_model_builds_what_the_config_builds(timm_name, overrides):
    attention = next(o.split("=")[1] for o in overrides if o.startswith("attention="))
    with meta_device():
        ours, theirs = built_by_config(*overrides), timm.create_model(timm_name, attention=attention)
    assert layout(theirs) == layout(ours)


def test_the_same_seed_gives_the_same_weights_and_outputs_as_the_config():
    torch.manual_seed(0)
    ours = built_by_config("model=resnet20", "attention=se", "data=cifar10", "data.root=unused").eval()
    torch.manual_seed(0)
    theirs = timm.create_model("attnlab_resnet20", attention="se", num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(theirs(x), ours(x), rtol=0, atol=0)


def test_a_spec_or_a_list_of_specs_as_the_config_takes_them():
    model = timm.create_model("attnlab_resnet20", attention=[{"name": "se", "reduction": 8},
                                                             {"name": "nonlocal", "stages": [-1]}])
    assert model.layer1[0].attn_standard.fc1.out_channels == 16 // 8
    non_local = [name for name, m in model.named_modules() if type(m).__name__ == "NonLocal"]
    assert non_local and all(name.startswith("layer3.") for name in non_local)  # the yaml's every: 2, stage -1
    with pytest.raises(ValueError, match="attention=.*is not one of"):
        timm.create_model("attnlab_resnet20", attention="squeeze")


def test_resolve_data_config_reads_the_input_each_network_was_built_for():
    imagenet = resolve_data_config({}, model=timm.create_model("attnlab_mobilenetv2_35"))
    assert imagenet["input_size"] == (3, 224, 224) and imagenet["crop_pct"] == 0.875
    cifar_cfg = compose_config("data=cifar10", "data.root=unused").data
    cifar = resolve_data_config({}, model=timm.create_model("attnlab_resnet56"))
    assert cifar["input_size"] == (3, 32, 32)
    assert cifar["mean"] == pytest.approx(tuple(cifar_cfg.mean)) and cifar["std"] == pytest.approx(tuple(cifar_cfg.std))
    overlaid = timm.create_model("attnlab_resnet20", pretrained_cfg_overlay={"input_size": (3, 40, 40)})
    assert resolve_data_config({}, model=overlaid)["input_size"] == (3, 40, 40)


def test_timms_keywords_reach_the_backbones_options_or_are_refused():
    model = timm.create_model("attnlab_mobilenetv2_100", drop_rate=0.3, in_chans=1, num_classes=5)
    assert model.dropout.p == 0.3 and model.stem[0].in_channels == 1 and model.fc.out_features == 5
    assert timm.create_model("attnlab_volo_d1", drop_path_rate=0.2, img_size=64, num_classes=3)(
        torch.randn(1, 3, 64, 64)).shape == (1, 3)
    with pytest.raises(ValueError, match="takes no drop_path_rate"):
        timm.create_model("attnlab_resnet20", drop_path_rate=0.1)
    with pytest.raises(ValueError, match="global_pool='max'"):
        timm.create_model("attnlab_resnet20", global_pool="max")


def test_pretrained_means_timms_weights_of_the_same_architecture_where_there_are_any():
    assert all(timm.is_model(name.split(".")[0]) and name in timm.list_pretrained(name) for name in PRETRAINED.values())
    with pytest.raises(ValueError, match="no published ImageNet weights.*checkpoint_path"):
        timm.create_model("attnlab_resnet20", pretrained=True)


def test_an_attnlab_checkpoint_loads_through_timm_and_as_the_model_it_was_trained_as(tmp_path):
    cfg = compose_config("model=resnet20", "attention=eca", "data=cifar10", "data.root=unused", "trainer.ema=true")
    torch.manual_seed(1)
    trained = build_model(cfg.model, cfg.attention, cfg.attention_extra, 10, 32).eval()
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in trained.state_dict().items()}
    path = tmp_path / "last.pt"
    save_checkpoint({"model": trained.state_dict(), "ema": ema, "epoch": 3, "config": plain_config(cfg)}, path)
    x = torch.randn(2, 3, 32, 32)
    through_timm = timm.create_model("attnlab_resnet20", attention="eca", num_classes=10, checkpoint_path=str(path))
    torch.testing.assert_close(through_timm.eval()(x), trained(x))
    torch.testing.assert_close(model_from_checkpoint(path)(x), trained(x))
    assert torch.equal(model_from_checkpoint(path, ema=True).state_dict()["fc.bias"], ema["fc.bias"])


def test_features_only_gives_each_stage_map_with_its_channels_and_reduction_and_freezes_on_request():
    features = timm.create_model("attnlab_resnet50", attention="se", features_only=True, out_indices=(1, 2, 3),
                                 frozen_stages=1, norm_eval=True)
    assert features.feature_info.channels() == [512, 1024, 2048] and features.feature_info.reduction() == [8, 16, 32]
    maps = features(torch.randn(1, 3, 96, 128))
    assert [tuple(m.shape) for m in maps] == [(1, 512, 12, 16), (1, 1024, 6, 8), (1, 2048, 3, 4)]
    features.train()
    body = features.model
    assert not body.conv1.weight.requires_grad and not body.layer1[0].conv1.weight.requires_grad
    assert body.layer2[0].conv1.weight.requires_grad and not body.layer2[0].bn1.training  # norm_eval
    stn = timm.create_model("attnlab_resnet20", attention="stn", features_only=True)
    assert type(stn.model.attn_input).__name__ == "SpatialTransformer"  # runs: the wrapper calls forward_intermediates
    torch.testing.assert_close(stn.eval()(torch.ones(1, 3, 32, 32))[-1],
                               stn.model.forward_intermediates(torch.ones(1, 3, 32, 32), intermediates_only=True)[-1])


class FpnBackbone(torch.nn.Module):
    """An attnlab features_only model under torchvision's FeaturePyramidNetwork, as detectors take one."""

    def __init__(self, features: torch.nn.Module, width: int = 64):
        super().__init__()
        from torchvision.ops import FeaturePyramidNetwork
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

        self.body, self.out_channels = features, width
        self.fpn = FeaturePyramidNetwork(features.feature_info.channels(), width, extra_blocks=LastLevelMaxPool())

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: (B, 3, H, W) -> the pyramid's maps by level name."""
        return self.fpn({str(i): m for i, m in enumerate(self.body(x))})


@pytest.mark.slow
def test_se_resnet50_features_train_and_evaluate_a_faster_rcnn():
    from torchvision.models.detection import FasterRCNN

    torch.manual_seed(0)
    features = timm.create_model("attnlab_resnet50", attention="se", features_only=True, frozen_stages=1, norm_eval=True)
    detector = FasterRCNN(FpnBackbone(features), num_classes=3, min_size=128, max_size=128)
    images = [torch.rand(3, 128, 128), torch.rand(3, 112, 128)]
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 60.0, 90.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[30.0, 5.0, 100.0, 70.0], [0.0, 0.0, 40.0, 40.0]]), "labels": torch.tensor([2, 1])}]
    losses = detector.train()(images, targets)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    se = features.model.layer3[0].attn_standard
    assert se.fc1.weight.grad is not None and features.model.conv1.weight.grad is None  # frozen stem
    detections = detector.eval()(images)
    assert len(detections) == 2 and {"boxes", "labels", "scores"} <= set(detections[0])


def test_cbam_resnet50_features_feed_a_segmentation_head_and_backpropagate():
    torch.manual_seed(0)
    features = timm.create_model("attnlab_resnet50", attention="cbam", features_only=True)
    backbone = FpnBackbone(features, width=32)
    head = torch.nn.Conv2d(32, 5, 1)
    x = torch.rand(2, 3, 64, 64)
    finest = backbone(x)["0"]  # stride 4
    logits = torch.nn.functional.interpolate(head(finest), size=x.shape[2:], mode="bilinear", align_corners=False)
    torch.nn.functional.cross_entropy(logits, torch.randint(0, 5, (2, 64, 64))).backward()
    cbam = features.model.layer4[0].attn_standard
    # the spatial gate's BN scale starts at 0 (the official init): its conv learns once that scale moves
    assert cbam.channel.fc1.weight.grad.abs().sum() > 0 and cbam.spatial.bn.weight.grad.abs().sum() > 0
