"""Mutation check: do the tests notice the mistakes a careful implementer could make?

Usage: python scripts/mutation_check.py [--only NAME[,NAME]] [--list] [--check-apply] [--json PATH] [-j N]

Each mutation below is one such mistake (a dropped mask or scale, the wrong pooling axis or kind, a missing
activation, (1 + M) T -> M T, a wrong init, a wrong loss weight, an off-by-one in a schedule or in the
per-sample randomness ...): a snippet of one file, the text that replaces it, the tests that should fail
because of it, and a probe, a few lines that print the module's output at the paper's settings.

The mutations are applied one at a time to temporary copies of the repository (its tracked files and the
untracked ones git does not ignore; the venv stays where it is and runs everything). For each: the snippet
must occur exactly once ("no longer applies" otherwise); the probe's output in the mutated copy must differ
from the unmutated copy's ("equivalent (bad mutation)" otherwise, since no test could kill it); then the
named tests run in the mutated copy (``python -m pytest -x -q``, one torch thread): "killed" names the first
failing test, "survived" means they all passed. Before that the named tests run once on the unmutated copy:
a test that fails or is missing there leaves its mutations "not checked" rather than falsely killed.

``--check-apply`` only checks that every snippet applies and every probe differs (no tests: a few minutes).
The table printed at the end is markdown, for docs/testing.md.
"""
import argparse
import concurrent.futures
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from _project import use_project

ROOT = use_project()  # before the project's own imports

from engine.files import write_atomically  # noqa: E402
from errors import WriteError  # noqa: E402


@dataclass(frozen=True)
class Mutation:
    """One named mistake: ``original`` in ``file`` becomes ``replacement``; ``tests`` should then fail.

    ``tests`` are pytest node ids (or files), ``select`` an optional ``-k`` expression over them; ``probe``
    is Python run in the copy's root that prints the affected output (``show(...)`` prints a digest of
    tensors, arrays and plain values).
    """

    name: str
    file: str
    original: str
    replacement: str
    breaks: str
    tests: tuple[str, ...]
    probe: str
    select: str | None = None


# --- probes shared by several mutations ------------------------------------------------------------

def _block_probe(construct: str, shape: tuple[int, ...], setup: str = "", mode: str = "eval",
                 module: str = "models.attention") -> str:
    """A probe printing the digest of a block's output for a seeded random input of ``shape``."""
    return (f"import torch\nfrom {module} import {construct.split('(')[0]}\ntorch.manual_seed(0)\n"
            f"block = {construct}\n{setup}show(block.{mode}()(torch.randn{shape}))\n")


def _model_probe(model_cfg: str) -> str:
    """A probe printing the eval logits (and parameter count) of a model built as the tests build it."""
    return ("import torch\nfrom models import build_model\ntorch.manual_seed(0)\n"
            f"model = build_model({model_cfg}, {{'name': 'none'}}, num_classes=10).eval()\n"
            "show(model(torch.randn(2, 3, 32, 32)), sum(p.numel() for p in model.parameters()))\n")


RANDOM_WEIGHTS = ("with torch.no_grad():\n    for p in block.parameters():  # the zero inits hide the branch\n"
                  "        p.normal_(0, 0.1)\n")
GAMMAS_ONE = ("with torch.no_grad():\n    for name, p in block.named_parameters():\n"
              "        if 'gamma' in name:\n            p.fill_(1.0)  # a trained gamma: attention weighs in\n")
SMALL_VOLO = ("{'name': 'volo_d1', 'stem': 'cifar', 'img_size': 32, 'layers': (1, 1, 1, 1), "
              "'embed_dims': (32, 64, 64, 64), 'num_heads': (2, 4, 4, 4)}")
MIX_TOKEN_FORWARD = (
    "import numpy as np\nimport torch\nfrom models import build_model\ntorch.manual_seed(0)\n"
    f"model = build_model({{**{SMALL_VOLO}, 'mix_token': True}}, {{'name': 'none'}}, num_classes=5).train()\n"
    "x = torch.randn(4, 3, 32, 32)\nnp.random.seed(7)  # a real box, as the fidelity test's seed\n"
    "out = model(x)\nshow(out.logits, out.token_logits, out.box)\n")
MIX_TOKEN_LOSS = (
    "import torch\nfrom torch import nn\nfrom engine.losses import MixTokenLoss\n"
    "from models.backbones.volo import TokenMixOutput\ntorch.manual_seed(0)\n"
    "output = TokenMixOutput(torch.randn(4, 5), torch.randn(4, 16, 5), (1, 0, 3, 3))\n"
    "show(MixTokenLoss(nn.CrossEntropyLoss(), 5, 0.1)(output, torch.tensor([0, 3, 3, 1])))\n")
AGCNN_BOXES = (
    "import torch\nfrom models.backbones.agcnn import attention_boxes\ntorch.manual_seed(0)\n"
    "features = torch.relu(torch.randn(4, 16, 8, 8))  # post-ReLU, as ResNet-50's and DenseNet-121's last maps\n"
    "show(attention_boxes(features, (32, 32)))\n")
AGCNN_STAGES = (
    "from models import build_model\n"
    "model = build_model({'name': 'agcnn', 'backbone': 'resnet20', 'stem': 'cifar', 'img_size': 32}, "
    "{'name': 'none'}, num_classes=3)\n"
    "show(model.phase_epochs(8), [model.set_epoch(e, 8) for e in range(1, 9)], model.phase_epochs(10))\n")
PHASED_LRS = (
    "from torch import nn\nfrom engine.optim import build_optimizer, build_scheduler\n"
    "from tests.helpers import compose_config\n"
    "opt = build_optimizer(nn.Linear(2, 2), compose_config('optim.lr=0.1').optim)\n"
    "sched = build_scheduler(opt, compose_config('sched=cosine').sched, 8, steps_per_epoch=2, phase_epochs=[4, 2, 2])\n"
    "lrs = []\nfor step in range(16):\n    sched.step_update(step)\n    lrs.append(opt.param_groups[0]['lr'])\n"
    "show(lrs)\n")
CROP_PARAMS = ("import numpy as np\nfrom data.randomness import crop_flip_params\n"
               "show(crop_flip_params(0, 1, np.arange(64), 32, 32, 32, 4, True))  # CIFAR: pad 4, crop 32, flip\n")
SAMPLE_DRAWS = ("from data.randomness import sample_seed, uniforms\n"
                "show(uniforms(3, 2, [5, 9, 1000], 4), [sample_seed(0, 1, i) for i in range(4)])\n")
