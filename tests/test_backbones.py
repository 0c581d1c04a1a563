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
from tests.helpers import meta_device

IMAGENET = {"stem": "imagenet"}


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"])
def test_imagenet_resnet_has_torchvision_parameter_count(name):
    with meta_device():  # shapes only: no initialisation of ResNet-152's 60M weights
        ours = build_model({"name": name, **IMAGENET}, {"name": "none"})
        theirs = getattr(torchvision.models, name)()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


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


@pytest.mark.parametrize("name,groups", [("resnet20", 16), ("resnet50", 32)])
def test_group_norm_resnet_has_no_batch_statistics(name, groups):
    model = build_model({"name": name, "norm": "group"}, {"name": "se"}, num_classes=10).train()
    norms = [m for m in model.modules() if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm))]
    assert norms and all(isinstance(m, nn.GroupNorm) for m in norms)
    assert min(m.num_groups for m in norms) == groups  # gcd(32, 16) on the CIFAR net's first stage
    # same affine parameters as BatchNorm, so the two differ only in what they normalise over
    assert count_params(model) == count_params(build_model({"name": name}, {"name": "se"}, num_classes=10))
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(model(x)[1:2], model(x[1:2]))  # a sample's output ignores the rest of its batch


@pytest.mark.parametrize("model_cfg,attention,message", [
    ({"name": "resnet20"}, {"name": "cbamm"}, "unknown attention block 'cbamm'; valid names: none, se"),
    ({"name": "resnet20"}, {"name": "se", "reductio": 8}, "unknown key(s) reductio; valid keys: name, stages, position, every, units, by_stage, reduction, bias, squeeze, gate, divisor"),
    ({"name": "resnet20"}, {"name": "se", "units": [4]}, "attention.units=[4] is not allowed: stage 1 of resnet20 has no unit 4; valid units there: 1..3"),
    ({"name": "resnet20"}, {"name": "se", "units": [1], "every": 2}, "attention.units=[1] is not allowed with every=2"),
    ({"name": "resnet20"}, {"name": "eca", "by_stage": {"kernel_size": [3, 5]}}, "attention.by_stage.kernel_size=[3,5] is not allowed: resnet20 has 3 stages; give one value per stage"),
    ({"name": "resnet20"}, {"name": "eca", "by_stage": {"kernel": [3, 5, 7]}}, "unknown key(s) kernel; valid keys"),
    ({"name": "resnet20"}, {"name": "se", "stages": [4]}, "resnet20 has no stage 4; valid stages: 1..3, -3..-1"),
    ({"name": "resnet20"}, {"name": "se", "position": "replace_spatial"}, "cannot go at position 'replace_spatial'"),
    ({"name": "resnet20"}, {"name": "se", "position": "middle"}, "unknown position 'middle'; valid positions: default, standard"),
    ({"name": "resnet20"}, {"name": "se", "every": 0}, "every=0 must be an integer >= 1"),
    ({"name": "resnet20"}, {"name": "se", "stages": "two"}, "stages='two' must be 'all' or a list"),
    ({"name": "resnet99"}, {"name": "none"}, "unknown backbone 'resnet99'; valid names: agcnn, densenet121, mobilenetv2"),
    ({"name": "resnet20", "stride_in_1x1": True}, {"name": "none"}, "unknown key(s) stride_in_1x1"),
    ({"name": "resnet50", "stem": "tiny"}, {"name": "none"}, "model.stem='tiny' is not a stem; valid stems: cifar, imagenet"),
    ({"name": "resnet20", "norm": "layer"}, {"name": "none"}, "model.norm='layer' is not valid; use one of batch, group"),
])
def test_bad_model_or_attention_config_names_the_fix(model_cfg, attention, message):
    with pytest.raises(ConfigError) as info:
        build_model(model_cfg, attention, num_classes=10)
    assert message in str(info.value)


# --- every block at every position it takes, on both unit types ------------------------------------

from models.attention import ATTENTION_BLOCKS  # noqa: E402
from models.backbones import SMALL_OPTIONS  # noqa: E402
from models.backbones.resnet import ResNet  # noqa: E402
from models.placement import POSITIONS, parse_attention_specs  # noqa: E402

