"""The block/backbone contract: registries drive the tests, the model interface, and models unchanged by refactors."""
import json

import pytest
import torch
from torch import nn

import tests.test_attention as block_tests
import tests.test_backbones as backbone_tests
from models import build_model
from models.attention import ATTENTION_BLOCKS
from models.attention.base import AttentionBlock, Maps, query_index
from models.backbones import BACKBONES, SMALL_OPTIONS, PooledBackbone
from models.layers import AttentionSlots, build_stages, restore_block_inits, stem_slot
from models.placement import POSITIONS, AttentionPlan
from tests.helpers import CONFIG_DIR
from tests.fingerprints import RECORD, cases, fingerprint

# --- every existing model is what it was before the refactor --------------------------------------

RECORDED = json.loads(RECORD.read_text())


@pytest.mark.parametrize("key", sorted(cases()))
def test_built_models_keep_their_names_sizes_initial_weights_and_outputs(key):
    """Recorded by ``tests/fingerprints.py`` at the commit named in the record, before the refactor."""
    expected, got = RECORDED["models"][key], fingerprint(*cases()[key])
    assert got.keys() == expected.keys(), got.get("error")
    exact = {k: v for k, v in expected.items() if k not in ("weight_sum", "weight_abs_sum", "logits")}
    assert {k: got[k] for k in exact} == exact
    if "logits" in expected:
        for name in ("weight_sum", "weight_abs_sum"):
            assert got[name] == pytest.approx(expected[name], rel=1e-9), name
        # float32 rounding differs with the thread count (recorded with 2, test workers run 1): ~1e-5 of the
        # logits' size. Relative to that size: the mobile nets' logits are ~1e-7 (their N(0, 0.01) classifier on
        # small features), where an absolute 1e-5 would pass any forward at all.
        scale = max(abs(v) for v in expected["logits"])
        torch.testing.assert_close(torch.tensor(got["logits"]), torch.tensor(expected["logits"]), rtol=1e-4,
                                   atol=1e-5 * scale)


# --- the model interface the engine asks ---------------------------------------------------------


def small_model(name: str, num_classes: int = 10) -> nn.Module:
    """The registered backbone ``name`` at its small options, eval mode."""
    torch.manual_seed(0)
    return build_model({"name": name, **SMALL_OPTIONS[name]}, {"name": "none"}, num_classes=num_classes).eval()


@pytest.mark.parametrize("name", sorted(SMALL_OPTIONS))
def test_every_backbone_offers_stages_features_intermediates_and_its_classifier(name):
    model = small_model(name)
    x = torch.randn(2, 3, 32, 32)
    assert isinstance(model.stages, nn.ModuleList) and len(model.stages) >= 2
    with torch.no_grad():
        features = model.forward_features(x)
        logits = model(x)
        torch.testing.assert_close(model.forward_head(features), logits)
        assert model.forward_head(features, pre_logits=True).shape == (2, model.num_features)
        final, maps = model.forward_intermediates(x)
        torch.testing.assert_close(final, features)
        assert len(maps) == len(model.stages) and all(m.ndim == 4 and m.shape[0] == 2 for m in maps)
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert [m.shape for m in last_two] == [m.shape for m in maps[-2:]]
        assert model.feature_map(features).ndim in (2, 4)
    classifier = model.get_classifier()
    assert isinstance(classifier, nn.Linear) and classifier.out_features == 10


@pytest.mark.parametrize("name", sorted(SMALL_OPTIONS))
def test_reset_classifier_rebuilds_every_head_under_the_same_names(name):
    model = small_model(name)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    model.reset_classifier(7)
    heads = tuple(f"{n}." for n in model.classifier_names)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    after = {k: v.shape for k, v in model.state_dict().items()}
    assert after.keys() == shapes.keys()
    assert {k for k in after if after[k] != shapes[k]} == {k for k in after if k.startswith(heads)}