RESIDENT_BATCHES = (
    "import torch\nfrom data.in_memory import ResidentImages, ResidentLoader\nfrom data.samplers import EpochOrder\n"
    "from data.transforms import CropFlip\ntorch.manual_seed(0)\n"
    "data = ResidentImages(torch.randint(0, 256, (12, 3, 8, 8), dtype=torch.uint8), torch.arange(12))\n"
    "order = EpochOrder(12, seed=3)\norder.set_epoch(2)\n"
    "loader = ResidentLoader(data, order, 5, [0.5] * 3, [0.25] * 3, CropFlip(8, 2, True), seed=3)\n"
    "show([x for x, _ in loader])\n")

# The test files the mutations name, and the tests several of them name.
ATT, BONES, FIDELITY = "tests/test_attention.py", "tests/test_backbones.py", "tests/test_paper_fidelity.py"
CONTRACT, LOOP, INPUTS = "tests/test_contract.py", "tests/test_loop.py", "tests/test_inputs.py"
OFFICIAL = "tests/test_official_forwards.py"
FINGERPRINT = f"{CONTRACT}::test_built_models_keep_their_names_sizes_initial_weights_and_outputs"
TWIN = f"{ATT}::test_block_equals_its_timm_twin"
IDENTITY = f"{ATT}::test_blocks_that_start_as_the_identity"
SASA_EQUATION = f"{FIDELITY}::test_sasa_is_the_papers_local_attention_at_every_position_borders_included"