COMBOS = [(name, pos) for name, cls in sorted(ATTENTION_BLOCKS.items()) for pos in POSITIONS if pos in cls.positions]


@pytest.mark.parametrize("unit", [BasicBlock, Bottleneck])
@pytest.mark.parametrize("name,position", COMBOS)
def test_every_block_at_every_position_it_takes(unit, name, position):
    """A small two-stage ResNet of each unit type: the same units as the full networks, cheaper."""
    specs = parse_attention_specs({"name": name, "stages": [-1], "position": position})
    model = ResNet(unit, (1, 2), widths=(16, 32), num_classes=10, attention=specs, stem="cifar")
    block_type = ATTENTION_BLOCKS[name]
    kinds = tuple(k for k in (block_type, block_type.head_class) if k is not None)
    found = [m for m in model.modules() if isinstance(m, kinds)]
    inside = {id(c) for m in found for c in m.modules() if c is not m}  # the RCCA head's own criss-cross module
    assert len([m for m in found if id(m) not in inside]) == (1 if position in models.placement.ONCE else 2)
    x = torch.randn(2, 3, 16, 16)
    out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.sum().backward()


@pytest.mark.parametrize("name", sorted(ATTENTION_BLOCKS))
def test_a_position_the_block_does_not_take_is_refused_with_the_valid_ones(name):
    cls = ATTENTION_BLOCKS[name]
    refused = next(p for p in POSITIONS if p not in cls.positions)
    with pytest.raises(ConfigError, match=f"cannot go at position '{refused}'.*valid positions: "):
        build_model({"name": "resnet20"}, {"name": name, "position": refused})


# --- MobileNetV2 -----------------------------------------------------------------------------------

from models.attention import CoordAttention  # noqa: E402


@pytest.mark.parametrize("width", [1.4, 1.0, 0.75, 0.5, 0.35])
def test_mobilenetv2_has_torchvisions_parameter_count_at_every_width(width):
    with meta_device():
        ours = build_model({"name": "mobilenetv2", "width_mult": width}, {"name": "none"})
        theirs = torchvision.models.mobilenet_v2(width_mult=width)
    assert count_params(ours) == count_params(theirs)
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
    if position == "identity":  # only units with a shortcut have one
        for unit in (u for s in model.stages for u in s if not u.use_shortcut):
            assert isinstance(unit.attn_identity, nn.Identity)
    if position == "post":  # every unit's output, with or without a shortcut
        assert all(isinstance(u.attn_post, ATTENTION_BLOCKS[name]) for s in model.stages[-2:] for u in s)


# --- MobileNeXt ------------------------------------------------------------------------------------

from timm.layers import make_divisible  # noqa: E402

from models.backbones.mobilenext import SandGlass  # noqa: E402


def official_mobilenext_params(width: float, num_classes: int = 1000) -> int:
    """Parameters counted layer by layer from the official code's rules, independently of our module."""
    rows = [(2, 96, 1, 2), (6, 144, 1, 1), (6, 192, 3, 2), (6, 288, 3, 2), (6, 384, 4, 1), (6, 576, 4, 2),
            (6, 960, 3, 1), (6, 1280 / width if width < 1 else 1280, 1, 1)]
    conv_bn = lambda cin, cout, k=1, groups=1: cin // groups * cout * k * k + 2 * cout  # noqa: E731
    c = make_divisible(32 * width, 8)
    total = conv_bn(3, c, 3)
    for t, out, b, s in rows:
        out = make_divisible(out * width, 8)
        for i in range(b):
            hidden = c // t if c // t >= out / 6 else make_divisible(-(-out // 6), 16)
            first = t == 2 or c == out or (b == 1 and s == 1 and i == 0)
            last = first or (s if i == 0 else 1) == 2
            total += (conv_bn(c, c, 3, c) if first else 0) + conv_bn(c, hidden) + conv_bn(hidden, out)
            total += conv_bn(out, out, 3, out) if last else 0
            c = out
    return total + c * num_classes + num_classes


@pytest.mark.parametrize("width", [1.4, 1.0, 0.75, 0.5, 0.35])
def test_mobilenext_parameters_follow_the_official_code_at_every_width(width):
    model = build_model({"name": "mobilenext", "width_mult": width}, {"name": "none"})
    assert count_params(model) == official_mobilenext_params(width)