@pytest.mark.parametrize("name", sorted(SMALL_OPTIONS))
def test_cam_layer_outputs_a_feature_map_and_parts_cover_the_stages(name):
    model = small_model(name)
    seen = []
    handle = model.cam_layer().register_forward_hook(lambda m, args, out: seen.append(out.shape))
    model(torch.randn(2, 3, 32, 32))
    handle.remove()
    assert len(seen) == 1 and len(seen[0]) == 4
    assert sum(sum(p.numel() for p in part.parameters()) for part in model.parts().values()) > 0


def test_every_backbone_file_registers_a_small_instance_and_every_name_has_a_yaml():
    modules = {getattr(b, "func", b).__module__ for b in BACKBONES.values()}
    small = {getattr(BACKBONES[n], "func", BACKBONES[n]).__module__ for n in SMALL_OPTIONS}
    assert small == modules
    yamls = {p.stem for p in (CONFIG_DIR / "model").glob("*.yaml")}
    assert yamls == set(BACKBONES)


# --- a new block is one file + one registry line: the registry-driven tests pick it up ---------


class ThrowawayGate(AttentionBlock):
    """A spatial gate from a 1x1 conv: stands for a block a user adds."""

    def __init__(self, channels: int, bias: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(channels, 1, 1, bias=bias)

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, 1, H, W) in (0, 1)."""
        return torch.sigmoid(self.conv(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)."""
        return x * self.mask(x)

    def attention_maps(self, x: torch.Tensor, query: tuple[float, float] = (0.5, 0.5)) -> Maps:
        """The gate it applies."""
        return {"gate": ("spatial", self.mask(x)[:, 0])}


def registry_tests(module) -> dict[str, object]:
    """The test functions of ``module`` parametrised by block name (their ``name`` or ``block`` argument)."""
    found = {}
    for attr, fn in vars(module).items():
        marks = getattr(fn, "pytestmark", [])
        if attr.startswith("test_") and any(m.name == "parametrize" and m.args[0] in ("name", "block")
                                             and list(m.args[1]) == sorted(ATTENTION_BLOCKS) for m in marks):
            found[attr] = fn
    return found


def call_with(fn, block_name: str, **fixed) -> str | None:
    """Run one parametrised test function for ``block_name``, its other parameters at their first values;
    the reason it skipped, or None when it ran."""
    values = {}
    for mark in getattr(fn, "pytestmark", []):
        if mark.name != "parametrize":
            continue
        names = [n.strip() for n in mark.args[0].split(",")]
        if names in (["name"], ["block"]):
            values[names[0]] = block_name
        else:
            first = list(mark.args[1])[0]
            values.update(zip(names, first if len(names) > 1 else [first]))
    values.update(fixed)
    try:
        fn(**values)
    except pytest.skip.Exception as skipped:  # a check that does not apply to this block: the caller judges
        return str(skipped)
    return None


def test_a_new_block_runs_through_every_registry_driven_test(monkeypatch):
    tests = {**registry_tests(block_tests), **registry_tests(backbone_tests)}  # found before the block joins
    monkeypatch.setitem(ATTENTION_BLOCKS, "throwaway", ThrowawayGate)
    assert len(tests) >= 5, sorted(tests)  # shapes, bf16, compile, maps, the backbone matrix, ...
    skipped = {}
    for name, fn in tests.items():
        if name == "test_every_backbone_runs_every_block_at_its_default_position_at_32x32":
            for backbone in sorted(SMALL_OPTIONS):
                skipped[f"{name}[{backbone}]"] = call_with(fn, "throwaway", backbone=backbone)
        else:
            skipped[name] = call_with(fn, "throwaway")
    skipped = {name: reason for name, reason in skipped.items() if reason is not None}
    assert set(skipped) <= MAY_SKIP_A_NEW_BLOCK, f"skipped for a new block: {skipped}"