MUTATIONS: tuple[Mutation, ...] = (
    # --- attention blocks ------------------------------------------------------------------------
    Mutation("se_squeeze_by_max", "models/attention/se.py",
             "s = x.mean((2, 3), keepdim=True)  # B, C, 1, 1", "s = x.amax((2, 3), keepdim=True)  # B, C, 1, 1",
             "SE squeezes by max pooling, not global average pooling",
             (f"{TWIN}[se]", f"{FINGERPRINT}[resnet20/se]"), _block_probe("SqueezeExcite(64)", (2, 64, 7, 7))),
    Mutation("se_no_relu", "models/attention/se.py",
             "return self.gate(self.fc2(self.act(self.fc1(s))))", "return self.gate(self.fc2(self.fc1(s)))",
             "SE's excitation loses the ReLU between its two FCs",
             (f"{TWIN}[se]",), _block_probe("SqueezeExcite(64)", (2, 64, 7, 7))),
    Mutation("cbam_channel_avg_only", "models/attention/cbam.py",
             "return torch.sigmoid(avg + mx)", "return torch.sigmoid(avg)",
             "CBAM's channel gate drops its max-pooled descriptor",
             (f"{TWIN}[cbam]", f"{FINGERPRINT}[resnet20/cbam_pre]"), _block_probe("CBAM(64)", (2, 64, 7, 7))),
    Mutation("cbam_spatial_bn_scale_one", "models/attention/cbam.py",
             "            nn.init.zeros_(self.spatial.bn.weight)", "            nn.init.ones_(self.spatial.bn.weight)",
             "CBAM's spatial gate BN scale starts at 1, not the official 0 (a uniform 0.5 gate)",
             (f"{ATT}::test_cbam_spatial_gates_start_as_the_official_code_sets_them",),
             _block_probe("CBAM(64)", (2, 64, 7, 7), mode="train")),
    Mutation("eca_kernel_rounded_down", "models/attention/eca.py",
             "return t if t % 2 else t + 1", "return t if t % 2 else t - 1",
             "ECA's adaptive kernel size made odd by rounding down (k = 3 at 256 channels, not 5)",
             (f"{ATT}::test_eca_picks_timms_and_the_papers_kernel_sizes",
              f"{ATT}::test_eca_resnet50_adds_a_handful_of_parameters"),
             _block_probe("ECA(256)", (2, 256, 4, 4))),
    Mutation("gc_sigmoid_pooling", "models/attention/gc.py",
             "return F.softmax(self.conv_mask(x).view(b, 1, h * w), dim=-1)",
             "return torch.sigmoid(self.conv_mask(x).view(b, 1, h * w))",
             "GC's attention pooling weighs positions by a sigmoid, not a softmax over HW",
             (f"{TWIN}[gc]",), _block_probe("GlobalContext(64)", (2, 64, 6, 7), RANDOM_WEIGHTS)),
    Mutation("gc_last_conv_not_zeroed", "models/attention/gc.py",
             "        nn.init.zeros_(self.transform[-1].weight)\n", "",
             "GC's last transform conv keeps its random init: the block no longer starts as the identity",
             (f"{IDENTITY}[GlobalContext]", f"{FINGERPRINT}[resnet20/gc_after_spatial]"),
             _block_probe("GlobalContext(64)", (2, 64, 6, 7), mode="train")),
    Mutation("coord_gates_swapped", "models/attention/coord.py",
             "return torch.sigmoid(self.conv_h(y_h)), torch.sigmoid(self.conv_w(y_w.transpose(2, 3)))",
             "return torch.sigmoid(self.conv_w(y_h)), torch.sigmoid(self.conv_h(y_w.transpose(2, 3)))",
             "coordinate attention's H and W convs applied to the other axis",
             (f"{TWIN}[coord]", f"{FINGERPRINT}[resnet20/coord]"), _block_probe("CoordAttention(64)", (2, 64, 6, 8))),
    Mutation("coord_relu_for_hswish", "models/attention/coord.py",
             "self.act = nn.Hardswish()", "self.act = nn.ReLU()",
             "coordinate attention's shared transform uses ReLU, not the paper's h-swish",
             (f"{TWIN}[coord]",), _block_probe("CoordAttention(64)", (2, 64, 6, 8))),
    Mutation("simam_variance_over_hw", "models/attention/simam.py",
             "n = max(x.shape[2] * x.shape[3] - 1, 1)", "n = max(x.shape[2] * x.shape[3], 1)",
             "SimAM's variance divides by HW, not the paper's n = HW - 1",
             (f"{ATT}::test_simam_is_parameter_free_and_follows_its_energy",
              f"{FIDELITY}::test_simam_basic_unit_is_the_official_forward"),
             _block_probe("SimAM(8)", (2, 8, 5, 4))),
    Mutation("triplet_zeroes_the_wrong_gate", "models/attention/triplet.py",
             "            nn.init.zeros_(self.hw.bn.weight)", "            nn.init.zeros_(self.ch.bn.weight)",
             "triplet attention zeroes the C-W gate's BN scale instead of the H-W gate's",
             (f"{FIDELITY}::test_triplet_zeroes_only_the_hw_gates_bn_scale_as_the_official_resnets",),
             _block_probe("TripletAttention(16)", (2, 16, 6, 5), mode="train")),
    Mutation("triplet_sum_not_average", "models/attention/triplet.py",
             "return (out_h + out_w + self.hw(x)) / 3", "return out_h + out_w + self.hw(x)",
             "triplet attention sums its three branches instead of averaging them",
             (f"{ATT}::test_triplet_attention_has_three_7x7_gates_and_averages_them",
              f"{FIDELITY}::test_triplet_attention_is_the_official_forward"),
             _block_probe("TripletAttention(16)", (2, 16, 6, 5))),
    Mutation("nonlocal_unscaled_logits", "models/attention/non_local.py",
             "self.scale = scale if scale is not None else 1 / math.sqrt(key_width)",
             "self.scale = scale if scale is not None else 1.0",
             "non-local's softmax logits lose the released code's d^-1/2 scale",
             (f"{FIDELITY}::test_non_local_defaults_are_the_released_codes",
              f"{ATT}::test_non_local_query_map_is_the_row_of_its_attention_matrix"),
             _block_probe("NonLocal(64)", (2, 64, 6, 8), "with torch.no_grad():\n    block.bn.weight.normal_()\n")),
    Mutation("nonlocal_bn_gamma_one", "models/attention/non_local.py",
             "        nn.init.zeros_(self.bn.weight)\n", "",
             "non-local's BN gamma starts at 1: the block no longer starts as the identity",
             (f"{FIDELITY}::test_non_local_defaults_are_the_released_codes", f"{IDENTITY}[NonLocalembedded_gaussian]"),
             _block_probe("NonLocal(64)", (2, 64, 6, 8), mode="train")),
    Mutation("criss_cross_self_counted_twice", "models/attention/criss_cross.py",
             '        e_col = e_col.masked_fill(self_mask, float("-inf"))'
             '  # the position itself counts once, in its row\n',
             "", "criss-cross attention drops the self mask: each position is attended in its row and its column",
             (f"{FIDELITY}::test_cca_gives_the_position_itself_no_weight_in_its_column_and_its_share_in_its_row",
              f"{FIDELITY}::test_rcca_head_is_the_official_rcca_module"),
             _block_probe("CrissCrossAttention(32)", (2, 32, 6, 7), GAMMAS_ONE)),
    Mutation("danet_pam_scaled", "models/attention/danet.py",
             "out = F.scaled_dot_product_attention(q, k, v, scale=1.0)",
             "out = F.scaled_dot_product_attention(q, k, v)",
             "DANet's position attention takes SDPA's default d^-1/2 scale; the official PAM is unscaled",
             (f"{FIDELITY}::test_danet_head_is_the_official_danet_head",),
             _block_probe("DualAttention(32)", (2, 32, 5, 6), GAMMAS_ONE)),
    Mutation("danet_cam_no_max_subtraction", "models/attention/danet.py",
             "        energy = energy.amax(-1, keepdim=True) - energy  # as the official code\n", "",
             "DANet's channel attention softmaxes the Gram matrix itself, not max(energy) - energy",
             (f"{FIDELITY}::test_danet_head_is_the_official_danet_head",),
             _block_probe("DualAttention(32)", (2, 32, 5, 6), GAMMAS_ONE)),
    Mutation("residual_attention_m_times_t", "models/attention/residual_attention.py",
             "return self.last((1 + self.mask_branch(first, trunk)) * trunk)",
             "return self.last(self.mask_branch(first, trunk) * trunk)",
             "the Attention Module outputs M * T, not attention residual learning's (1 + M) * T",
             (f"{FIDELITY}::test_the_attention_module_is_wired_as_the_prototxts_attention_a",
              f"{FINGERPRINT}[attention56/none]"),
             _block_probe("ResidualAttention(16, levels=2)", (2, 16, 12, 12))),
    Mutation("residual_attention_interp_corners", "models/attention/residual_attention.py",
             'return F.interpolate(x, size=like.shape[2:], mode="bilinear", align_corners=True)',
             'return F.interpolate(x, size=like.shape[2:], mode="bilinear", align_corners=False)',
             "the soft mask upsamples without Caffe Interp's aligned corners",
             (f"{FIDELITY}::test_the_attention_module_is_wired_as_the_prototxts_attention_a",),
             _block_probe("ResidualAttention(16, levels=2)", (2, 16, 12, 12))),
    Mutation("residual_attention_pool_floor", "models/attention/residual_attention.py",
             "return F.max_pool2d(x, 3, 2, ceil_mode=True) if min(x.shape[2:]) > 1 else x",
             "return F.max_pool2d(x, 3, 2, ceil_mode=False) if min(x.shape[2:]) > 1 else x",
             "the soft mask's 3x3 / 2 max-pool rounds down, not up as Caffe (56 -> 27, not 28)",
             (f"{FIDELITY}::test_attention_modules_pool_three_two_one_times_down_to_7x7",
              f"{FIDELITY}::test_the_attention_module_is_wired_as_the_prototxts_attention_a"),
             _block_probe("ResidualAttention(16, levels=2)", (2, 16, 12, 12))),
    Mutation("stn_sampling_corners", "models/attention/stn.py",
             "return F.grid_sample(x.float(), self.grid(x), align_corners=False).to(x.dtype)",
             "return F.grid_sample(x.float(), self.grid(x), align_corners=True).to(x.dtype)",
             "STN samples with align_corners unlike its grid: the identity theta no longer copies the map",
             (f"{IDENTITY}[SpatialTransformer]",), _block_probe("SpatialTransformer(8)", (2, 8, 6, 6))),
    Mutation("stn_identity_as_2x2", "models/attention/stn.py",
             "torch.tensor([1.0, 0, 0, 0, 1, 0])", "torch.tensor([1.0, 0, 0, 1, 0, 0])",
             "STN's initial theta written as a 2x2 matrix then a shift: not the identity transform",
             (f"{ATT}::test_stn_starts_at_the_identity_transform", f"{IDENTITY}[SpatialTransformer]"),
             _block_probe("SpatialTransformer(8)", (2, 8, 6, 6))),
    Mutation("mhsa_relative_logits_unscaled", "models/attention/mhsa.py",
             "return self.position_bias(q * self.dim ** -0.5, h, w).to(q.dtype) if self.rel_h is not None else None",
             "return self.position_bias(q, h, w).to(q.dtype) if self.rel_h is not None else None",
             "MHSA's relative-position logits lose BoTNet's d^-1/2 scale",
             (f"{FIDELITY}::test_mhsa_is_timms_bottleneck_attention_with_copied_weights",),
             _block_probe("MultiHeadSelfAttention2d(32, 32, heads=4)", (2, 32, 6, 6), "block.fit_to_map(6, 6)\n")),
    Mutation("mhsa_relative_offset_reversed", "models/attention/mhsa.py",
             "offset = idx.view(1, -1) - idx.view(-1, 1) + size - 1",
             "offset = idx.view(-1, 1) - idx.view(1, -1) + size - 1",
             "MHSA reads its relative tables at query - key instead of key - query",
             (f"{ATT}::test_mhsa_position_bias_follows_relative_offsets",
              f"{FIDELITY}::test_mhsa_is_timms_bottleneck_attention_with_copied_weights"),
             _block_probe("MultiHeadSelfAttention2d(32, 32, heads=4)", (2, 32, 6, 6), "block.fit_to_map(6, 6)\n")),
    Mutation("sasa_row_offset_lost", "models/attention/sasa.py",
             "self.rel_row.unsqueeze(2).expand(-1, -1, self.k).reshape(d // 2, kk),",
             "self.rel_row.unsqueeze(1).expand(-1, self.k, -1).reshape(d // 2, kk),",
             "SASA's row-offset half of the relative embedding is indexed by the column offset",
             (SASA_EQUATION,), _block_probe("LocalSelfAttention(16, 16, heads=2)", (1, 16, 9, 9))),
    Mutation("sasa_padding_not_masked", "models/attention/sasa.py",
             'return torch.softmax(logits.masked_fill(~inside, float("-inf")), dim=-1), v',
             "return torch.softmax(logits, dim=-1), v",
             "SASA attends to the zero padding outside the map (its mask dropped)",
             (SASA_EQUATION, f"{ATT}::test_block_maps_are_well_formed[sasa]"),
             _block_probe("LocalSelfAttention(16, 16, heads=2)", (1, 16, 5, 5))),
    Mutation("outlook_unscaled_softmax", "models/attention/outlook.py",
             "return torch.softmax(a * self.scale, dim=-1)", "return torch.softmax(a, dim=-1)",
             "outlook attention's generated weights lose their d^-1/2 scale before the softmax",
             (f"{ATT}::test_outlook_attention_matches_timms_volo",),
             _block_probe("OutlookAttention(64, heads=2, stride=2)", (2, 7, 9, 64),
                          module="models.attention.outlook")),
    # --- backbones -------------------------------------------------------------------------------
    Mutation("resnet_stride_in_1x1_inverted", "models/backbones/resnet.py",
             "stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)",
             "stride_1x1, stride_3x3 = (1, stride) if stride_in_1x1 else (stride, 1)",
             "the bottleneck strides in its 1x1 by default (Caffe's ResNet), not torchvision's 3x3 (v1.5)",
             (f"{FINGERPRINT}[resnet50/none]", f"{BONES}::test_resnet50_is_torchvision_resnet50"),
             _model_probe("{'name': 'resnet50', 'stem': 'cifar'}")),
    Mutation("resnet_relu_before_add", "models/backbones/resnet.py",
             "out = self.bn2(self.attn_spatial_prenorm(self.conv2(out)))",
             "out = self.relu(self.bn2(self.attn_spatial_prenorm(self.conv2(out))))",
             "the basic unit activates its residual branch before the add",
             (f"{FIDELITY}::test_simam_basic_unit_is_the_official_forward", f"{FINGERPRINT}[resnet20/none]"),
             _model_probe("{'name': 'resnet20'}")),
    Mutation("mobilenetv2_activated_projection", "models/backbones/mobilenetv2.py",
             "self.project = nn.Sequential(nn.Conv2d(hidden, out_channels, 1, bias=False), "
             "nn.BatchNorm2d(out_channels))",
             "self.project = nn.Sequential(nn.Conv2d(hidden, out_channels, 1, bias=False), "
             "nn.BatchNorm2d(out_channels), nn.ReLU6(inplace=True))",
             "MobileNetV2's projection gets a ReLU6: no longer the paper's linear bottleneck",
             (f"{OFFICIAL}::test_ca_mobilenetv2_logits_equal_the_official_forward", f"{FINGERPRINT}[mobilenetv2/none]"),
             _model_probe("{'name': 'mobilenetv2', 'stem': 'cifar', 'width_mult': 0.35}")),
    Mutation("mobilenext_activated_reduction", "models/backbones/mobilenext.py",
             "self.reduce = nn.Sequential(nn.Conv2d(in_channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden))",
             "self.reduce = nn.Sequential(nn.Conv2d(in_channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden),"
             " nn.ReLU6(inplace=True))",
             "the sandglass's 1x1 reduction gets a ReLU6: no longer linear as the paper's",
             (f"{FINGERPRINT}[mobilenext/none]",),
             _model_probe("{'name': 'mobilenext', 'stem': 'cifar', 'width_mult': 0.35}")),
    Mutation("mobilenext_reduced_width_rounded_to_8", "models/backbones/mobilenext.py",
             "hidden = make_divisible(math.ceil(out_channels / 6), 16)",
             "hidden = make_divisible(math.ceil(out_channels / 6), 8)",
             "the sandglass's raised reduction width is rounded to a multiple of 8, not the official 16",
             (f"{BONES}::test_mobilenext_parameters_follow_the_official_code_at_every_width[1.0]",),
             _model_probe("{'name': 'mobilenext', 'stem': 'cifar', 'width_mult': 0.35}")),
    Mutation("densenet_transition_max_pool", "models/backbones/densenet.py",
             "self.pool = nn.AvgPool2d(2, stride=2)", "self.pool = nn.MaxPool2d(2, stride=2)",
             "DenseNet's transitions max-pool instead of average-pooling",
             (f"{FINGERPRINT}[densenet121/none]",), _model_probe("{'name': 'densenet121', 'stem': 'cifar'}")),
    Mutation("volo_aux_tokens_averaged", "models/backbones/volo.py",
             "return self.head(features[:, 0]) + 0.5 * self.aux_head(features[:, 1:]).max(dim=1).values",
             "return self.head(features[:, 0]) + 0.5 * self.aux_head(features[:, 1:]).mean(dim=1)",
             "VOLO's prediction adds the mean of the token head, not token labelling's max",
             (f"{FINGERPRINT}[volo_d1/none]",), _model_probe(SMALL_VOLO)),
    Mutation("ran_mask_levels_off_by_one", "models/backbones/residual_attention_net.py",
             "units += [AttentionStageModule(out, 4 - s, ", "units += [AttentionStageModule(out, 5 - s, ",
             "Attention-56/92's soft masks pool 4, 3, 2 times instead of 3, 2, 1 (to 4x4, not 7x7)",
             (f"{FIDELITY}::test_attention_modules_pool_three_two_one_times_down_to_7x7",
              f"{FINGERPRINT}[attention56/none]"),
             _model_probe("{'name': 'attention56', 'stem': 'cifar', 'width': 8}")),
    Mutation("agcnn_heat_by_mean", "models/backbones/agcnn.py",
             "heat = feature_map.float().abs().amax(dim=1, keepdim=True)",
             "heat = feature_map.float().abs().mean(dim=1, keepdim=True)",
             "AG-CNN's heat map averages the channels instead of taking max_k |f_k|",
             (f"{BONES}::test_attention_box_is_the_largest_region_above_tau", f"{FINGERPRINT}[agcnn/none]"),
             AGCNN_BOXES),
    Mutation("agcnn_box_end_inclusive", "models/backbones/agcnn.py",
             "boxes.append((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1))",
             "boxes.append((xs.min(), ys.min(), xs.max(), ys.max()))",
             "AG-CNN's crop box ends at its last pixel, not one past it (the crop loses a row and a column)",
             (f"{BONES}::test_attention_box_is_the_largest_region_above_tau",), AGCNN_BOXES),
    # --- VOLO's MixToken: the forward and token labelling's loss ---------------------------------------
    Mutation("mix_token_box_unscaled", "models/backbones/volo.py",
             "swap_box(tokens, mix_box, MIX_SCALE))", "swap_box(tokens, mix_box))",
             "MixToken swaps the box drawn on the pooled grid without scaling it to stage 1's tokens",
             (f"{FIDELITY}::test_mix_token_is_the_official_volo_forward",), MIX_TOKEN_FORWARD),
    Mutation("mix_token_logits_not_swapped_back", "models/backbones/volo.py",
             "token_logits = swap_box(token_logits.reshape(b, *grid, k), box).reshape(b, n, k)",
             "token_logits = token_logits.reshape(b, *grid, k).reshape(b, n, k)",
             "MixToken's token logits stay with the mixed images instead of returning to their own",
             (f"{FIDELITY}::test_mix_token_is_the_official_volo_forward",), MIX_TOKEN_FORWARD),
    Mutation("mix_token_loss_dense_weight_one", "engine/losses.py",
             "CLS_WEIGHT, DENSE_WEIGHT = 1.0, 0.5", "CLS_WEIGHT, DENSE_WEIGHT = 1.0, 1.0",
             "token labelling's token loss weighs 1, not the official --dense-weight 0.5",
             (f"{FIDELITY}::test_mix_token_loss_is_token_labellings_cross_entropy",), MIX_TOKEN_LOSS),
    Mutation("mix_token_loss_lam_is_box_share", "engine/losses.py",
             "lam = 1.0 - (bottom - top) * (right - left) / n", "lam = (bottom - top) * (right - left) / n",
             "MixToken's class target weighs its own image by the box's share instead of the rest's",
             (f"{FIDELITY}::test_mix_token_loss_is_token_labellings_cross_entropy",), MIX_TOKEN_LOSS),
    # --- AG-CNN's phased training ------------------------------------------------------------------
    Mutation("agcnn_stage_boundary_off_by_one", "models/backbones/agcnn.py",
             "return min(int(np.searchsorted(ends, epoch - 0.5)), 2)",
             "return min(int(np.searchsorted(ends, epoch + 0.5)), 2)",
             "AG-CNN switches stage one epoch early (phases 3, 2, 3 of 8 epochs, not 4, 2, 2)",
             (f"{LOOP}::test_agcnn_restarts_the_lr_schedule_in_each_of_its_stages",
              f"{BONES}::test_agcnn_trains_in_three_stages"), AGCNN_STAGES),
    Mutation("phased_schedule_not_restarted", "engine/optim.py",
             "self.schedulers[phase].step_update(num_updates - self.starts[phase])",
             "self.schedulers[phase].step_update(num_updates)",
             "the phased scheduler runs each phase's schedule from the run's start, not the phase's",
             (f"{LOOP}::test_agcnn_restarts_the_lr_schedule_in_each_of_its_stages",), PHASED_LRS),
    # --- the input path: crops, flips and the per-sample randomness -----------------------------------
    Mutation("crop_offsets_miss_the_last", "data/randomness.py",
             "tops = np.floor(u[:, 0] * (height + 2 * padding - size + 1)).astype(np.int64)",
             "tops = np.floor(u[:, 0] * (height + 2 * padding - size)).astype(np.int64)",
             "the random crop never takes the last row offset (0..7 of the padded 40, not 0..8)",
             (f"{INPUTS}::test_crop_offsets_and_flips_cover_what_random_crop_and_flip_allow",), CROP_PARAMS),
    Mutation("crop_left_reuses_top_draw", "data/randomness.py",
             "lefts = np.floor(u[:, 1] * (width + 2 * padding - size + 1)).astype(np.int64)",
             "lefts = np.floor(u[:, 0] * (width + 2 * padding - size + 1)).astype(np.int64)",
             "the crop's column offset reuses the row offset's draw: only diagonal shifts",
             (f"{INPUTS}::test_crop_offsets_and_flips_cover_what_random_crop_and_flip_allow",
              f"{INPUTS}::test_uniforms_are_a_function_of_seed_epoch_and_index_alone"), CROP_PARAMS),
    Mutation("uniforms_ignore_epoch", "data/randomness.py",
             "draws = _hash(seed, epoch, index, np.arange(count, dtype=np.uint64)[None, :])",
             "draws = _hash(seed, index, np.arange(count, dtype=np.uint64)[None, :])",
             "every epoch draws the same crops and flips (the per-sample hash leaves out the epoch)",
             (f"{INPUTS}::test_uniforms_are_a_function_of_seed_epoch_and_index_alone",), SAMPLE_DRAWS),
    Mutation("sample_seed_ignores_index", "data/randomness.py",
             "return int(_hash(seed, epoch, index, 2**32) >> np.uint64(1))",
             "return int(_hash(seed, epoch, 2**32) >> np.uint64(1))",
             "every image of an epoch gets the same RandAugment and erasing draws (the seed leaves out the index)",
             (f"{INPUTS}::test_uniforms_are_a_function_of_seed_epoch_and_index_alone",), SAMPLE_DRAWS),
    Mutation("library_rngs_leave_torch_seeded", "data/randomness.py",
             "        torch.default_generator.set_state(saved[2])\n", "",
             "a library augmentation leaves torch's global generator at the sample's seed (dropout, mixup follow)",
             (f"{INPUTS}::test_library_augmentations_draw_from_the_sample_and_leave_the_global_rngs_alone",),
             "import torch\nfrom data.randomness import library_rngs\ntorch.manual_seed(1)\n"
             "with library_rngs(123):\n    inside = torch.rand(3)\nshow(inside, torch.rand(3))\n"),
    Mutation("tensor_path_flips_vertically", "data/transforms.py",
             "cols = torch.where(flipped, cols.flip(1), cols)", "rows = torch.where(flipped, rows.flip(1), rows)",
             "the tensor-resident path flips batches upside down, not left to right",
             (f"{INPUTS}::test_tensor_path_gives_the_pil_paths_pixels_for_the_same_seed",),
             "import torch\nfrom data.transforms import CropFlip\n"
             "images = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6)\n"
             "show(CropFlip(6, 1, True).batch(images, torch.tensor([0, 2]), torch.tensor([1, 2]), "
             "torch.tensor([True, False])))\n"),
    Mutation("tensor_path_crops_keyed_by_position", "data/in_memory.py",
             "for p in self.crop.params(self.seed, keys[0][1], indices, height, width)]",
             "for p in self.crop.params(self.seed, keys[0][1], np.arange(len(indices)), height, width)]",
             "the tensor-resident path keys each crop by its place in the epoch, not the sample's index",
             (f"{INPUTS}::test_tensor_path_gives_the_pil_paths_pixels_for_the_same_seed",), RESIDENT_BATCHES),
    Mutation("tensor_path_not_scaled_to_1", "data/in_memory.py",
             "x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()", "x = x.float()",
             "the tensor-resident path normalises 0..255 pixels (ToTensor's division by 255 left out)",
             (f"{INPUTS}::test_tensor_path_gives_the_pil_paths_pixels_for_the_same_seed",), RESIDENT_BATCHES),
    Mutation("resized_crop_fallback_not_centred", "data/randomness.py",
             "left = np.where(missed, (widths - fb_w) // 2, left)", "left = np.where(missed, 0, left)",
             "RandomResizedCrop's fallback crop sits at the left edge, not the centre",
             (f"{INPUTS}::test_resized_crop_boxes_follow_the_scale_and_ratio_or_fall_back_to_the_centre",),
             "import numpy as np\nfrom data.randomness import resized_crop_boxes\n"
             "show(resized_crop_boxes(1, 1, np.arange(50), np.full(50, 10), np.full(50, 1000), scale=(0.9, 1.0)))\n"),
)


