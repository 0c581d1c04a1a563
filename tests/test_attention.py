"""Attention blocks: shapes, the paper's widths and parameter counts, equality with timm."""
import pytest
import torch
from timm.layers import SEModule

from engine.complexity import count_params
from models import build_model
from models.attention import SqueezeExcite


@pytest.mark.parametrize("channels,reduction", [(64, 16), (256, 16), (48, 4), (100, 8)])
def test_se_matches_timm_with_the_paper_width(channels, reduction):
    ours = SqueezeExcite(channels, reduction)
    theirs = SEModule(channels, rd_channels=channels // reduction)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, channels, 7, 5)
    torch.testing.assert_close(ours(x), theirs(x))


def test_se_width_is_exactly_c_over_r_not_rounded_like_timm():
    se = SqueezeExcite(64, reduction=16)
    assert se.fc1.out_channels == 4
    assert SEModule(64, rd_ratio=1 / 16).fc1.out_channels == 8  # timm's default rounds to 8


@pytest.mark.parametrize("channels", [64, 72, 200, 2048])
def test_se_divisor_option_gives_timms_default_module(channels):
    ours = SqueezeExcite(channels, reduction=16, divisor=8)
    theirs = SEModule(channels)  # timm's defaults: rd_ratio 1/16, rd_divisor 8
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, channels, 3, 3)
    torch.testing.assert_close(ours(x), theirs(x))


def test_se_bias_option():
    assert SqueezeExcite(64, 4, bias=False).fc1.bias is None
    assert count_params(SqueezeExcite(64, 4, bias=True)) - count_params(SqueezeExcite(64, 4, bias=False)) == 16 + 64


def test_se_rejects_a_reduction_that_leaves_no_units():
    with pytest.raises(ValueError, match="reduction=32"):
        SqueezeExcite(16, reduction=32)


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


# The SE paper's reduction-ratio ablation (Table 5 / official model): SE-ResNet-50 parameters.
@pytest.mark.parametrize("reduction,params", [
    (2, 45_699_240), (4, 35_635_688), (8, 30_603_912), (16, 28_088_024), (32, 26_830_080),
])
def test_se_resnet50_parameter_counts(reduction, params):
    model = build_model({"name": "resnet50", "stem": "imagenet"}, {"name": "se", "reduction": reduction})
    assert count_params(model) == params


# --- every block: the contract ------------------------------------------------------------------

import timm.layers
from timm.layers.cbam import CbamModule
from timm.layers.coord_attn import CoordAttn
from timm.models.volo import OutlookAttention as TimmOutlookAttention
from torch.utils._python_dispatch import TorchDispatchMode

from models.attention import (ATTENTION_BLOCKS, CBAM, ECA, CoordAttention, CrissCrossAttention,
                              DualAttention, GlobalContext, LocalSelfAttention, MultiHeadSelfAttention2d,
                              NonLocal, Outlook, SpatialTransformer)
from models.attention.eca import eca_kernel_size
from models.attention.outlook import OutlookAttention

GATES_AND_MIXERS = [n for n, cls in ATTENTION_BLOCKS.items() if "replace_spatial" not in cls.positions]
REPLACERS = [n for n, cls in ATTENTION_BLOCKS.items() if "replace_spatial" in cls.positions]
SHAPES = [(16, 4, 4), (32, 7, 7), (64, 5, 9), (48, 13, 6)]


def make_block(name: str, channels: int, out_channels: int | None = None, stride: int = 1):
    cls = ATTENTION_BLOCKS[name]
    if name in REPLACERS:
        return cls(channels, out_channels or channels, stride)
    return cls(channels)


def test_every_registered_block_is_covered():
    assert set(GATES_AND_MIXERS) | set(REPLACERS) == set(ATTENTION_BLOCKS)
    assert len(ATTENTION_BLOCKS) == 15


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


