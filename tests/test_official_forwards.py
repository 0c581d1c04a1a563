"""Forward equality with the papers' official models, through an oracle written here from the official code.

CA-MobileNetV2 against ``mbv2_ca`` of houqb/CoordAttention (Hou et al., CVPR 2021), commit
7619bea9acbe260b3793833cc78cef3f124c8112, file ``mbv2_ca.py`` (``coordatt.py`` holds the same block with
``reduction`` for ``groups`` and ``conv_h``/``conv_w``/``act`` for ``conv2``/``conv3``/``relu``):

- lines 17-31: h_sigmoid(x) = ReLU6(x + 3) / 6, h_swish(x) = x * h_sigmoid(x);
- lines 37-71: CoordAtt(inp, oup, groups=32): AdaptiveAvgPool2d((None, 1)) and ((1, None)) (the second
  permuted to (n, c, w, 1)), concatenated along dim 2, conv1 (1x1, bias, to mip = max(8, inp // 32)), bn1,
  h_swish, split [h, w], conv2 -> sigmoid on the H part, conv3 -> sigmoid on the (permuted back) W part,
  out = x * a_w * a_h;
- lines 73-106: _make_divisible, conv_3x3_bn (the stride-2 stem), conv_1x1_bn (the last 1x1 conv);
- lines 108-148: InvertedResidual: t = 1: dw 3x3, BN, ReLU6, pw-linear, BN; t > 1: pw, BN, ReLU6, dw 3x3
  (stride s), BN, ReLU6, CoordAtt(hidden, hidden), pw-linear, BN; the identity add when s = 1 and inp == oup;
- lines 150-194: MBV2_CA: the cfgs table (t, c, n, s), the last conv at 1280 for width_mult <= 1, average
  pool, Dropout(0.1), Linear.

The oracle is plain functions over an official-named state dict (``features.k.conv.6.conv2.weight`` ...)
mapped explicitly from our model's; it reads tensors only, never our modules' forwards. Every weight and
BN statistic is randomised first, and the test measures that the coordinate gates are far from uniform
(an oracle over near-constant gates would see nothing). The official repository is not needed at test
time, and none of its code is copied here.
"""
import re
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import models.attention.coord as coord_module
from engine.config import check_config
from models import build_model
from models.attention import CoordAttention
from tests.helpers import compose_config

# --- the official architecture (mbv2_ca.py lines 150-183), as data ---

OFFICIAL_CFGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                 (6, 320, 1, 1))  # t, c, n, s
BN_EPS = 1e-5  # nn.BatchNorm2d's default, which the official code keeps
CA_GROUPS = 32  # CoordAtt(hidden_dim, hidden_dim): groups=32, mip = max(8, inp // groups)