# --- copies of the repository --------------------------------------------------------------------

def repository_files(root: Path) -> list[str]:
    """The tracked files and the untracked ones git does not ignore, relative to ``root`` (never the venv)."""
    listed = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, text=True, check=True).stdout
    names = sorted({n for n in listed.split("\0") if n})
    # a tracked file deleted in the working tree is listed but absent; the venv is ignored, excluded all the same
    return [n for n in names if (root / n).is_file() and not n.startswith(".venv/")]


def make_copy(root: Path, files: Sequence[str], parent: Path) -> Path:
    """A copy of ``files`` under ``parent``, beside a link to ``root``'s sibling ``shared`` (the tests' data)."""
    copy = parent / root.name
    for name in files:
        target = copy / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, target)
    shared = root.parent / "shared"
    if shared.is_dir():  # tests/helpers.py finds the shared CIFAR-10 copy at ROOT.parent / "shared"
        (parent / "shared").symlink_to(shared)
    return copy


@contextmanager
def applied(copy: Path, mutation: Mutation) -> Iterator[int]:
    """Apply ``mutation`` to ``copy`` for the block's duration; yields how often the snippet occurs (applied
    only when exactly once), and puts the file back afterwards."""
    path = copy / mutation.file
    text = path.read_text() if path.is_file() else ""
    count = text.count(mutation.original)
    if count != 1:
        yield count
        return
    path.write_text(text.replace(mutation.original, mutation.replacement, 1))
    try:
        yield count
    finally:
        path.write_text(text)


