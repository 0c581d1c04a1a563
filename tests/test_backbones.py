"""Backbones: torchvision parity, the paper's sizes, every attention position, placement rules."""
import pytest
import torch
import torchvision
from torch import nn

import models.placement
from engine.complexity import count_macs, count_params
from models import ConfigError, build_model
from models.attention import SqueezeExcite
from models.backbones.resnet import BasicBlock, Bottleneck

IMAGENET = {"stem": "imagenet"}


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"])
def test_imagenet_resnet_has_torchvision_parameter_count(name):
    ours = build_model({"name": name, **IMAGENET}, {"name": "none"})
    assert count_params(ours) == count_params(getattr(torchvision.models, name)())


def test_resnet50_is_torchvision_resnet50():
    ours = build_model({"name": "resnet50", **IMAGENET}, {"name": "none"}).eval()
    theirs = torchvision.models.resnet50().eval()
    assert count_params(ours) == 25_557_032
    ours.load_state_dict(theirs.state_dict())  # strict: same names and shapes
    x = torch.randn(2, 3, 96, 80)
    torch.testing.assert_close(ours(x), theirs(x))


# He et al. 2016, Table 6 (CIFAR-10): parameters in millions, as printed.
@pytest.mark.parametrize("name,millions", [
    ("resnet20", 0.27), ("resnet32", 0.46), ("resnet44", 0.66), ("resnet56", 0.85), ("resnet110", 1.7),
])
def test_cifar_resnet_sizes_match_the_paper(name, millions):
    model = build_model({"name": name}, {"name": "none"}, num_classes=10)
    digits = 1 if millions >= 1 else 2
    assert round(count_params(model) / 1e6, digits) == millions
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_resnet50_macs_follow_the_stride_convention():
    """torchvision's ResNet-50 is 4.09 GMACs; the original (stride in the 1x1) is the SE paper's 3.86."""
    v15 = build_model({"name": "resnet50", **IMAGENET}, {"name": "none"})
    v1 = build_model({"name": "resnet50", **IMAGENET, "stride_in_1x1": True}, {"name": "none"})
    se = build_model({"name": "resnet50", **IMAGENET, "stride_in_1x1": True}, {"name": "se"})
    assert round(count_macs(v15, (3, 224, 224)) / 1e9, 3) == 4.089
    assert round(count_macs(v1, (3, 224, 224)) / 1e9, 3) == 3.858
    # SE adds its two FC layers' MACs; the SE paper's 3.87 GFLOPs also counts pooling and rescaling.
    fc_macs = sum(2 * m.fc1.in_channels * m.fc1.out_channels for m in se.modules() if isinstance(m, SqueezeExcite))
    assert count_macs(se, (3, 224, 224)) - count_macs(v1, (3, 224, 224)) == fc_macs


def test_cifar_stem_keeps_32x32_inputs_at_4x4_in_the_last_stage():
    model = build_model({"name": "resnet50", "stem": "cifar"}, {"name": "se"}, num_classes=10)
    assert model.forward_features(torch.randn(1, 3, 32, 32)).shape[-2:] == (4, 4)


class ProbeConv(nn.Module):
    """A stand-in for a replace_spatial block: a 3x3 conv with the same signature."""

    positions = frozenset({"replace_spatial"})
    default_position = "replace_spatial"

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, width: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)

    def forward(self, x):
        return self.conv(x)


# Channels each position sees in the first unit of stage 2 (a downsampling unit).
BASIC_CHANNELS = {"pre": 16, "after_spatial": 32, "standard": 32, "identity": 32, "post": 32}
BOTTLENECK_CHANNELS = {"pre": 256, "after_spatial": 128, "standard": 512, "identity": 512, "post": 512}


@pytest.mark.parametrize("model_cfg,expected", [
    ({"name": "resnet20"}, BASIC_CHANNELS),
    ({"name": "resnet50", "stem": "cifar"}, BOTTLENECK_CHANNELS),
])
@pytest.mark.parametrize("position", ["pre", "after_spatial", "standard", "identity", "post"])
def test_every_position_is_built_with_the_right_width_and_runs(model_cfg, expected, position):
    model = build_model(model_cfg, {"name": "se", "reduction": 4, "stages": [2], "position": position})
    unit = model.layer2[0]
    block = getattr(unit, f"attn_{position}")
    assert isinstance(block, SqueezeExcite) and block.fc1.in_channels == expected[position]
    calls = []
    block.register_forward_hook(lambda m, i, o: calls.append(o.shape))
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert len(calls) == 1
    others = [p for p in expected if p != position]
    assert all(isinstance(getattr(unit, f"attn_{p}"), nn.Identity) for p in others)
    assert sum(isinstance(m, SqueezeExcite) for m in model.modules()) == len(model.layer2)