def official_make_divisible(v: float, divisor: int = 8) -> int:
    """mbv2_ca.py lines 73-90."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def official_units(width_mult: float = 1.0) -> list[dict]:
    """One dict per InvertedResidual of MBV2_CA, in ``features`` order (features.1 ...)."""
    units, inp = [], official_make_divisible(32 * width_mult)
    for t, c, n, s in OFFICIAL_CFGS:
        oup = official_make_divisible(c * width_mult)
        for i in range(n):
            stride = s if i == 0 else 1
            units.append({"inp": inp, "oup": oup, "t": t, "stride": stride, "hidden": round(inp * t),
                          "identity": stride == 1 and inp == oup})
            inp = oup
    return units


def official_shapes(num_classes: int = 1000, width_mult: float = 1.0) -> dict[str, tuple[int, ...]]:
    """The state dict of MBV2_CA(num_classes, width_mult): key -> shape."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(key, out, inp, k, bias=False):
        shapes[f"{key}.weight"] = (out, inp, k, k)
        if bias:
            shapes[f"{key}.bias"] = (out,)

    def bn(key, c):
        shapes.update({f"{key}.{n}": (c,) for n in ("weight", "bias", "running_mean", "running_var")})
        shapes[f"{key}.num_batches_tracked"] = ()

    stem = official_make_divisible(32 * width_mult)
    conv("features.0.0", stem, 3, 3)
    bn("features.0.1", stem)
    for k, u in enumerate(official_units(width_mult), start=1):
        p, hid = f"features.{k}.conv", u["hidden"]
        if u["t"] == 1:
            conv(f"{p}.0", hid, 1, 3), bn(f"{p}.1", hid), conv(f"{p}.3", u["oup"], hid, 1), bn(f"{p}.4", u["oup"])
            continue
        conv(f"{p}.0", hid, u["inp"], 1), bn(f"{p}.1", hid), conv(f"{p}.3", hid, 1, 3), bn(f"{p}.4", hid)
        mip = max(8, hid // CA_GROUPS)
        conv(f"{p}.6.conv1", mip, hid, 1, bias=True), bn(f"{p}.6.bn1", mip)
        conv(f"{p}.6.conv2", hid, mip, 1, bias=True), conv(f"{p}.6.conv3", hid, mip, 1, bias=True)
        conv(f"{p}.7", u["oup"], hid, 1), bn(f"{p}.8", u["oup"])
    last = official_make_divisible(1280 * width_mult) if width_mult > 1.0 else 1280
    conv("conv.0", last, official_units(width_mult)[-1]["oup"], 1)
    bn("conv.1", last)
    shapes["classifier.1.weight"], shapes["classifier.1.bias"] = (num_classes, last), (num_classes,)
    return shapes


# --- our parameter names -> the official ones, spelled out ---

_UNIT_T1 = {"depthwise.0": "conv.0", "depthwise.1": "conv.1", "project.0": "conv.3", "project.1": "conv.4"}
_UNIT_T6 = {"expand.0": "conv.0", "expand.1": "conv.1", "depthwise.0": "conv.3", "depthwise.1": "conv.4",
            "attn_after_spatial.conv1": "conv.6.conv1", "attn_after_spatial.bn1": "conv.6.bn1",
            "attn_after_spatial.conv_h": "conv.6.conv2", "attn_after_spatial.conv_w": "conv.6.conv3",
            "project.0": "conv.7", "project.1": "conv.8"}
_TOP = {"stem.0": "features.0.0", "stem.1": "features.0.1", "head.0": "conv.0", "head.1": "conv.1",
        "fc": "classifier.1"}


def to_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our MobileNetV2 + coord state dict under MBV2_CA's names; every key must map."""
    units = official_units()
    flat = {}  # (stage, index) -> features index
    k = 1
    for s, (_, _, n, _) in enumerate(OFFICIAL_CFGS):
        for i in range(n):
            flat[s, i], k = k, k + 1
    out = {}
    for key, value in state.items():
        module, leaf = key.rsplit(".", 1)
        if module in _TOP:
            out[f"{_TOP[module]}.{leaf}"] = value
            continue
        m = re.fullmatch(r"stages\.(\d+)\.(\d+)\.(.+)", module)
        assert m, f"unmapped key {key}"
        f = flat[int(m[1]), int(m[2])]
        table = _UNIT_T1 if units[f - 1]["t"] == 1 else _UNIT_T6
        assert m[3] in table, f"unmapped key {key}"
        out[f"features.{f}.{table[m[3]]}.{leaf}"] = value
    assert len(out) == len(state)
    return out


# --- the oracle: mbv2_ca.py's forward over official names ---

def _conv(x, sd, key, stride=1, groups=1):
    w = sd[f"{key}.weight"]
    return F.conv2d(x, w, sd.get(f"{key}.bias"), stride, (w.shape[-1] - 1) // 2, 1, groups)


def _bn(x, sd, key):
    """Eval-mode BatchNorm2d: running statistics, eps 1e-5."""
    view = lambda name: sd[f"{key}.{name}"].view(1, -1, 1, 1)  # noqa: E731
    return (x - view("running_mean")) / torch.sqrt(view("running_var") + BN_EPS) * view("weight") + view("bias")


def _relu6(x):
    return x.clamp(0, 6)


def _h_sigmoid(x):
    return _relu6(x + 3) / 6


def _h_swish(x):
    return x * _h_sigmoid(x)


def _coord_att(x, sd, key, gates):
    """mbv2_ca.py lines 51-71."""
    n, c, h, w = x.shape
    x_h = F.adaptive_avg_pool2d(x, (None, 1))  # n, c, h, 1
    x_w = F.adaptive_avg_pool2d(x, (1, None)).permute(0, 1, 3, 2)  # n, c, w, 1
    y = _h_swish(_bn(_conv(torch.cat([x_h, x_w], dim=2), sd, f"{key}.conv1"), sd, f"{key}.bn1"))
    x_h, x_w = torch.split(y, [h, w], dim=2)
    x_w = x_w.permute(0, 1, 3, 2)
    a_h = torch.sigmoid(_conv(x_h, sd, f"{key}.conv2")).expand(-1, -1, h, w)
    a_w = torch.sigmoid(_conv(x_w, sd, f"{key}.conv3")).expand(-1, -1, h, w)
    gates.append((a_h[..., :1], a_w[:, :, :1]))
    return x * a_w * a_h


def official_forward(sd, x, gates=None):
    """MBV2_CA.forward (mbv2_ca.py lines 108-148 and 187-194) in eval mode; appends each CoordAtt's
    (a_h (n, c, h, 1), a_w (n, c, 1, w)) to ``gates``."""
    gates = [] if gates is None else gates
    x = _relu6(_bn(_conv(x, sd, "features.0.0", stride=2), sd, "features.0.1"))
    for k, u in enumerate(official_units(), start=1):
        p, hid = f"features.{k}.conv", u["hidden"]
        if u["t"] == 1:
            y = _relu6(_bn(_conv(x, sd, f"{p}.0", u["stride"], groups=hid), sd, f"{p}.1"))
            y = _bn(_conv(y, sd, f"{p}.3"), sd, f"{p}.4")
        else:
            y = _relu6(_bn(_conv(x, sd, f"{p}.0"), sd, f"{p}.1"))
            y = _relu6(_bn(_conv(y, sd, f"{p}.3", u["stride"], groups=hid), sd, f"{p}.4"))
            y = _coord_att(y, sd, f"{p}.6", gates)
            y = _bn(_conv(y, sd, f"{p}.7"), sd, f"{p}.8")
        x = x + y if u["identity"] else y
    x = _relu6(_bn(_conv(x, sd, "conv.0"), sd, "conv.1"))
    x = F.adaptive_avg_pool2d(x, 1).flatten(1)  # the Dropout(0.1) is the identity in eval mode
    return F.linear(x, sd["classifier.1.weight"], sd["classifier.1.bias"])


# --- the model under test, randomised ---

INPUT = (2, 3, 64, 96)  # H != W at every stage (64x96 ... 2x3): an H/W mix-up shows
TOL = {"rtol": 1e-9, "atol": 1e-9}  # float64; measured at seed 0: max |difference| 2.7e-12, logits up to 9.3
# The gates' spread, in every one of the 16 CoordAtts (measured at seed 0: std >= 0.216, std along the axis
# >= 0.107, >= 55% of the values in (0.1, 0.9); all gates together: std 0.301):
GATE_STD_MIN = 0.15  # std of a_h and of a_w over batch, channels and positions
GATE_POS_STD_MIN = 0.05  # std of a_h along H and of a_w along W, averaged over batch and channels
GATE_MID_MIN = 0.4  # the share of gate values in (0.1, 0.9): spread, yet mostly not saturated


def build(*overrides: str) -> nn.Module:
    """The model train.py would build for ``overrides`` (as tests/test_paper_fidelity.py's ``build``)."""
    cfg = compose_config(*overrides)
    check_config(cfg)
    return build_model(cfg.model, cfg.attention, cfg.attention_extra, cfg.data.num_classes, cfg.data.image_size)


def smooth_images(shape, generator):
    """Low-frequency images plus a little noise, so pooled rows and columns differ from one another."""
    n, c, h, w = shape
    coarse = torch.randn(n, c, h // 8, w // 8, generator=generator, dtype=torch.float64)
    return F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False) + 0.3 * torch.randn(
        shape, generator=generator, dtype=torch.float64)


def randomise(model: nn.Module, generator: torch.Generator) -> None:
    """Random convs (biases included), BN affines and running statistics. Convs N(0, gain^2 / fan_in), gain
    1.5 (1.0 for the gate convs conv_h / conv_w, with N(0, 0.5^2) biases: sigmoid inputs of about one unit).
    Running stats: one train-mode pass (so activations stay in range), then shifted and rescaled at random
    per channel."""
    rand = lambda *s: torch.randn(*s, generator=generator, dtype=torch.float64)  # noqa: E731
    model.double()
    gate_convs = {id(m.conv_h) for m in model.modules() if isinstance(m, CoordAttention)}
    gate_convs |= {id(m.conv_w) for m in model.modules() if isinstance(m, CoordAttention)}
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                gain = 1.0 if id(m) in gate_convs else 1.5
                m.weight.copy_(rand(*m.weight.shape) * gain / fan_in ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(rand(*m.bias.shape) * (0.5 if id(m) in gate_convs else 0.2))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(1 + 0.3 * rand(m.num_features))
                m.bias.copy_(0.2 * rand(m.num_features))
                m.reset_running_stats()
                m.momentum = None  # a cumulative average over the calibration pass
        model.train()
        model(smooth_images((8, *INPUT[1:]), generator))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.add_(0.2 * rand(m.num_features) * m.running_var.sqrt())
                m.running_var.mul_(torch.exp(0.3 * rand(m.num_features)))
                m.momentum = 0.1
    model.eval()


@pytest.fixture(scope="module")
def ca_mbv2():
    """(our model, the input, the oracle's logits, the oracle's gates), randomised with a fixed seed."""
    generator = torch.Generator().manual_seed(0)
    model = build("experiment=ca_mobilenetv2_imagenet")
    randomise(model, generator)
    x = smooth_images(INPUT, generator)
    gates = []
    with torch.no_grad():
        expected = official_forward(to_official(model.state_dict()), x, gates)
    return model, x, expected, gates


def test_ca_mobilenetv2_recipe_has_the_official_structure(ca_mbv2):
    """The recipe's model maps one to one onto MBV2_CA's state dict, with the same shapes (so the same 16
    CoordAtt widths max(8, hidden // 32), the same 1280-wide last conv, 1000 classes), dropout 0.1 as
    mbv2_ca.py line 181, and a gate in every unit with expansion (none in the t = 1 unit)."""
    model = ca_mbv2[0]
    mapped = to_official(model.state_dict())
    assert {k: tuple(v.shape) for k, v in mapped.items()} == official_shapes()
    assert model.dropout.p == 0.1
    assert sum(isinstance(m, CoordAttention) for m in model.modules()) == 16


def test_ca_mobilenetv2_logits_equal_the_official_forward(ca_mbv2):
    model, x, expected, gates = ca_mbv2
    # the gates are far from uniform: over channels and positions, and along their own axis
    assert len(gates) == 16
    for a_h, a_w in gates:
        for a, axis in ((a_h, 2), (a_w, 3)):
            assert a.std() > GATE_STD_MIN, float(a.std())
            assert a.shape[axis] > 1  # at 64x96 the smallest map with a gate is 2x3
            assert a.std(axis).mean() > GATE_POS_STD_MIN, float(a.std(axis).mean())
            assert ((a > 0.1) & (a < 0.9)).double().mean() > GATE_MID_MIN
    with torch.no_grad():
        logits = model(x)
    assert logits.dtype == torch.float64 and logits.shape == (INPUT[0], 1000)
    assert expected.std() > 0.1  # logits that carry signal
    torch.testing.assert_close(logits, expected, **TOL)


def _drop_w_branch(monkeypatch, model):
    monkeypatch.setattr(CoordAttention, "forward", lambda self, x: x * self.gates(x)[0])


def _h_sigmoid_gates(monkeypatch, model):
    """The gates through h_sigmoid instead of the official sigmoid."""
    proxy = types.SimpleNamespace(cat=torch.cat, split=torch.split, sigmoid=F.hardsigmoid)
    monkeypatch.setattr(coord_module, "torch", proxy)


def _sigmoid_in_h_swish(monkeypatch, model):
    """h_swish with sigmoid for its h_sigmoid: x * sigmoid(x) (the ``swish`` mbv2_ca.py defines, unused)."""
    for m in model.modules():
        if isinstance(m, CoordAttention):
            monkeypatch.setitem(m._modules, "act", nn.SiLU())  # setattr's undo would delete a submodule


def _swap_h_and_w_convs(monkeypatch, model):
    for m in model.modules():
        if isinstance(m, CoordAttention):
            conv_h, conv_w = m.conv_h, m.conv_w
            monkeypatch.setitem(m._modules, "conv_h", conv_w)
            monkeypatch.setitem(m._modules, "conv_w", conv_h)


@pytest.mark.parametrize("mutation", [_drop_w_branch, _h_sigmoid_gates, _sigmoid_in_h_swish, _swap_h_and_w_convs],
                         ids=lambda f: f.__name__.strip("_"))
def test_the_comparison_catches_a_broken_coordinate_attention(ca_mbv2, monkeypatch, mutation):
    """The oracle and its randomised weights see each of these mutations, far beyond the tolerance
    (measured at seed 0, max |difference| of the logits: 7.6, 6.0, 6.6, 5.5 in this order)."""
    model, x, expected, _ = ca_mbv2
    mutation(monkeypatch, model)
    with torch.no_grad():
        logits = model(x)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(logits, expected, **TOL)
    assert (logits - expected).abs().max() > 1e-3 * expected.abs().max()