# --- running probes and tests in a copy ---------------------------------------------------------------

def hooks_module(root: Path) -> str:
    """The ``ATTNLAB_TEST_HOOKS`` value tests/conftest.py sets (read from it, so the two cannot drift)."""
    found = re.search(r"""environ\["ATTNLAB_TEST_HOOKS"\]\s*=\s*["']([\w.]+)["']""",
                      (root / "tests" / "conftest.py").read_text())
    return found.group(1) if found else "tests.faults"


def child_env(hooks: str) -> dict[str, str]:
    """The environment of every probe and pytest process: one thread, no bytecode, the test hooks."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTEST_ADDOPTS", "PYTEST_XDIST_WORKER")}
    # Written bytecode could outlive a mutation: a file restored within the same second with the same size
    # would match the mutant's .pyc header and run the mutant's code.
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1", PYTHONHASHSEED="0",
               ATTNLAB_TEST_HOOKS=hooks)
    return env


@dataclass
class Finished:
    """A child process's exit status and output; ``returncode`` is None when it ran past its time limit."""

    returncode: int | None
    output: str
    seconds: float


def run_child(args: list[str], cwd: Path, env: dict[str, str], timeout: float, stdin: str = "") -> Finished:
    """Run ``args`` in its own process group; past ``timeout`` seconds the group is killed."""
    start = time.monotonic()
    proc = subprocess.Popen(args, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(stdin, timeout=timeout)
        return Finished(proc.returncode, output, time.monotonic() - start)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # this process's own group: pytest and anything it started
        output, _ = proc.communicate()
        return Finished(None, output, time.monotonic() - start)


# Runs probes in one interpreter, each in a fresh namespace with ``show``; prints one JSON list of results.
PROBE_DRIVER = r'''
import contextlib, io, json, sys, traceback

def _digest(value):
    """One line for a tensor, an array, a number or a list of them."""
    import numpy as np
    import torch
    if isinstance(value, np.ndarray):
        value = torch.as_tensor(np.asarray(value, dtype=np.float64))
    if isinstance(value, torch.Tensor):
        t = value.detach().double().flatten()
        scale = t.abs().sum().item()
        if scale == 0:
            return f"zeros{tuple(value.shape)}"
        # relative to the magnitude, so float rounding noise stays below the printed digits; the
        # position-weighted sum tells a permutation (a swapped box, a flipped crop) from the original
        weights = torch.linspace(1.0, 2.0, t.numel(), dtype=torch.float64)
        return (f"{tuple(value.shape)} |x|={scale:.6g} sum={t.sum().item() / scale:.6f} "
                f"pos={(t * weights).sum().item() / scale:.6f}")
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_digest(v) for v in value) + "]"
    return repr(value)

def show(*values):
    """Print the digests of ``values`` on one line: what a probe compares."""
    print(" ".join(_digest(v) for v in values))

results = []
for source in json.load(sys.stdin):
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(source, "<probe>", "exec"), {"__name__": "__probe__", "show": show})
        results.append({"output": out.getvalue()})
    except BaseException:
        results.append({"error": traceback.format_exc(limit=-2).strip().splitlines()[-1]})
sys.stdout.write("\n@@probes@@" + json.dumps(results))
'''


@dataclass
class ProbeResult:
    """What a probe printed, or the last line of the error it raised."""

    output: str | None = None
    error: str | None = None

    def summary(self) -> str:
        """One line for the report."""
        return f"raises {self.error}" if self.error is not None else (self.output or "").strip()[:200]


def run_probes(copy: Path, probes: Sequence[str], env: dict[str, str], timeout: float) -> list[ProbeResult]:
    """Run ``probes`` in one interpreter in ``copy``; a crash or a timeout fails every probe with its reason."""
    done = run_child([sys.executable, "-c", PROBE_DRIVER], copy, env, timeout, json.dumps(list(probes)))
    if done.returncode is None:
        return [ProbeResult(error=f"timed out after {timeout:.0f} s")] * len(probes)
    _, marker, payload = done.output.rpartition("@@probes@@")
    if not marker:
        last = done.output.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
        return [ProbeResult(error=f"the probe process failed: {last[0]}")] * len(probes)
    return [ProbeResult(**r) for r in json.loads(payload)]


@dataclass
class TestRun:
    """One pytest run: its exit status (None: timed out), the failing node ids in order, the counts."""

    returncode: int | None
    failed: list[str]
    counts: dict[str, int]
    missing: list[str]
    tail: str
    seconds: float


SUMMARY_LINE = re.compile(r"^(?:FAILED|ERROR) (.+?)(?: - .*)?$")
NOT_FOUND = re.compile(r"^ERROR: (?:not found|file or directory not found): (.+?)\s*$")
COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)")