@pytest.mark.parametrize("name", REPLACERS)
@pytest.mark.parametrize("size", [(8, 8), (7, 7), (5, 9)])
def test_replace_spatial_blocks_change_width_and_stride_like_a_conv(name, size):
    block = make_block(name, 16, 32, stride=2)
    conv = torch.nn.Conv2d(16, 32, 3, 2, 1)
    x = torch.randn(1, 16, *size)
    assert block(x).shape == conv(x).shape


@pytest.mark.parametrize("name", sorted(ATTENTION_BLOCKS))
def test_block_runs_batch_1_channels_last_and_bf16(name):
    block = make_block(name, 32).train()
    x = torch.randn(1, 32, 6, 6).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = block(x)
    assert y.shape == x.shape and torch.isfinite(y.float()).all()


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


@pytest.mark.parametrize("block", [
    GlobalContext(32), NonLocal(32), NonLocal(32, mode="dot", subsample=True), NonLocal(32, mode="concat"),
    NonLocal(32, mode="gaussian"), CrissCrossAttention(32), DualAttention(32), SpatialTransformer(32),
], ids=lambda b: type(b).__name__ + getattr(b, "mode", ""))
def test_blocks_that_start_as_the_identity(block):
    x = torch.randn(2, 32, 6, 10)
    torch.testing.assert_close(block.train()(x), x, rtol=1e-5, atol=1e-5)


# --- equal to timm with copied weights ----------------------------------------------------------

def test_cbam_matches_timm_given_the_same_weights():
    torch.manual_seed(0)
    ours = CBAM(64, reduction=16, bias=True).eval()
    theirs = CbamModule(64, rd_channels=4, mlp_bias=True).eval()
    state = {"channel.fc1.weight": ours.channel.fc1.weight, "channel.fc1.bias": ours.channel.fc1.bias,
             "channel.fc2.weight": ours.channel.fc2.weight, "channel.fc2.bias": ours.channel.fc2.bias,
             # timm stacks (mean, max), the official code (max, mean): swap the kernel's inputs
             "spatial.conv.conv.weight": ours.spatial.conv.weight[:, [1, 0]],
             **{f"spatial.conv.bn.{k}": v for k, v in ours.spatial.bn.state_dict().items()}}
    theirs.load_state_dict(state)
    x = torch.randn(2, 64, 7, 9)
    torch.testing.assert_close(ours(x), theirs(x))


@pytest.mark.parametrize("channels", [64, 256, 2048])
def test_eca_matches_timm_and_the_papers_kernel_sizes(channels):
    ours = ECA(channels)
    theirs = timm.layers.EcaModule(channels)
    assert ours.conv.kernel_size == theirs.conv.kernel_size == (eca_kernel_size(channels),)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, channels, 5, 5)
    torch.testing.assert_close(ours(x), theirs(x))
    assert [eca_kernel_size(c) for c in (64, 256, 512, 1024, 2048)] == [3, 5, 5, 5, 7]


def test_coordinate_attention_matches_timm_and_the_paper_width():
    ours = CoordAttention(128, reduction=32).eval()
    assert ours.conv1.out_channels == max(8, 128 // 32)
    theirs = CoordAttn(128, rd_channels=ours.conv1.out_channels, bias=True).eval()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 128, 7, 5)
    torch.testing.assert_close(ours(x), theirs(x))


@pytest.mark.parametrize("fusion", ["add", "mul"])
def test_global_context_matches_timm(fusion):
    torch.manual_seed(0)
    ours = GlobalContext(64, reduction=16, fusion=fusion)
    for p in ours.parameters():  # leave the zero init, so the outputs depend on every weight
        torch.nn.init.normal_(p, std=0.1)
    theirs = timm.layers.GlobalContext(64, fuse_add=fusion == "add", fuse_scale=fusion == "mul", rd_channels=4)
    mlp = "mlp_add" if fusion == "add" else "mlp_scale"
    t = ours.transform
    theirs.load_state_dict({
        "conv_attn.weight": ours.conv_mask.weight, "conv_attn.bias": ours.conv_mask.bias,
        f"{mlp}.fc1.weight": t[0].weight, f"{mlp}.fc1.bias": t[0].bias,
        f"{mlp}.norm.weight": t[1].weight.flatten(), f"{mlp}.norm.bias": t[1].bias.flatten(),
        f"{mlp}.fc2.weight": t[3].weight, f"{mlp}.fc2.bias": t[3].bias,
    })
    getattr(theirs, mlp).norm.eps = t[1].eps  # timm's LayerNorm2d: 1e-6; the official nn.LayerNorm: 1e-5
    x = torch.randn(2, 64, 6, 7)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-5)