# The registry-driven tests that do not apply to a block timm has no module for; every other one must run.
MAY_SKIP_A_NEW_BLOCK = {"test_block_equals_its_timm_twin"}


# --- a new backbone is one file: shared layers, the interface, one registration -----------------


class ThrowawayUnit(nn.Module):
    """conv-BN-ReLU with a shortcut where shapes allow, and every map position."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, factories: dict):
        super().__init__()
        self.out_channels = out_channels
        self.use_shortcut = stride == 1 and in_channels == out_channels
        slots = AttentionSlots(factories, shortcut=self.use_shortcut)
        self.attn_pre = slots.at("pre", in_channels)
        self.conv = slots.spatial(in_channels, out_channels, stride,
                                  lambda: nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False))
        self.bn = nn.BatchNorm2d(out_channels)
        self.attn_after_spatial = slots.at("after_spatial", out_channels)
        self.attn_standard = slots.at("standard", out_channels)
        self.attn_identity = slots.at("identity", out_channels)
        self.attn_post = slots.at("post", out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C_in, H, W) -> (B, C_out, H/stride, W/stride)."""
        out = self.attn_standard(self.attn_after_spatial(torch.relu(self.bn(self.conv(self.attn_pre(x))))))
        if self.use_shortcut:
            out = out + self.attn_identity(x)
        return self.attn_post(out)


class ThrowawayNet(PooledBackbone):
    """Stem conv -> two stages of ``ThrowawayUnit`` -> the pooled head."""

    def __init__(self, num_classes: int = 10, attention=(), width: int = 16):
        super().__init__()
        depths = (2, 2)
        plan = AttentionPlan(attention, "throwaway_net", depths, positions=POSITIONS)
        self.attach_input(plan.input(), 3)
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.attn_stem = stem_slot(plan.stem(), width)
        stages, _, self.num_features = build_stages(depths, width, lambda s, i, c: ThrowawayUnit(
            c, width * s, 2 if i == 0 and s > 1 else 1, plan.unit(s, i)))
        self.stages = nn.ModuleList(stages)
        self.attach_head(plan.head())
        self.build_head(num_classes)
        restore_block_inits(self)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) -> (B, width, H, W)."""
        return self.attn_stem(self.stem(x))


def test_a_new_backbone_runs_through_every_registry_driven_test(monkeypatch):
    monkeypatch.setitem(BACKBONES, "throwaway_net", ThrowawayNet)
    monkeypatch.setitem(SMALL_OPTIONS, "throwaway_net", {"width": 16})
    for name in ("se", "mhsa", "stn", "eca"):
        backbone_tests.test_every_backbone_runs_every_block_at_its_default_position_at_32x32("throwaway_net", name)
    test_every_backbone_offers_stages_features_intermediates_and_its_classifier("throwaway_net")
    test_reset_classifier_rebuilds_every_head_under_the_same_names("throwaway_net")
    test_cam_layer_outputs_a_feature_map_and_parts_cover_the_stages("throwaway_net")
    model = build_model({"name": "throwaway_net"}, {"name": "eca", "position": "identity"})
    assert sum(isinstance(m, ATTENTION_BLOCKS["eca"]) for m in model.modules()) == 3  # units with a shortcut


def test_query_index_picks_the_same_image_point_at_every_resolution():
    assert query_index(8, 8, (0.5, 0.25)) == (4, 2) and query_index(16, 16, (0.5, 0.25)) == (8, 4)
    assert query_index(5, 5, (1.0, 1.0)) == (4, 4)


def test_the_shared_position_constants_are_the_placement_positions():
    from models.attention.base import MAP_POSITIONS, SPATIAL_POSITIONS

    assert MAP_POSITIONS | SPATIAL_POSITIONS == set(POSITIONS) and not MAP_POSITIONS & SPATIAL_POSITIONS
    assert all(cls.positions in (MAP_POSITIONS, SPATIAL_POSITIONS) for cls in ATTENTION_BLOCKS.values())