def run_tests(copy: Path, tests: Sequence[str], select: str | None, env: dict[str, str], timeout: float,
              first_failure: bool) -> TestRun:
    """``python -m pytest -q`` on ``tests`` in ``copy`` (``-x`` when ``first_failure``), parsed."""
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", *(["-x"] if first_failure else []),
            *tests, *(["-k", select] if select else [])]
    done = run_child(args, copy, env, timeout)
    lines = done.output.splitlines()
    failed = [m.group(1) for m in map(SUMMARY_LINE.match, lines) if m]
    prefix = f"{copy}{os.sep}"  # pytest names a missing test by its absolute path
    missing = [m.group(1).removeprefix(prefix) for m in map(NOT_FOUND.match, lines) if m]
    counts: dict[str, int] = {}
    for line in reversed(lines):  # the last line that counts anything is pytest's summary
        found = COUNT.findall(line)
        if found:
            counts = {kind.rstrip("s") if kind.startswith("error") else kind: int(n) for n, kind in found}
            break
    return TestRun(done.returncode, failed, counts, missing, "\n".join(lines[-15:]), done.seconds)


def belongs(node: str, selection: str) -> bool:
    """Whether the test ``node`` is one that the pytest argument ``selection`` selects."""
    return node == selection or node.startswith((selection + "::", selection + "[")) or \
        (selection.endswith(".py") and node.startswith(selection))