def test_mobilenext_size_at_width_1_is_the_official_3_5m_and_311m():
    model = build_model({"name": "mobilenext"}, {"name": "none"})
    assert round(count_params(model) / 1e6, 1) == 3.5
    assert round(count_macs(model, (3, 224, 224)) / 1e6) == 311


def test_sandglass_structure_follows_the_official_rules():
    widen = SandGlass(96, 144, stride=1, expansion=6)  # changes width at stride 1: two 1x1 convs only
    assert isinstance(widen.dw1, nn.Identity) and isinstance(widen.dw2, nn.Identity) and not widen.use_shortcut
    down = SandGlass(144, 192, stride=2, expansion=6)  # strides: the last depthwise conv carries it
    assert isinstance(down.dw1, nn.Identity) and down.dw2[0].stride == (2, 2)
    same = SandGlass(192, 192, stride=1, expansion=6)
    assert same.use_shortcut and same.dw1[0].groups == 192 and same.reduce[0].out_channels == 32
    assert isinstance(same.dw1[2], nn.ReLU6) and len(same.dw2) == 2  # the last depthwise conv is linear


def test_identity_tensor_multiplier_adds_the_shortcut_to_the_first_channels_only():
    unit = SandGlass(32, 32, stride=1, expansion=2, identity_mult=0.5).eval()
    x = torch.randn(2, 32, 6, 6)
    branch = unit.dw2(unit.expand(unit.reduce(unit.dw1(x))))
    diff = unit(x) - branch
    torch.testing.assert_close(diff[:, :16], x[:, :16])
    assert diff[:, 16:].abs().max() == 0


def test_mobilenext_after_spatial_sits_after_the_first_depthwise_conv_else_after_the_last():
    model = build_model({"name": "mobilenext"}, {"name": "coord"})
    units = [u for stage in model.stages for u in stage]
    for unit in units:
        has_first = not isinstance(unit.dw1, nn.Identity)
        assert isinstance(unit.attn_after_spatial, CoordAttention) == has_first
        assert isinstance(unit.attn_after_last, CoordAttention) == (not has_first)
    assert sum(isinstance(m, CoordAttention) for m in model.modules()) == len(units)  # every unit has one


# --- VOLO ------------------------------------------------------------------------------------------

import timm  # noqa: E402

from models.backbones.volo import MIXERS, OutlookAttention  # noqa: E402


def test_volo_d1_state_dict_loads_into_timm_and_back_with_equal_logits():
    torch.manual_seed(0)
    ours = build_model({"name": "volo_d1"}, {"name": "none"}).eval()
    theirs = timm.create_model("volo_d1_224").eval()
    x = torch.randn(2, 3, 224, 224)
    ours.load_state_dict(theirs.state_dict())  # strict, timm -> ours
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-4)
    for p in ours.parameters():
        p.data.normal_(0, 0.02)
    theirs.load_state_dict(ours.state_dict())  # strict, ours -> timm
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", ["volo_d1", "volo_d2", "volo_d3", "volo_d4", "volo_d5"])
def test_volo_variants_have_timms_parameters_and_names(variant):
    with meta_device():
        ours = build_model({"name": variant}, {"name": "none"})
        theirs = timm.create_model(f"{variant}_224")
    assert count_params(ours) == count_params(theirs)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


@pytest.mark.parametrize("mixer", MIXERS)
def test_volo_stage1_mixer_is_pluggable(mixer):
    model = build_model({"name": "volo_d1", "stem": "cifar", "img_size": 32, "mixer": mixer}, {"name": "none"},
                        num_classes=10)
    mixers = [unit.attn for unit in model.network[0]]
    assert all(isinstance(m, OutlookAttention) == (mixer == "outlook") for m in mixers)
    out = model(torch.randn(2, 3, 32, 32))
    out.sum().backward()
    assert out.shape == (2, 10) and all(m.v.weight.grad is not None for m in mixers if hasattr(m, "v"))


