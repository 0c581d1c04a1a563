"""Attention blocks: the contract of every registered block, the papers' widths and parameter counts,
equality with timm, and what the blocks attend to."""

import pytest
import torch
from timm.layers import EcaModule, SEModule
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from engine.complexity import count_params
from models import build_model
from models.attention import (ATTENTION_BLOCKS, CBAM, ECA, CoordAttention, CrissCrossAttention, DualAttention,
                              GlobalContext, LocalSelfAttention, MultiHeadSelfAttention2d, NonLocal, Outlook,
                              SpatialTransformer, SqueezeExcite)
from models.attention.base import MAP_POSITIONS, SPATIAL_POSITIONS, AttentionBlock
from models.attention.eca import eca_kernel_size
from models.attention.maps import attention_maps, blocks_with_maps, has_maps
from models.attention.outlook import OutlookAttention
from tests.helpers import meta_device


def test_se_bias_option():
    assert SqueezeExcite(64, 4, bias=False).fc1.bias is None
    assert count_params(SqueezeExcite(64, 4, bias=True)) - count_params(SqueezeExcite(64, 4, bias=False)) == 16 + 64


def test_se_keeps_one_hidden_unit_where_r_exceeds_the_channels_and_refuses_r_below_one():
    assert SqueezeExcite(16, reduction=32).fc1.out_channels == 1  # the SE paper's CIFAR nets at r = 32
    with pytest.raises(ValueError, match="reduction=0 must be an integer >= 1"):
        SqueezeExcite(16, reduction=0)


def test_se_shape_gradient_channels_last_and_bf16():
    torch.manual_seed(0)
    se = SqueezeExcite(32, 2)
    leaf = torch.randn(1, 32, 4, 4, requires_grad=True)
    x = leaf.to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = se(x)
    assert y.shape == x.shape and torch.isfinite(y.float()).all()
    y.float().sum().backward()
    assert leaf.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in se.parameters())


def test_se_gate_scales_each_channel_by_a_factor_in_0_1():
    se = SqueezeExcite(8, 2)
    x = torch.rand(3, 8, 6, 6) + 0.1
    ratio = se(x) / x
    # one factor per (image, channel), constant over space, strictly between 0 and 1
    assert torch.allclose(ratio, ratio[:, :, :1, :1].expand_as(ratio), atol=1e-6)
    assert (ratio > 0).all() and (ratio < 1).all()


# --- every registered block: the contract ---------------------------------------------------------
# Parametrised over the registry's names; each test looks its class up by name when it runs and decides
# from what the block declares (its positions, whether it has maps or a timm twin), so a test may
# register a block (monkeypatch) and call these functions with its name (tests/test_contract.py does).

SHAPES = [(16, 4, 4), (32, 7, 7), (64, 5, 9), (48, 13, 6)]


def make_block(name: str, channels: int, out_channels: int | None = None, stride: int = 1, **kwargs) -> nn.Module:
    """The registered block ``name`` for ``channels`` input channels, in the way its positions call it."""
    cls = ATTENTION_BLOCKS[name]
    if "replace_spatial" in cls.positions:
        return cls(channels, out_channels or channels, stride, **kwargs)
    return cls(channels, **kwargs)


def test_every_registered_block_declares_where_it_may_go():
    for name, cls in ATTENTION_BLOCKS.items():
        assert issubclass(cls, AttentionBlock), name
        # a map block or a conv replacer: the two take different constructor arguments
        assert cls.positions and (cls.positions <= MAP_POSITIONS or cls.positions <= SPATIAL_POSITIONS), name
        assert cls.default_position in cls.positions, name


@pytest.mark.parametrize("name", sorted(ATTENTION_BLOCKS))
@pytest.mark.parametrize("shape", SHAPES)
def test_block_keeps_the_shape_and_passes_gradients(name, shape):
    torch.manual_seed(0)
    c, h, w = shape
    block = make_block(name, c)
    x = torch.randn(2, c, h, w, requires_grad=True)
    y = block(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    (y * torch.randn_like(y)).sum().backward()
    assert x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in block.parameters())