# --- checking mutations -------------------------------------------------------------------------------

@dataclass
class Outcome:
    """What happened to one mutation: ``status`` is one of STATUSES; ``killer`` the first failing test."""

    name: str
    file: str
    breaks: str
    tests: list[str]
    status: str
    killer: str = ""
    detail: str = ""
    seconds: float = 0.0

    def result(self) -> str:
        """The table's result cell."""
        text = {"killed": "killed", "survived": "**survived**", "equivalent": "equivalent (bad mutation)",
                "no longer applies": "no longer applies", "probe error": "probe error", "not checked": "not checked",
                "applies": "applies, probe differs"}[self.status]
        return f"{text} ({self.detail})" if self.detail and self.status != "killed" else text


STATUSES = ("killed", "survived", "equivalent", "no longer applies", "probe error", "not checked", "applies")


@dataclass
class Baseline:
    """The unmutated copy's probe results by mutation name, and which selected tests fail or are missing there."""

    probes: dict[str, ProbeResult]
    failing: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


def outcome(mutation: Mutation, status: str, killer: str = "", detail: str = "", seconds: float = 0.0) -> Outcome:
    """An Outcome for ``mutation``."""
    return Outcome(mutation.name, mutation.file, mutation.breaks, list(mutation.tests), status, killer, detail, seconds)


def unusable_tests(mutation: Mutation, baseline: Baseline) -> str:
    """Why the mutation's tests cannot judge it (they fail or are missing on the unmutated code), or ''."""
    for test in mutation.tests:
        if any(belongs(test, m) for m in baseline.missing):  # pytest names the argument it could not find
            return f"{test} not found"
        broken = [f for f in baseline.failing if belongs(f, test)]
        if broken:
            return f"{broken[0]} fails (or times out) on the unmutated code"
    return ""


def judge(run: TestRun, timeout: float) -> tuple[str, str, str]:
    """(status, killer, detail) from the mutated copy's test run."""
    if run.returncode is None:
        return "killed", f"timeout after {timeout:.0f} s", ""
    if run.failed:
        return "killed", run.failed[0], ""
    if run.returncode == 0:
        if not run.counts.get("passed"):
            return "not checked", "", f"no selected test ran: {run.counts or 'none collected'}"
        skipped = run.counts.get("skipped")
        return "survived", "", f"{run.counts['passed']} passed" + (f", {skipped} skipped" if skipped else "")
    if run.returncode == 5:
        return "not checked", "", "pytest collected no test"
    # interrupted before any test (an import the mutant broke, a conftest error): the mutant is noticed
    last = [line for line in run.tail.splitlines() if line.strip()][-1:] or [f"exit status {run.returncode}"]
    return "killed", f"pytest exit {run.returncode}: {last[0].strip()[:120]}", ""


def check_one(copy: Path, mutation: Mutation, baseline: Baseline, env: dict[str, str], check_only: bool,
              timeout: float) -> Outcome:
    """Apply ``mutation`` to ``copy``, compare its probe with the unmutated one, then run its tests."""
    start = time.monotonic()
    with applied(copy, mutation) as count:
        if count != 1:
            return outcome(mutation, "no longer applies", detail=f"snippet found {count} times in {mutation.file}")
        before = baseline.probes[mutation.name]
        if before.error is not None:
            return outcome(mutation, "probe error", detail=f"unmutated: {before.summary()}")
        after, = run_probes(copy, [mutation.probe], env, timeout)
        if after.output == before.output and after.error is None:
            return outcome(mutation, "equivalent", detail=f"probe prints {before.summary()[:80]}",
                           seconds=time.monotonic() - start)
        # a mutant whose probe raises is not equivalent, but the report says so: the probe saw a crash, not a value
        raised = f"the mutant's probe {after.summary()}" if after.error is not None else ""
        if check_only:
            return outcome(mutation, "applies", detail=raised, seconds=time.monotonic() - start)
        reason = unusable_tests(mutation, baseline)
        if reason:
            return outcome(mutation, "not checked", detail=reason, seconds=time.monotonic() - start)
        run = run_tests(copy, mutation.tests, mutation.select, env, timeout, first_failure=True)
    status, killer, detail = judge(run, timeout)
    return outcome(mutation, status, killer, "; ".join(d for d in (detail, raised) if d), time.monotonic() - start)