@pytest.mark.parametrize("model_cfg,conv", [({"name": "resnet20"}, "conv1"), ({"name": "resnet50", "stem": "cifar"}, "conv2")])
def test_replace_spatial_swaps_the_3x3_and_keeps_the_stride(monkeypatch, model_cfg, conv):
    monkeypatch.setitem(models.placement.ATTENTION_BLOCKS, "probe", ProbeConv)
    model = build_model(model_cfg, {"name": "probe", "stages": [2], "width": 2}, num_classes=10)
    assert isinstance(getattr(model.layer2[0], conv), ProbeConv)
    assert getattr(model.layer2[0], conv).conv.stride == (2, 2)
    assert not isinstance(getattr(model.layer1[0], conv), ProbeConv)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_stem_position_places_one_block_after_the_stem():
    model = build_model({"name": "resnet20"}, {"name": "se", "reduction": 4, "position": "stem"})
    assert isinstance(model.attn_stem, SqueezeExcite) and model.attn_stem.fc1.in_channels == 16
    assert sum(isinstance(m, SqueezeExcite) for m in model.modules()) == 1


def test_stages_and_every_select_the_non_local_papers_five_units():
    """Stages 2-3 of ResNet-50 (4 and 6 units), every other unit: 2 + 3 = 5 blocks."""
    model = build_model({"name": "resnet50", **IMAGENET}, {"name": "se", "stages": [2, 3], "every": 2})
    chosen = [(s, i) for s, stage in enumerate([model.layer1, model.layer2, model.layer3, model.layer4], 1)
              for i, unit in enumerate(stage) if isinstance(unit.attn_standard, SqueezeExcite)]
    assert chosen == [(2, 1), (2, 3), (3, 1), (3, 3), (3, 5)]