def test_volo_stages_are_the_papers_four_with_the_cifar_token_grids():
    model = build_model({"name": "volo_d1", "stem": "cifar", "img_size": 32}, {"name": "se", "stages": [1, 4]},
                        num_classes=10)
    assert [len(s) for s in model.stages] == [4, 4, 8, 2]
    gated = [i for i, s in enumerate(model.stages, start=1) if any(isinstance(m, SqueezeExcite) for m in s.modules())]
    assert gated == [1, 4]
    tokens = model.forward_features(torch.randn(1, 3, 32, 32))
    assert model.feature_map(tokens).shape == (1, 384, 8, 8)  # 32 -> 16x16 tokens -> 8x8 after the downsample


def test_volo_resamples_its_position_embedding_for_another_input_size():
    model = build_model({"name": "volo_d1", "stem": "cifar", "img_size": 32}, {"name": "none"}, num_classes=10)
    assert model(torch.randn(1, 3, 48, 48)).shape == (1, 10)


def test_a_spec_that_places_no_block_is_an_error():
    """MobileNetV2's last row is one unit without a shortcut: nothing can go on its shortcut."""
    with pytest.raises(ConfigError, match="attention 'se'.*places no block on mobilenetv2"):
        build_model({"name": "mobilenetv2"}, {"name": "se", "stages": [-1], "position": "identity"})


def test_volo_refuses_a_position_it_lacks_and_an_unknown_mixer():
    with pytest.raises(ConfigError, match="cannot go at position 'identity' on volo_d1; valid positions: "):
        build_model({"name": "volo_d1"}, {"name": "se", "position": "identity"})
    with pytest.raises(ConfigError, match="valid mixers: outlook, local_sa, conv, mhsa"):
        build_model({"name": "volo_d1", "mixer": "swin"}, {"name": "none"})


# --- AG-CNN ----------------------------------------------------------------------------------------

from models.backbones.agcnn import attention_boxes, crop_and_resize  # noqa: E402


def test_attention_box_is_the_largest_region_above_tau():
    fmap = torch.zeros(2, 4, 8, 8)
    fmap[0, 1, 1:3, 5:8] = -5.0  # absolute activations count: a 2x3 region
    fmap[0, 2, 5:8, 0:4] = 4.0  # and a larger 3x4 region, slightly weaker but still above tau
    fmap[1] = 1.0  # flat: nothing above tau after normalising -> the whole image
    boxes = attention_boxes(fmap, (8, 8), tau=0.7)
    assert boxes.tolist() == [[0, 5, 4, 8], [0, 0, 8, 8]]


def test_attention_box_scales_the_heat_map_to_the_image():
    fmap = torch.zeros(1, 1, 4, 4)
    fmap[0, 0, 0, 0] = 1.0
    x0, y0, x1, y1 = attention_boxes(fmap, (32, 32), tau=0.7)[0].tolist()
    assert x0 == y0 == 0 and 0 < x1 < 16 and 0 < y1 < 16  # the top-left corner of the image


def test_crop_and_resize_takes_the_boxed_pixels():
    images = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).view(2, 3, 16, 16)
    boxes = torch.tensor([[4.0, 2.0, 12.0, 10.0], [0.0, 0.0, 8.0, 8.0]])
    crops = crop_and_resize(images, boxes, (8, 8))  # box size = output size: an exact copy
    torch.testing.assert_close(crops[0], images[0, :, 2:10, 4:12])
    torch.testing.assert_close(crops[1], images[1, :, 0:8, 0:8])
    assert crop_and_resize(images, boxes, (16, 16)).shape == (2, 3, 16, 16)


def test_agcnn_trains_in_three_stages():
    model = build_model({"name": "agcnn", "backbone": "resnet20", "stem": "cifar", "img_size": 32},
                        {"name": "se"}, num_classes=10)
    x = torch.randn(4, 3, 32, 32)
    parts = {"global": model.global_branch, "local": model.local_branch, "fusion": model.fusion}
    for epoch, stage in [(1, "global"), (2, "global"), (3, "local"), (4, "fusion")]:
        assert model.set_epoch(epoch, 4) == stage
        model.train()
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()
        for name, part in parts.items():
            assert any(p.grad is not None for p in part.parameters()) == (name == stage), (stage, name)
        assert model.global_branch.training == (stage == "global")  # a fixed branch keeps eval-mode norms
        assert model.local_branch.training == (stage == "local")