def run_baseline(copy: Path, mutations: Sequence[Mutation], env: dict[str, str], check_only: bool,
                 timeout: float) -> Baseline:
    """Every probe on the unmutated copy (one interpreter), then, unless ``check_only``, every selected test."""
    results = run_probes(copy, [m.probe for m in mutations], env, timeout * 2)
    baseline = Baseline({m.name: r for m, r in zip(mutations, results)})
    if check_only:
        return baseline
    groups: dict[str | None, list[str]] = {}  # a -k expression filters every test of its run: one run per expression
    for m in mutations:
        groups.setdefault(m.select, [])
        groups[m.select] += [t for t in m.tests if t not in groups[m.select]]
    for select, tests in groups.items():
        while tests:
            run = run_tests(copy, tests, select, env, timeout * 4, first_failure=False)
            print(f"baseline: {len(tests)} test selections on the unmutated copy: {run.counts or run.tail[-200:]} "
                  f"({run.seconds:.0f} s)", file=sys.stderr, flush=True)
            baseline.failing += tests if run.returncode is None else run.failed  # timed out: none can judge
            if not run.missing:  # pytest refuses the whole run when one id is unknown: retry without those
                break
            baseline.missing += run.missing
            kept = [t for t in tests if not any(belongs(t, m) for m in run.missing)]
            if len(kept) == len(tests):  # a missing name that matches none of ours: no run can judge these
                baseline.failing += tests
                break
            tests = kept
    return baseline


# --- report ------------------------------------------------------------------------------------------

def cell(text: str) -> str:
    """``text`` safe inside a markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(outcomes: Sequence[Outcome]) -> str:
    """The report: one row a mutation."""
    rows = ["| mutation | file | what it breaks | result | killing test |", "|---|---|---|---|---|"]
    for o in outcomes:
        killer = f"`{cell(o.killer)}`" if o.killer else "—"
        rows.append(f"| `{o.name}` | `{o.file}` | {cell(o.breaks)} | {cell(o.result())} | {killer} |")
    return "\n".join(rows)


def listing(mutations: Sequence[Mutation]) -> str:
    """``--list``: every mutation with its file and the tests that should kill it."""
    rows = ["| mutation | file | what it breaks | tests |", "|---|---|---|---|"]
    for m in mutations:
        tests = "<br>".join(f"`{cell(t)}`" for t in m.tests) + (f" `-k {cell(m.select)}`" if m.select else "")
        rows.append(f"| `{m.name}` | `{m.file}` | {cell(m.breaks)} | {tests} |")
    return "\n".join(rows)


def tally(outcomes: Sequence[Outcome]) -> str:
    """``N killed, M survived, ...`` over the statuses that occur."""
    counts = {s: sum(o.status == s for o in outcomes) for s in STATUSES}
    return ", ".join(f"{n} {s}" for s, n in counts.items() if n)


def write_json(path: Path, outcomes: Sequence[Outcome], mode: str, seconds: float) -> None:
    """The machine-readable report, written whole or not at all."""
    record = {"mode": mode, "seconds": round(seconds, 1), "tally": tally(outcomes),
              "mutations": [asdict(o) | {"seconds": round(o.seconds, 1)} for o in outcomes]}
    write_atomically(path, lambda f: f.write((json.dumps(record, indent=1) + "\n").encode()),
                     elsewhere="give --json another path")


# --- main ------------------------------------------------------------------------------------------------

def chosen(only: str | None) -> list[Mutation]:
    """The mutations ``--only`` names (all without it), in the table's order; exits on an unknown name."""
    if not only:
        return list(MUTATIONS)
    names = [n.strip() for n in only.split(",") if n.strip()]
    known = {m.name for m in MUTATIONS}
    unknown = [n for n in names if n not in known]
    if unknown:
        sys.exit(f"error: unknown mutation(s) {', '.join(unknown)}; --list shows the {len(known)} names")
    return [m for m in MUTATIONS if m.name in names]


def check_all(mutations: Sequence[Mutation], jobs: int, check_only: bool, timeout: float) -> list[Outcome]:
    """Copy the repository ``jobs`` times, take the baseline in the first copy, then check the mutations."""
    env = child_env(hooks_module(ROOT))
    files = repository_files(ROOT)
    with tempfile.TemporaryDirectory(prefix="attnlab-mutants-") as scratch:
        copies = [make_copy(ROOT, files, Path(scratch) / f"w{i}") for i in range(max(1, jobs))]
        baseline = run_baseline(copies[0], mutations, env, check_only, timeout)
        free: queue.Queue[Path] = queue.Queue()
        for copy in copies:
            free.put(copy)

        def work(mutation: Mutation) -> Outcome:
            """Check one mutation in whichever copy is free (each copy holds one mutant at a time)."""
            copy = free.get()
            try:
                return check_one(copy, mutation, baseline, env, check_only, timeout)
            finally:
                free.put(copy)

        outcomes: list[Outcome] = []
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(copies)) as pool:
            for i, result in enumerate(pool.map(work, mutations), start=1):
                outcomes.append(result)
                killer = f" by {result.killer}" if result.killer else ""
                print(f"[{i}/{len(mutations)}] {result.name}: {result.result()}{killer} ({result.seconds:.0f} s)",
                      file=sys.stderr, flush=True)
    return outcomes


def main(argv: list[str]) -> int:
    """Check the chosen mutations (or list them) and print the markdown table; 1 if any is not killed."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", metavar="NAME[,NAME]", help="check only these mutations")
    parser.add_argument("--list", action="store_true", help="list the mutations, files and tests; run nothing")
    parser.add_argument("--check-apply", action="store_true",
                        help="only check that every snippet applies once and every probe's output changes")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the report as JSON")
    parser.add_argument("-j", "--jobs", type=int, default=1, help="mutations checked at once, one copy each (1)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds for one mutation's tests (600)")
    args = parser.parse_args(argv)
    mutations = chosen(args.only)
    if args.list:
        print(listing(mutations))
        print(f"\n{len(mutations)} mutations")
        return 0
    start = time.monotonic()
    outcomes = check_all(mutations, args.jobs, args.check_apply, args.timeout)
    seconds = time.monotonic() - start
    print(markdown_table(outcomes))
    print(f"\n{len(outcomes)} mutations in {seconds:.0f} s: {tally(outcomes)}")
    if args.json:
        try:
            write_json(args.json, outcomes, "check-apply" if args.check_apply else "full", seconds)
        except WriteError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    good = "applies" if args.check_apply else "killed"
    return 0 if all(o.status == good for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