def test_attention_extra_composes_in_order_at_one_position():
    model = build_model({"name": "resnet20"}, {"name": "se", "reduction": 4},
                        [{"name": "se", "reduction": 8, "stages": [3]}])
    assert isinstance(model.layer1[0].attn_standard, SqueezeExcite)
    pair = model.layer3[0].attn_standard
    assert isinstance(pair, nn.Sequential) and [m.fc1.out_channels for m in pair] == [64 // 4, 64 // 8]


def test_zero_init_residual_zeroes_the_last_norm_of_each_branch():
    model = build_model({"name": "resnet50", **IMAGENET, "zero_init_residual": True}, {"name": "none"})
    assert all(m.bn3.weight.abs().sum() == 0 for m in model.modules() if isinstance(m, Bottleneck))
    model = build_model({"name": "resnet20", "zero_init_residual": True}, {"name": "none"})
    assert all(m.bn2.weight.abs().sum() == 0 for m in model.modules() if isinstance(m, BasicBlock))


@pytest.mark.parametrize("model_cfg,attention,message", [
    ({"name": "resnet20"}, {"name": "cbamm"}, "unknown attention block 'cbamm'; valid names: none, se"),
    ({"name": "resnet20"}, {"name": "se", "reductio": 8}, "unknown key(s) reductio; valid keys: name, stages, position, every, reduction, bias, squeeze, gate, divisor"),
    ({"name": "resnet20"}, {"name": "se", "stages": [4]}, "resnet20 has no stage 4; valid stages: 1..3, -3..-1"),
    ({"name": "resnet20"}, {"name": "se", "position": "replace_spatial"}, "cannot go at position 'replace_spatial'"),
    ({"name": "resnet20"}, {"name": "se", "position": "middle"}, "unknown position 'middle'; valid positions: default, standard"),
    ({"name": "resnet20"}, {"name": "se", "every": 0}, "every=0 must be an integer >= 1"),
    ({"name": "resnet20"}, {"name": "se", "stages": "two"}, "stages='two' must be 'all' or a list"),
    ({"name": "resnet99"}, {"name": "none"}, "unknown backbone 'resnet99'; valid names: resnet18"),
    ({"name": "resnet20", "stride_in_1x1": True}, {"name": "none"}, "unknown key(s) stride_in_1x1"),
    ({"name": "resnet50", "stem": "tiny"}, {"name": "none"}, "model.stem='tiny' is not a stem; valid stems: cifar, imagenet"),
])
def test_bad_model_or_attention_config_names_the_fix(model_cfg, attention, message):
    with pytest.raises(ConfigError) as info:
        build_model(model_cfg, attention, num_classes=10)
    assert message in str(info.value)


# --- every block at every position it takes, on both unit types ------------------------------------

from models.attention import ATTENTION_BLOCKS  # noqa: E402
from models.backbones.resnet import ResNet  # noqa: E402
from models.placement import parse_attention_specs  # noqa: E402

ROLE_POSITIONS = ["standard", "pre", "post", "identity", "after_spatial", "replace_spatial", "stem"]
COMBOS = [(name, pos) for name, cls in sorted(ATTENTION_BLOCKS.items()) for pos in ROLE_POSITIONS
          if pos in cls.positions]


@pytest.mark.parametrize("unit", [BasicBlock, Bottleneck])
@pytest.mark.parametrize("name,position", COMBOS)
def test_every_block_at_every_position_it_takes(unit, name, position):
    """A small two-stage ResNet of each unit type: the same units as the full networks, cheaper."""
    specs = parse_attention_specs({"name": name, "stages": [-1], "position": position})
    model = ResNet(unit, (1, 2), widths=(16, 32), num_classes=10, attention=specs, stem="cifar")
    block_type = ATTENTION_BLOCKS[name]
    assert sum(isinstance(m, block_type) for m in model.modules()) == (1 if position == "stem" else 2)
    x = torch.randn(2, 3, 16, 16)
    out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.sum().backward()


@pytest.mark.parametrize("name", sorted(ATTENTION_BLOCKS))
def test_a_position_the_block_does_not_take_is_refused_with_the_valid_ones(name):
    cls = ATTENTION_BLOCKS[name]
    refused = next(p for p in ROLE_POSITIONS if p not in cls.positions)
    with pytest.raises(ConfigError, match=f"cannot go at position '{refused}'.*valid positions: "):
        build_model({"name": "resnet20"}, {"name": name, "position": refused})


# --- MobileNetV2 -----------------------------------------------------------------------------------

from models.attention import CoordAttention  # noqa: E402
from models.backbones.mobilenetv2 import InvertedResidual  # noqa: E402


@pytest.mark.parametrize("width", [1.4, 1.0, 0.75, 0.5, 0.35])
def test_mobilenetv2_has_torchvisions_parameter_count_at_every_width(width):
    ours = build_model({"name": "mobilenetv2", "width_mult": width}, {"name": "none"})
    assert count_params(ours) == count_params(torchvision.models.mobilenet_v2(width_mult=width))
    if width == 1.0:
        assert count_params(ours) == 3_504_872


def test_mobilenetv2_default_attention_goes_after_the_depthwise_conv_of_expanding_units():
    model = build_model({"name": "mobilenetv2", "stem": "cifar"}, {"name": "coord"}, num_classes=10)
    units = [u for stage in model.stages for u in stage]
    placed = [isinstance(u.attn_after_spatial, CoordAttention) for u in units]
    assert placed == [False] + [True] * (len(units) - 1)  # the t = 1 unit has none
    assert model.forward_features(torch.randn(2, 3, 32, 32)).shape[-2:] == (4, 4)
    explicit = build_model({"name": "mobilenetv2"}, {"name": "coord", "position": "after_spatial"})
    assert isinstance(explicit.stages[0][0].attn_after_spatial, CoordAttention)  # asked for: placed


@pytest.mark.parametrize("name,position", [("se", "standard"), ("se", "pre"), ("cbam", "post"), ("eca", "identity"),
                                           ("mhsa", "replace_spatial"), ("stn", "stem"), ("gc", "after_spatial")])
def test_mobilenetv2_takes_attention_at_every_position(name, position):
    model = build_model({"name": "mobilenetv2", "stem": "cifar", "width_mult": 0.5},
                        {"name": name, "position": position, "stages": [-2, -1]}, num_classes=10)
    assert any(isinstance(m, ATTENTION_BLOCKS[name]) for m in model.modules())
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.sum().backward()
    if position in ("identity", "post"):  # only units with a shortcut have them
        for unit in (u for s in model.stages for u in s if not u.use_shortcut):
            assert isinstance(getattr(unit, f"attn_{position}"), nn.Identity)