@pytest.mark.parametrize("name", sorted(ATTENTION_BLOCKS))
def test_block_changes_width_and_stride_like_the_layer_it_takes(name):
    """A conv replacer as the 3x3 conv it replaces (16 -> 32 channels, stride 2); a map block not at all."""
    replaces_conv = "replace_spatial" in ATTENTION_BLOCKS[name].positions
    block = make_block(name, 16, 32, stride=2) if replaces_conv else make_block(name, 16)
    layer = nn.Conv2d(16, 32, 3, 2, 1) if replaces_conv else nn.Identity()
    for size in [(8, 8), (7, 7), (5, 9)]:
        x = torch.randn(1, 16, *size)
        assert block(x).shape == layer(x).shape, size


@pytest.mark.parametrize("name", sorted(ATTENTION_BLOCKS))
def test_block_runs_batch_1_channels_last_and_bf16(name):
    block = make_block(name, 32).train()
    x = torch.randn(1, 32, 6, 6).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = block(x)
    assert y.shape == x.shape and torch.isfinite(y.float()).all()


@pytest.mark.parametrize("name", sorted(ATTENTION_BLOCKS))
def test_block_maps_are_well_formed(name):
    """Channel gates (B, C) in [0, 1]; spatial and query maps (B, H, W); query maps are distributions.

    A block with maps gives some for its default instance; one without (the base's default) gives none.
    """
    torch.manual_seed(0)
    b, c, h, w = 2, 32, 7, 9  # not square, so a swapped H and W shows
    block = make_block(name, c).eval()
    maps = attention_maps(block, torch.randn(b, c, h, w), query=(0.3, 0.7))
    assert bool(maps) == has_maps(block)
    for key, (kind, m) in maps.items():
        assert kind in ("channel", "spatial", "query"), key
        grid = (h // 2, w // 2) if kind == "query" and name == "nonlocal" else (h, w)  # x pooled 2x2, floor mode
        assert m.shape == ((b, c) if kind == "channel" else (b, *grid)) and torch.isfinite(m).all(), key
        if kind == "channel":
            assert ((m >= 0) & (m <= 1)).all(), key
        if kind == "query":
            assert (m >= 0).all(), key
            torch.testing.assert_close(m.sum((1, 2)), torch.ones(b), msg=key)


def test_modules_that_are_not_blocks_and_unweighted_pooling_give_no_maps():
    x = torch.randn(1, 16, 5, 5)
    assert attention_maps(nn.Conv2d(16, 16, 1), x) == {} and not has_maps(nn.Conv2d(16, 16, 1))
    gc = GlobalContext(16, pooling="avg")
    assert has_maps(gc) and attention_maps(gc, x) == {}  # every position weighs the same


@pytest.mark.parametrize("block", [
    GlobalContext(32), NonLocal(32), NonLocal(32, mode="dot", subsample=True), NonLocal(32, mode="concat"),
    NonLocal(32, mode="gaussian"), CrissCrossAttention(32), DualAttention(32), SpatialTransformer(32),
], ids=lambda b: type(b).__name__ + getattr(b, "mode", ""))
def test_blocks_that_start_as_the_identity(block):
    x = torch.randn(2, 32, 6, 10)
    torch.testing.assert_close(block.train()(x), x, rtol=1e-5, atol=1e-5)


# --- equal to timm with copied weights (each block's timm_twin) ---------------------------------------

def assert_far_from_uniform(block: nn.Module, x: torch.Tensor) -> None:
    """The block's gates spread (std over a tenth of their mean) and its query maps peak (largest weight over 3x
    the uniform one): a comparison on uniform attention would not see the mechanism."""
    for key, (kind, m) in attention_maps(block, x).items():
        if kind == "query":
            assert float((m.flatten(1).amax(1) * m[0].numel()).mean()) > 3, key
        else:
            assert float(m.std() / m.mean()) > 0.1, (key, float(m.std()), float(m.mean()))


def assert_equals_its_twin(block: nn.Module, channels: int) -> None:
    """``block`` with random weights, in eval mode, computes what its timm twin computes, on attention far
    from uniform."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in block.parameters():  # not the zero inits (GC's last conv, non-local's BN), which hide weights
            p.normal_(0, 0.5)
    block.eval()
    twin = block.timm_twin()
    assert twin is not None and type(twin).__module__.startswith("timm.") and not twin.training
    x = 4 * torch.randn(2, channels, 6, 7)  # pooled descriptors of unit noise are too flat for the gates
    assert_far_from_uniform(block, x)
    torch.testing.assert_close(twin(x), block(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", sorted(ATTENTION_BLOCKS))
def test_block_equals_its_timm_twin(name):
    block = make_block(name, 64)
    if block.timm_twin() is None:
        pytest.skip(f"{name}: timm has no module computing it with these defaults")
    assert_equals_its_twin(block, 64)


@pytest.mark.parametrize("name,channels,kwargs", [
    ("se", 48, {"reduction": 4}), ("se", 100, {"reduction": 8}),  # the paper's exact width
    ("se", 72, {"divisor": 8}),  # timm's rounding
    ("se", 64, {"gate": "tanh", "bias": False}),
    ("cbam", 64, {"bias": False}), ("cbam", 64, {"spatial": False}), ("cbam", 64, {"kernel_size": 3}),
    ("eca", 256, {}), ("eca", 64, {"kernel_size": 1}),
    ("gc", 64, {"fusion": "mul"}), ("gc", 64, {"pooling": "avg"}),
    ("nonlocal", 64, {"reduction": 8, "scale": 64 ** -0.5, "subsample": False}),  # timm's width and scale
    ("nonlocal", 64, {"scale": 1.0, "subsample": False}),  # the paper's equation
], ids=str)
def test_block_variant_equals_its_timm_twin(name, channels, kwargs):
    assert_equals_its_twin(make_block(name, channels, **kwargs), channels)


def test_hyper_parameters_timm_cannot_express_have_no_twin():
    for name, kwargs in [("se", {"squeeze": "max"}), ("se", {"squeeze": "none"}), ("nonlocal", {"mode": "dot"}),
                         ("nonlocal", {"subsample": True}), ("nonlocal", {"scale": 0.5})]:
        assert make_block(name, 64, **kwargs).timm_twin() is None, (name, kwargs)


def test_se_width_is_exactly_c_over_r_not_rounded_like_timm():
    se = SqueezeExcite(64, reduction=16)
    assert se.fc1.out_channels == 4
    assert SEModule(64, rd_ratio=1 / 16).fc1.out_channels == 8  # timm's default rounds to 8


@pytest.mark.parametrize("channels", [64, 72, 200, 2048])
def test_se_divisor_option_gives_timms_default_width(channels):
    assert SqueezeExcite(channels, reduction=16, divisor=8).fc1.out_channels == SEModule(channels).fc1.out_channels


@pytest.mark.parametrize("channels", [64, 256, 2048])
def test_eca_picks_timms_and_the_papers_kernel_sizes(channels):
    assert ECA(channels).conv.kernel_size == EcaModule(channels).conv.kernel_size == (eca_kernel_size(channels),)
    assert [eca_kernel_size(c) for c in (64, 256, 512, 1024, 2048)] == [3, 5, 5, 5, 7]


def test_coordinate_attention_has_the_papers_width():
    assert CoordAttention(128, reduction=32).conv1.out_channels == max(8, 128 // 32)
    assert CoordAttention(512, reduction=32).conv1.out_channels == 512 // 32


@pytest.mark.parametrize("stride", [1, 2])
def test_outlook_attention_matches_timms_volo(stride):
    torch.manual_seed(0)
    ours = OutlookAttention(64, heads=2, stride=stride)
    theirs = ours.timm_twin()
    assert type(theirs).__module__ == "timm.models.volo"
    x = torch.randn(2, 7, 9, 64)
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ours, out_theirs = ours(x_ours), theirs(x_theirs)
    torch.testing.assert_close(out_ours, out_theirs, rtol=1e-4, atol=1e-5)
    out_ours.square().sum().backward()
    out_theirs.square().sum().backward()
    torch.testing.assert_close(x_ours.grad, x_theirs.grad, rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-4, msg=name)


def test_outlook_attention_keeps_no_unfolded_values_for_backward():
    """Only tensors of at most the values' size or the K^2 x K^2 weights' size survive the forward pass."""
    attention = OutlookAttention(32, heads=2, stride=1)
    x = torch.randn(2, 6, 6, 32, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        attention(x)
    weights = 2 * 2 * 36 * 81  # B, heads, L, K*K, K*K
    values = x.numel()
    assert max(saved) == weights
    assert values * 9 not in saved  # the unfolded values (B, heads, L, K*K, C/heads)


# --- faithful in detail ---------------------------------------------------------------------------

@pytest.mark.parametrize("squeeze,gate", [("max", "sigmoid"), ("none", "sigmoid"), ("avg", "tanh"), ("avg", "relu")])
def test_se_ablation_variants(squeeze, gate):
    se = SqueezeExcite(32, 4, squeeze=squeeze, gate=gate)
    x = torch.randn(2, 32, 5, 5)
    ratio = se(x) / x
    per_position = not torch.allclose(ratio, ratio[:, :, :1, :1].expand_as(ratio), atol=1e-5)
    assert per_position == (squeeze == "none")


def test_coordinate_attention_gates_are_products_of_row_and_column_weights():
    block = CoordAttention(32).eval()
    x = torch.randn(2, 32, 6, 4)
    a_h, a_w = block.gates(x)
    assert a_h.shape == (2, 32, 6, 1) and a_w.shape == (2, 32, 1, 4)
    torch.testing.assert_close(block(x), x * a_h * a_w)


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_criss_cross_never_allocates_an_hw_by_hw_tensor():
    h = w = 24
    block = CrissCrossAttention(16)
    torch.nn.init.ones_(block.gamma)
    x = torch.randn(1, 16, h, w, requires_grad=True)
    with LargestTensor() as probe:
        block(x).sum().backward()
    assert probe.largest < (h * w) ** 2 // 4
    assert probe.largest >= h * w * (h + w)  # the row + column attention itself


def test_criss_cross_attends_over_row_and_column_once_each():
    block = CrissCrossAttention(8, recurrence=1)
    torch.nn.init.ones_(block.gamma)
    x = torch.zeros(1, 8, 5, 6)
    x[0, :, 2, 3] = 1.0  # a single active position
    torch.nn.init.zeros_(block.value.bias)  # else every position would see the value bias
    delta = block(x) - x
    changed = delta.abs().sum(1)[0] > 1e-6
    rows, cols = torch.nonzero(changed).unbind(1)
    assert ((rows == 2) | (cols == 3)).all() and changed[2].all() and changed[:, 3].all()


def test_sasa_looks_only_at_its_neighbourhood():
    block = LocalSelfAttention(8, 8, kernel_size=3, heads=2).eval()
    x = torch.randn(1, 8, 9, 9)
    y = block(x)
    x2 = x.clone()
    x2[0, :, 0, 0] += 5.0  # change a corner
    changed = (block(x2) - y).abs().sum(1)[0] > 1e-6
    assert changed[:2, :2].all() and changed.sum() == 4  # the 3x3 windows that contain the corner


def test_mhsa_relative_positions_adapt_to_the_map_size():
    block = MultiHeadSelfAttention2d(32, 32, heads=4, max_size=6)
    for size in [(3, 5), (6, 6), (9, 7)]:  # smaller, equal, larger than the tables
        assert block(torch.randn(1, 32, *size)).shape == (1, 32, *size)


def test_mhsa_position_bias_follows_relative_offsets():
    block = MultiHeadSelfAttention2d(8, 8, heads=1, max_size=4)
    q = torch.randn(1, 1, 3 * 4, 8)
    bias = block.position_bias(q, 3, 4).view(3, 4, 3, 4)
    table = lambda t, o: t[o + 3]  # offset o -> row of a max_size=4 table (offsets -3..3)
    for (i, j, k, l) in [(0, 0, 2, 3), (1, 2, 0, 1), (2, 3, 2, 3)]:
        expected = q[0, 0, i * 4 + j] @ (table(block.rel_h, k - i) + table(block.rel_w, l - j))
        torch.testing.assert_close(bias[i, j, k, l], expected)


def test_stn_starts_at_the_identity_transform():
    block = SpatialTransformer(8)
    theta = block.theta(torch.randn(3, 8, 6, 6))
    torch.testing.assert_close(theta, torch.tensor([[1.0, 0, 0], [0, 1, 0]]).expand(3, 2, 3))


def test_outlook_plug_in_is_residual():
    block = Outlook(32)
    torch.nn.init.zeros_(block.attention.proj.weight)
    torch.nn.init.zeros_(block.attention.proj.bias)
    x = torch.randn(2, 32, 5, 5)
    torch.testing.assert_close(block(x), x)


@pytest.mark.parametrize("block", ["se", "cbam", "gc"])
def test_every_reduction_runs_on_the_cifar_resnets_with_the_width_floored_at_one(block):
    """`-m attention.reduction=2,4,8,16,32` on ResNet-20 (16, 32, 64 channels): C // r, at least 1."""
    from engine.complexity import bottleneck_widths

    for reduction in (2, 4, 8, 16, 32):
        net = build_model({"name": "resnet20"}, {"name": block, "reduction": reduction}, num_classes=10)
        widths = {(w["channels"], w["width"]) for w in bottleneck_widths(net)}
        assert widths == {(c, max(1, c // reduction)) for c in (16, 32, 64)}, (block, reduction)
        assert net(torch.randn(1, 3, 32, 32)).shape == (1, 10)


@pytest.mark.parametrize("model", [{"name": "resnet20"}, {"name": "mobilenetv2", "stem": "cifar"}])
def test_cbam_spatial_gates_start_as_the_official_code_sets_them(model):
    """The official CBAM ResNets zero the spatial gate's BN scale: every spatial gate is 0.5 at init."""
    net = build_model(model, {"name": "cbam", "reduction": 4}, num_classes=10)
    gates = [m.spatial for m in net.modules() if isinstance(m, CBAM)]
    assert gates and all(torch.equal(g.bn.weight, torch.zeros(1)) for g in gates)
    x = torch.randn(2, 8, 6, 6)  # the spatial gate pools over the channels: any count
    torch.testing.assert_close(gates[0].gate(x), torch.full((2, 1, 6, 6), 0.5))


# --- parameter counts of the papers' networks ----------------------------------------------------

def resnet50_params(attention: dict) -> int:
    """Parameters of the ImageNet ResNet-50 with ``attention``, built on the meta device: only shapes count."""
    with meta_device():  # no memory and no init: a quarter of the time of a real build
        return count_params(build_model({"name": "resnet50", "stem": "imagenet"}, attention))


# The SE paper's reduction-ratio ablation (Table 5 / official model): SE-ResNet-50 parameters.
@pytest.mark.parametrize("reduction,params", [
    (2, 45_699_240), (4, 35_635_688), (8, 30_603_912), (16, 28_088_024), (32, 26_830_080),
])
def test_se_resnet50_parameter_counts(reduction, params):
    assert resnet50_params({"name": "se", "reduction": reduction}) == params


@pytest.mark.parametrize("stage,channels,units", [(1, 256, 3), (2, 512, 4), (3, 1024, 6), (4, 2048, 3)])
def test_se_in_one_stage_adds_the_official_blocks_parameters(stage, channels, units):
    """The official SE block: two FCs with biases, C -> C/16 -> C, on every unit of the stage."""
    added = resnet50_params({"name": "se", "stages": [stage]}) - resnet50_params({"name": "none"})
    hidden = channels // 16
    assert added == units * (2 * channels * hidden + hidden + channels)


def test_cbam_resnet50_parameters():
    """SE's MLP plus a 7x7x2 conv and a 1-channel BN per unit: 28.09M (CBAM paper, Table 4)."""
    cbam = resnet50_params({"name": "cbam"})
    se = resnet50_params({"name": "se"})
    assert cbam - se == 16 * (7 * 7 * 2 + 2) and round(cbam / 1e6, 2) == 28.09


def test_eca_resnet50_adds_a_handful_of_parameters():
    """The official eca_resnet50 (k = 3 in every unit) adds 3 weights to each of the 16 units."""
    base = resnet50_params({"name": "none"})
    assert resnet50_params({"name": "eca", "kernel_size": 3}) - base == 16 * 3
    adaptive = resnet50_params({"name": "eca"}) - base
    assert adaptive == 3 * 5 + 4 * 5 + 6 * 5 + 3 * 7  # k(256)=k(512)=k(1024)=5, k(2048)=7


def test_gc_resnet50_parameters():
    """GC r=16 after the last 1x1 of every c3-c5 unit: 28.08M (GCNet paper, Table 2)."""
    assert round(resnet50_params({"name": "gc", "stages": [2, 3, 4]}) / 1e6, 2) == 28.08


def test_non_local_macs_count_its_attention_matmuls():
    """theta, phi, g (C -> C/2) and W (C/2 -> C) per position, plus Q K^T and A V: 2 * N * N * C/2."""
    from engine.complexity import count_macs

    c, h, w = 32, 6, 5
    n, inner = h * w, c // 2
    convs = 3 * (c * inner * n) + inner * c * n
    assert count_macs(NonLocal(c, subsample=False), (c, h, w)) == convs + 2 * n * n * inner
    # dot: phi^T g (C/2 x C/2), then theta times it: linear in N
    assert count_macs(NonLocal(c, mode="dot", subsample=False), (c, h, w)) == convs + 2 * n * inner * inner
    # the released code's default: phi and g on the 2x2-pooled map (floor mode), M = 3 x 2 keys
    m = (h // 2) * (w // 2)
    pooled_convs = c * inner * n + 2 * (c * inner * m) + inner * c * n
    assert count_macs(NonLocal(c), (c, h, w)) == pooled_convs + 2 * n * m * inner


def test_simam_is_parameter_free_and_follows_its_energy():
    from models.attention import SimAM

    block = SimAM(8)
    assert sum(p.numel() for p in block.parameters()) == 0
    x = torch.randn(2, 8, 5, 4)
    mu, var = x.mean((2, 3), keepdim=True), x.var((2, 3), keepdim=True)  # var over HW - 1, as the paper
    energy = (x - mu) ** 2 / (4 * (var + 1e-4)) + 0.5
    torch.testing.assert_close(block(x), x * torch.sigmoid(energy))


def test_triplet_attention_has_three_7x7_gates_and_averages_them():
    from models.attention import TripletAttention

    block = TripletAttention(16)
    assert sum(p.numel() for p in block.parameters()) == 3 * (2 * 7 * 7 + 2)  # conv + BN affine
    for gate in (block.ch, block.cw, block.hw):
        torch.nn.init.zeros_(gate.conv.weight)
        torch.nn.init.zeros_(gate.bn.bias)
    x = torch.randn(2, 16, 6, 5)
    torch.testing.assert_close(block.eval()(x), x * 0.5)  # every gate is sigmoid(0)


# --- what the blocks attend to (each block's attention_maps) -----------------------------------------

def test_channel_and_spatial_gates_are_the_ones_the_blocks_apply():
    torch.manual_seed(0)
    x = torch.randn(2, 32, 6, 7)
    for block in (SqueezeExcite(32, 4), ECA(32)):
        gate = attention_maps(block, x)["channel gate"][1]
        torch.testing.assert_close(block(x), x * gate[:, :, None, None])
    cbam = CBAM(32, 4).eval()
    maps = attention_maps(cbam, x)
    expected = x * maps["channel gate"][1][:, :, None, None] * maps["spatial gate"][1][:, None]
    torch.testing.assert_close(cbam(x), expected)


def test_non_local_query_map_is_the_row_of_its_attention_matrix():
    torch.manual_seed(0)
    block = NonLocal(16)
    x = torch.randn(1, 16, 5, 6)
    weights = attention_maps(block, x, query=(0.5, 0.5))["query attention"][1]  # row 2, column 3
    assert weights.shape == (1, 2, 3)  # the keys: x max-pooled 2x2 (floor mode: row 5 dropped) before phi
    pooled = torch.nn.functional.max_pool2d(x, 2)
    theta, phi = block.theta(x).flatten(2)[0], block.phi(pooled).flatten(2)[0]  # C', N and C', M
    assert block.scale == pytest.approx(8 ** -0.5)  # the released code's d^-1/2, d = C / 2
    full = torch.softmax(theta.t() @ phi * block.scale, dim=1)  # N x M, built independently
    torch.testing.assert_close(weights.flatten(), full[2 * 6 + 3])


@pytest.mark.parametrize("mode", ["dot", "concat"])
def test_non_local_normalised_maps_divide_by_the_key_count(mode):
    """``dot`` and ``concat`` weigh by f / N: the query's row, batch by batch."""
    torch.manual_seed(0)
    block = NonLocal(16, mode=mode, subsample=False)
    x = torch.randn(2, 16, 4, 5)
    weights = attention_maps(block, x, query=(0.0, 0.0))["query attention"][1]  # B, 4, 5
    theta, phi = block.theta(x).flatten(2), block.phi(x).flatten(2)  # B, C', N
    if mode == "dot":
        expected = torch.einsum("bc,bcn->bn", theta[:, :, 0], phi) / 20
    else:
        wq, wk = block.concat_project.weight.flatten().chunk(2)
        expected = torch.relu(torch.einsum("c,bc->b", wq, theta[:, :, 0])[:, None]
                              + torch.einsum("c,bcn->bn", wk, phi)) / 20
    torch.testing.assert_close(weights.flatten(1), expected)


@pytest.mark.parametrize("name", ["criss_cross", "danet", "mhsa", "sasa", "outlook", "nonlocal"])
def test_query_maps_are_where_the_block_looks(name):
    torch.manual_seed(0)
    block = make_block(name, 32).eval()
    x = torch.randn(2, 32, 9, 9)
    (kind, weights), = attention_maps(block, x, query=(0.5, 0.5)).values()  # row 4, column 4
    assert kind == "query" and weights.shape == ((2, 4, 4) if name == "nonlocal" else (2, 9, 9))
    rows, cols = (weights[0] > 0).nonzero(as_tuple=True)
    if name == "criss_cross":  # its row and its column only
        assert ((rows == 4) | (cols == 4)).all()
    if name in ("sasa", "outlook"):  # a 7x7 (SASA) or 3x3 (outlook) window holding the query
        k = 7 if name == "sasa" else 3
        assert rows.max() - rows.min() < k and cols.max() - cols.min() < k
        assert rows.min() <= 4 <= rows.max() and cols.min() <= 4 <= cols.max()
    else:
        assert len(rows) > 9  # beyond any local window (non-local: its 16 pooled keys)


def test_blocks_with_maps_are_the_models_blocks_that_have_them():
    model = build_model({"name": "resnet20"}, {"name": "cbam", "stages": [-1]}, num_classes=10)
    found = blocks_with_maps(model)
    assert len(found) == 3 and all(isinstance(block, CBAM) for _, block in found)  # the last stage's units
    assert dict(model.named_modules())[found[0][0]] is found[0][1]
    assert blocks_with_maps(build_model({"name": "resnet20"}, {"name": "simam"}, num_classes=10)) == []


@pytest.mark.parametrize("name", sorted(ATTENTION_BLOCKS))
def test_every_block_draws_its_maps_into_the_figure(name):
    from engine.visualize import attention_figure, collect_maps

    torch.manual_seed(0)
    model = build_model({"name": "resnet20"}, {"name": name, "stages": [-1]}, num_classes=10).eval()
    maps = collect_maps(model, torch.randn(2, 3, 32, 32), query=(0.3, 0.7))
    assert bool(maps[0]) == bool(blocks_with_maps(model)) and len(maps[0]) == len(maps[1])
    for m in maps[0]:
        assert m.block == name and m.place.startswith("stage 3 · unit ") or m.place in ("head", "input"), m.place
        assert m.values.dim() == (1 if m.kind == "channel" else 2) and torch.isfinite(m.values).all()
    fig = attention_figure(torch.rand(3, 32, 32), maps[0], torch.rand(8, 8))
    spatial = [m for m in maps[0] if m.kind != "channel"]
    drawn = [ax.get_title() for ax in fig.axes if ax.get_title().startswith(("stage", "head", "input\n"))]
    assert len(drawn) == len(spatial)


# --- every registered block compiles --------------------------------------------------------------
# Last in the file: the slowest tests, and pytest-xdist hands out the last tests in the smallest
# chunks, so these spread over the workers instead of queueing on one.

@pytest.mark.parametrize("name", sorted(ATTENTION_BLOCKS))
def test_block_compiles_as_one_graph(name):
    torch._dynamo.reset()
    block = make_block(name, 16).eval()
    x = torch.randn(2, 16, 8, 8)
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), block(x), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_one_block_compiles_with_inductor():
    torch._dynamo.reset()
    block = CBAM(32).eval()
    x = torch.randn(2, 32, 8, 8)
    torch.testing.assert_close(torch.compile(block, fullgraph=True)(x), block(x), rtol=1e-4, atol=1e-5)


def test_non_local_pools_in_floor_mode_as_the_released_code_and_keeps_a_side_below_two():
    block = NonLocal(8)
    x = torch.randn(1, 8, 7, 7)
    torch.testing.assert_close(block.pool(x), torch.nn.functional.max_pool2d(x, 2))  # 3 x 3: row 7 dropped
    assert block.pool(x).shape[2:] == (3, 3)
    assert block.pool(torch.randn(1, 8, 1, 5)).shape[2:] == (1, 2)  # nothing to pool along a side of 1
    assert block.pool(torch.randn(1, 8, 1, 1)).shape[2:] == (1, 1)
    assert block(torch.randn(2, 8, 1, 1)).shape == (2, 8, 1, 1)