def test_non_local_matches_timm_with_its_width_and_scale():
    torch.manual_seed(0)
    ours = NonLocal(64, reduction=8, scale=64 ** -0.5).eval()
    torch.nn.init.normal_(ours.bn.weight)  # a zero gamma would hide everything but the shortcut
    theirs = timm.layers.NonLocalAttn(64, rd_channels=8).eval()
    names = {"theta": "t", "phi": "p", "g": "g", "W": "z", "bn": "norm"}
    theirs.load_state_dict({f"{names[k.split('.')[0]]}.{k.split('.', 1)[1]}": v for k, v in ours.state_dict().items()})
    x = torch.randn(2, 64, 5, 6)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("stride", [1, 2])
def test_outlook_attention_matches_timms_volo(stride):
    torch.manual_seed(0)
    ours = OutlookAttention(64, heads=2, stride=stride)
    theirs = TimmOutlookAttention(64, num_heads=2, kernel_size=3, padding=1, stride=stride)
    theirs.load_state_dict(ours.state_dict())
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


# --- parameter counts of the papers' networks ----------------------------------------------------

IMAGENET_R50 = {"name": "resnet50", "stem": "imagenet"}


@pytest.mark.parametrize("stage,channels,units", [(1, 256, 3), (2, 512, 4), (3, 1024, 6), (4, 2048, 3)])
def test_se_in_one_stage_adds_the_official_blocks_parameters(stage, channels, units):
    """The official SE block: two FCs with biases, C -> C/16 -> C, on every unit of the stage."""
    base = count_params(build_model(IMAGENET_R50, {"name": "none"}))
    model = build_model(IMAGENET_R50, {"name": "se", "stages": [stage]})
    hidden = channels // 16
    assert count_params(model) - base == units * (2 * channels * hidden + hidden + channels)


def test_cbam_resnet50_parameters():
    """SE's MLP plus a 7x7x2 conv and a 1-channel BN per unit: 28.09M (CBAM paper, Table 4)."""
    cbam = count_params(build_model(IMAGENET_R50, {"name": "cbam"}))
    se = count_params(build_model(IMAGENET_R50, {"name": "se"}))
    assert cbam - se == 16 * (7 * 7 * 2 + 2) and round(cbam / 1e6, 2) == 28.09


def test_eca_resnet50_adds_a_handful_of_parameters():
    """The official eca_resnet50 (k = 3 in every unit) adds 3 weights to each of the 16 units."""
    base = count_params(build_model(IMAGENET_R50, {"name": "none"}))
    assert count_params(build_model(IMAGENET_R50, {"name": "eca", "kernel_size": 3})) - base == 16 * 3
    adaptive = count_params(build_model(IMAGENET_R50, {"name": "eca"})) - base
    assert adaptive == 3 * 5 + 4 * 5 + 6 * 5 + 3 * 7  # k(256)=k(512)=k(1024)=5, k(2048)=7


def test_gc_resnet50_parameters():
    """GC r=16 after the last 1x1 of every c3-c5 unit: 28.08M (GCNet paper, Table 2)."""
    model = build_model(IMAGENET_R50, {"name": "gc", "stages": [2, 3, 4]})
    assert round(count_params(model) / 1e6, 2) == 28.08