def test_agcnn_wraps_any_backbone_with_its_options():
    model = build_model({"name": "agcnn", "backbone": "mobilenetv2", "stem": "cifar",
                         "backbone_options": {"width_mult": 0.5}}, {"name": "coord"}, num_classes=10)
    assert model.global_branch.stem[0].out_channels == 16  # width 0.5
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ConfigError, match="resnet20 has no key.*width_mult.*valid keys: stem"):
        build_model({"name": "agcnn", "backbone": "resnet20", "backbone_options": {"width_mult": 2}}, {"name": "none"})
    with pytest.raises(ConfigError, match="model.backbone='vgg16' is not a backbone"):
        build_model({"name": "agcnn", "backbone": "vgg16"}, {"name": "none"})


# --- every backbone, one mechanism -----------------------------------------------------------------

@pytest.mark.parametrize("backbone", sorted(SMALL_OPTIONS))
@pytest.mark.parametrize("block", sorted(ATTENTION_BLOCKS))
def test_every_backbone_runs_every_block_at_its_default_position_at_32x32(backbone, block):
    """Every registered block on every backbone registered with small options, at their last-but-one stage."""
    model = build_model({"name": backbone, **SMALL_OPTIONS[backbone]}, {"name": block, "stages": [-2]},
                        num_classes=10)
    block_type = ATTENTION_BLOCKS[block]
    kinds = tuple(k for k in (block_type, block_type.head_class) if k is not None)  # at `head`: its paper's head
    model.set_epoch(1, 2)  # a model trained in phases (AG-CNN) trains only its first phase's part
    trained = [m for m in model.modules() if isinstance(m, kinds) and m.training]
    assert trained
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for m in trained for p in m.parameters())


@pytest.mark.parametrize("model_cfg,block", [
    ({"name": "mobilenetv2"}, "coord"), ({"name": "mobilenext"}, "se"), ({"name": "volo_d1"}, "eca"),
    ({"name": "agcnn", "backbone": "resnet18"}, "cbam"), ({"name": "resnet18"}, "gc"),
])
def test_every_backbone_runs_one_block_at_224x224(model_cfg, block):
    model = build_model(model_cfg, {"name": block}, num_classes=5)
    out = model(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 5) and torch.isfinite(out).all()
    out.sum().backward()


# --- DenseNet-121 ------------------------------------------------------------------------------------

def test_densenet121_is_torchvisions():
    ours = build_model({"name": "densenet121", **IMAGENET}, {"name": "none"}).eval()
    theirs = torchvision.models.densenet121().eval()
    assert count_params(ours) == count_params(theirs)
    ours.load_state_dict(theirs.state_dict())  # strict: torchvision's names and shapes
    x = torch.randn(2, 3, 64, 72)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x))


def test_densenet_positions_on_dense_layers_and_transitions():
    model = build_model({"name": "densenet121", "stem": "cifar"}, {"name": "se", "reduction": 4, "stages": [1]},
                        num_classes=10)
    layer, transition = model.features.denseblock1.denselayer1, model.features.transition1
    assert isinstance(layer.attn_standard, SqueezeExcite) and layer.attn_standard.fc1.in_channels == 32  # growth
    assert isinstance(transition.attn_standard, SqueezeExcite) and transition.attn_standard.fc1.in_channels == 128
    assert len(model.stages[0]) == 6 + 1 and model.forward_features(torch.randn(2, 3, 32, 32)).shape[-2:] == (4, 4)
    post = build_model({"name": "densenet121", "stem": "cifar"}, {"name": "se", "position": "post", "stages": [1],
                                                                 "units": [-1]}, num_classes=10)
    assert isinstance(post.features.transition1.attn_post, SqueezeExcite)  # the transition is the stage's last unit
    assert sum(isinstance(m, SqueezeExcite) for m in post.modules()) == 1


def test_agcnn_takes_densenet121_as_its_backbone():
    model = build_model({"name": "agcnn", "backbone": "densenet121", "stem": "cifar", "img_size": 32}, {"name": "se"},
                        num_classes=3)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    assert model.num_features == 2 * 1024
