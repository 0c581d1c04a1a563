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