def test_non_local_macs_count_its_attention_matmuls():
    """theta, phi, g (C -> C/2) and W (C/2 -> C) per position, plus Q K^T and A V: 2 * N * N * C/2."""
    from engine.complexity import count_macs

    c, h, w = 32, 6, 5
    n, inner = h * w, c // 2
    convs = 3 * (c * inner * n) + inner * c * n
    assert count_macs(NonLocal(c), (c, h, w)) == convs + 2 * n * n * inner
    # dot: phi^T g (C/2 x C/2), then theta times it: linear in N
    assert count_macs(NonLocal(c, mode="dot"), (c, h, w)) == convs + 2 * n * inner * inner


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


# --- what the blocks attend to (models/attention/maps.py) ------------------------------------------

from models.attention.maps import attention_maps  # noqa: E402


def test_channel_and_spatial_gates_are_the_ones_the_blocks_apply():
    torch.manual_seed(0)
    x = torch.randn(2, 32, 6, 7)
    for block in (SqueezeExcite(32, 4), ATTENTION_BLOCKS["eca"](32)):
        gate = attention_maps(block, x)["channel gate"][1]
        torch.testing.assert_close(block(x), x * gate[:, :, None, None])
    cbam = ATTENTION_BLOCKS["cbam"](32, 4).eval()
    maps = attention_maps(cbam, x)
    expected = x * maps["channel gate"][1][:, :, None, None] * maps["spatial gate"][1][:, None]
    torch.testing.assert_close(cbam(x), expected)


def test_non_local_query_map_is_the_row_of_its_attention_matrix():
    torch.manual_seed(0)
    block = ATTENTION_BLOCKS["nonlocal"](16)
    x = torch.randn(1, 16, 5, 6)
    weights = attention_maps(block, x, query=(0.5, 0.5))["query attention"][1]  # row 2, column 3
    theta, phi = block.theta(x).flatten(2)[0], block.phi(x).flatten(2)[0]  # C', N
    full = torch.softmax(theta.t() @ phi * block.scale, dim=1)  # N x N, built independently
    torch.testing.assert_close(weights.flatten(), full[2 * 6 + 3])


@pytest.mark.parametrize("name", ["criss_cross", "danet", "mhsa", "sasa", "outlook", "nonlocal"])
def test_query_maps_are_distributions_where_the_block_looks(name):
    torch.manual_seed(0)
    cls = ATTENTION_BLOCKS[name]
    block = cls(32, 32, 1) if "replace_spatial" in cls.positions else cls(32)
    x = torch.randn(2, 32, 9, 9)
    (kind, weights), = attention_maps(block.eval(), x, query=(0.5, 0.5)).values()  # row 4, column 4
    assert kind == "query" and weights.shape == (2, 9, 9) and (weights >= 0).all()
    torch.testing.assert_close(weights.sum((1, 2)), torch.ones(2))
    rows, cols = (weights[0] > 0).nonzero(as_tuple=True)
    if name == "criss_cross":  # its row and its column only
        assert ((rows == 4) | (cols == 4)).all()
    if name in ("sasa", "outlook"):  # a 7x7 (SASA) or 3x3 (outlook) window holding the query
        k = 7 if name == "sasa" else 3
        assert rows.max() - rows.min() < k and cols.max() - cols.min() < k
        assert rows.min() <= 4 <= rows.max() and cols.min() <= 4 <= cols.max()
    else:
        assert len(rows) > 9  # beyond any local window


@pytest.mark.parametrize("name", [n for n in ATTENTION_BLOCKS if n not in ("simam", "triplet")])
def test_every_probed_block_renders_maps_of_the_images_size(name):
    from engine.visualize import render_attention
    from models import build_model

    torch.manual_seed(0)
    model = build_model({"name": "resnet20"}, {"name": name, "stages": [-1]}, num_classes=10).eval()
    display = torch.rand(2, 3, 32, 32)
    rendered = render_attention(model, (display - 0.5) / 0.5, display, query=(0.3, 0.7))
    assert rendered[0] and rendered[0].keys() == rendered[1].keys()
    for per_image in rendered:
        for key, array in per_image.items():
            assert array.shape == (32, 32, 3) and array.dtype.name == "uint8", key
            assert array.std() > 0, key  # not a blank image
