"""VOLO with a pluggable stage-1 token mixer and attention plug points.

Paper: "VOLO: Vision Outlooker for Visual Recognition", Yuan, Hou, Jiang, Feng, Yan, TPAMI 2022.
https://arxiv.org/abs/2106.13112 . Reference code: https://github.com/sail-sg/volo

Layout as the official code and timm's ``volo_d1_224`` ... ``volo_d5_224``, with timm's module names,
so a timm VOLO state dict loads here strictly and ours into timm (no attention blocks added):
a conv stem (7x7 stride 2, two 3x3, BN-ReLU) and a patch projection (8x8 tokens at 224), stage 1 of
Outlookers (outlook attention K=3, padding 1, stride 2, MLP ratio 3) on 28x28 tokens, a 2x2
patch-merging downsample, the absolute position embedding, stages 2-4 of Transformer blocks (MHSA +
MLP) on 14x14 tokens, two class-attention layers on a class token, LayerNorm and the head, whose
prediction adds 0.5 x the max over tokens of the auxiliary token head (token labelling's inference
rule, as in timm). Stochastic depth grows linearly over all blocks but, as in the official code and
timm, the Outlooker stage and the class-attention layers have none.

``mix_token=True`` trains with MixToken as the official forward: after the patch embedding, a box
(area share 1 - lam, lam ~ Beta(1, 1), drawn on the last stage's token grid and scaled by the 2x2
downsample) takes each image's tokens from the batch's mirror image (``flip(0)``); the token logits
are swapped back, so each is its own image's, and the forward returns ``TokenMixOutput`` for the
loss (``engine.losses.MixTokenLoss``). The dense targets of token labelling (an annotator model's
per-token scores) are not part of attnlab: each token's target is its image's label. Evaluation is
unchanged.

The CIFAR stem runs the conv stem at stride 1 with a 2x2 patch projection, so 32x32 images give
16x16 tokens in stage 1 and 8x8 after the downsample.

``mixer`` swaps stage 1's token mixer, the paper's ablation: ``outlook``; ``local_sa`` (multi-head
self-attention over each token's K x K neighbourhood, K = 3, then a projection); ``conv`` (the
outlook layout with a static K x K depthwise kernel in place of the generated weights: value
projection, depthwise conv, projection); ``mhsa`` (global multi-head self-attention).
"""
import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, resample_abs_pos_embed_nhwc, trunc_normal_
from torch import nn

from models.attention.outlook import OutlookAttention
from models.attention.sasa import LocalSelfAttention
from models.backbones.base import Backbone, register_backbone
from models.layers import AttentionSlots, check_stem, build_stages, restore_block_inits, stem_slot
from models.placement import AttentionPlan, AttentionSpec

# Where attention blocks go in a VOLO unit: x -> pre -> [norm1, mixer] -> after_spatial -> add ->
# [norm2, MLP] -> standard -> add -> post; replace_spatial replaces the mixer; stem follows the patch embedding.
VOLO_POSITIONS = ("pre", "after_spatial", "replace_spatial", "standard", "post", "input", "stem")
MIXERS = ("outlook", "local_sa", "conv", "mhsa")

# Variants: blocks per stage, widths, heads, MLP ratio, stem width (timm's volo_d*_224 arguments).
VARIANTS = {
    "volo_d1": dict(layers=(4, 4, 8, 2), embed_dims=(192, 384, 384, 384), num_heads=(6, 12, 12, 12)),
    "volo_d2": dict(layers=(6, 4, 10, 4), embed_dims=(256, 512, 512, 512), num_heads=(8, 16, 16, 16)),
    "volo_d3": dict(layers=(8, 8, 16, 4), embed_dims=(256, 512, 512, 512), num_heads=(8, 16, 16, 16)),
    "volo_d4": dict(layers=(8, 8, 16, 4), embed_dims=(384, 768, 768, 768), num_heads=(12, 16, 16, 16)),
    "volo_d5": dict(layers=(12, 12, 20, 4), embed_dims=(384, 768, 768, 768), num_heads=(12, 16, 16, 16),
                    mlp_ratio=4.0, stem_hidden_dim=128),
}


MIX_TOKEN_BETA = 1.0  # the official code's Beta(1, 1) for MixToken's lam
MIX_SCALE = 2  # stage 1's grid over the last stage's (the 2x2 downsample): the official pooling_scale


class TokenMixOutput(NamedTuple):
    """A MixToken training forward: class-token logits (B, K), token logits (B, N, K) each of its own image,
    and the box (top, left, bottom, right) on the last stage's token grid whose tokens came from ``flip(0)``."""

    logits: torch.Tensor
    token_logits: torch.Tensor
    box: tuple[int, int, int, int]


def draw_token_box(height: int, width: int, beta: float = MIX_TOKEN_BETA) -> tuple[int, int, int, int]:
    """MixToken's box on a height x width grid, as token labelling's ``rand_bbox``: side shares sqrt(1 - lam)
    with lam ~ Beta(beta, beta), a uniform centre, clipped at the borders (numpy's global generator, whose
    state checkpoints hold)."""
    cut = math.sqrt(1.0 - np.random.beta(beta, beta))
    cut_h, cut_w = int(height * cut), int(width * cut)
    centre_h, centre_w = np.random.randint(height), np.random.randint(width)
    top, bottom = (int(np.clip(centre_h + d, 0, height)) for d in (-(cut_h // 2), cut_h // 2))
    left, right = (int(np.clip(centre_w + d, 0, width)) for d in (-(cut_w // 2), cut_w // 2))
    return top, left, bottom, right


def swap_box(x: torch.Tensor, box: tuple[int, int, int, int], scale: int = 1) -> torch.Tensor:
    """x (B, H, W, C) with the box (scaled by ``scale``) taken from ``x.flip(0)``: the batch's mirror image."""
    top, left, bottom, right = (scale * v for v in box)
    mixed = x.clone()
    mixed[:, top:bottom, left:right] = x.flip(0)[:, top:bottom, left:right]
    return mixed


class SelfAttention(nn.Module):
    """Global multi-head self-attention on (B, H, W, C) tokens (timm's names: qkv, proj)."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool = False):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, C) -> (B, H, W, C)."""
        b, h, w, c = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(*qkv.unbind(0))  # B, heads, HW, C/heads
        return self.proj(out.transpose(1, 2).reshape(b, h, w, c))


class LocalSelfAttentionMixer(nn.Module):
    """Multi-head self-attention over each token's K x K neighbourhood, then a projection."""

    def __init__(self, dim: int, heads: int, kernel_size: int = 3):
        super().__init__()
        self.attn = LocalSelfAttention(dim, dim, 1, kernel_size=kernel_size, heads=heads)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, C) -> (B, H, W, C)."""
        return self.proj(self.attn(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class ConvMixer(nn.Module):
    """Outlook attention's layout with a learned static kernel: value projection, K x K depthwise conv, projection."""

    def __init__(self, dim: int, kernel_size: int = 3, qkv_bias: bool = False):
        super().__init__()
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.conv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, C) -> (B, H, W, C)."""
        return self.proj(self.conv(self.v(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


def build_mixer(mixer: str, dim: int, heads: int, qkv_bias: bool = False) -> nn.Module:
    """Stage 1's token mixer by name (see the module docstring)."""
    if mixer == "outlook":
        return OutlookAttention(dim, heads, kernel_size=3, padding=1, stride=2, qkv_bias=qkv_bias)
    if mixer == "local_sa":
        return LocalSelfAttentionMixer(dim, heads, kernel_size=3)
    if mixer == "conv":
        return ConvMixer(dim, kernel_size=3, qkv_bias=qkv_bias)
    if mixer == "mhsa":
        return SelfAttention(dim, heads, qkv_bias)
    raise ValueError(f"mixer='{mixer}' is not a token mixer; valid mixers: {', '.join(MIXERS)}")


class VoloBlock(nn.Module):
    """x + mixer(LN(x)), then x + MLP(LN(x)): an Outlooker or a Transformer block, by its mixer.

    Args:
        dim: token width.
        mixer: the token mixer on (B, H, W, C).
        mlp_ratio: MLP hidden width / dim.
        drop_path: stochastic depth rate of both branches.
        slots: the unit's attention blocks (``VOLO_POSITIONS``), on tokens.
    """

    def __init__(self, dim: int, mixer: nn.Module, mlp_ratio: float, drop_path: float = 0.0,
                 slots: AttentionSlots | None = None):
        super().__init__()
        slots = slots or AttentionSlots(tokens=True)
        self.out_channels = dim
        self.attn_pre = slots.at("pre", dim)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = slots.spatial(dim, dim, 1, lambda: mixer)
        self.attn_after_spatial = slots.at("after_spatial", dim)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.attn_standard = slots.at("standard", dim)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.attn_post = slots.at("post", dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, C) -> (B, H, W, C)."""
        x = x + self.drop_path1(self.attn_after_spatial(self.attn(self.norm1(self.attn_pre(x)))))
        x = x + self.drop_path2(self.attn_standard(self.mlp(self.norm2(x))))
        return self.attn_post(x)


class ClassAttention(nn.Module):
    """The class token attends to all tokens (CaiT's class attention; timm's names: kv, q, proj)."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool = False):
        super().__init__()
        self.heads = heads
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 1 + N, C), class token first -> the class token's update (B, 1, C)."""
        b, n, c = x.shape
        k, v = self.kv(x).reshape(b, n, 2, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        q = self.q(x[:, :1]).reshape(b, 1, self.heads, c // self.heads).transpose(1, 2)  # B, heads, 1, C/heads
        out = F.scaled_dot_product_attention(q, k, v)  # B, heads, 1, C/heads
        return self.proj(out.transpose(1, 2).reshape(b, 1, c))


class ClassBlock(nn.Module):
    """Class attention + MLP, updating only the class token."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, qkv_bias: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ClassAttention(dim, heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 1 + N, C) -> (B, 1 + N, C), the tokens after the first unchanged."""
        cls = x[:, :1] + self.attn(self.norm1(x))
        cls = cls + self.mlp(self.norm2(cls))
        return torch.cat([cls, x[:, 1:]], dim=1)


class PatchEmbed(nn.Module):
    """Conv stem (7x7, 3x3, 3x3 with BN-ReLU) then a non-overlapping patch projection."""

    def __init__(self, in_chans: int, hidden_dim: int, embed_dim: int, stem_stride: int, patch: int):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_chans, hidden_dim, 7, stem_stride, 3, bias=False), nn.BatchNorm2d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden_dim, hidden_dim, 3, 1, 1, bias=False), nn.BatchNorm2d(hidden_dim), nn.ReLU(inplace=True),
            nn.Conv2d(hidden_dim, hidden_dim, 3, 1, 1, bias=False), nn.BatchNorm2d(hidden_dim), nn.ReLU(inplace=True),
        )
        self.proj = nn.Conv2d(hidden_dim, embed_dim, patch, patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) -> (B, embed_dim, H/r, W/r)."""
        return self.proj(self.conv(x))


class Downsample(nn.Module):
    """2x2 patch merging between stage 1 and stage 2."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.out_channels = out_dim
        self.proj = nn.Conv2d(in_dim, out_dim, 2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, C_in) -> (B, H/2, W/2, C_out)."""
        return self.proj(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class VOLO(Backbone):
    """Patch embedding -> stage 1 (token mixer blocks) -> downsample -> position embedding ->
    stages 2-4 (Transformer blocks) -> class attention -> norm -> head (+ auxiliary token head).

    Args:
        num_classes: size of the heads.
        attention: parsed attention specs; ``position: default`` means ``post`` (after a unit).
        layers, embed_dims, num_heads: per stage.
        mlp_ratio: MLP hidden width / dim, every stage.
        stem_hidden_dim: conv stem width.
        img_size: training image size; sets the position embedding grid (other sizes resample it).
        stem: ``imagenet`` (8x8 tokens) or ``cifar`` (2x2 tokens).
        mixer: stage 1's token mixer, one of ``MIXERS``.
        drop_path_rate: stochastic depth at the last Transformer block.
        qkv_bias: biases in the attention projections (False in every VOLO variant).
        in_chans: input image channels.
        mix_token: train with MixToken (the forward then returns ``TokenMixOutput`` in training mode).
    """

    classifier_names = ("head", "aux_head")

    def __init__(self, num_classes: int = 1000, attention: Sequence[AttentionSpec] = (),
                 layers: Sequence[int] = (4, 4, 8, 2), embed_dims: Sequence[int] = (192, 384, 384, 384),
                 num_heads: Sequence[int] = (6, 12, 12, 12), mlp_ratio: float = 3.0, stem_hidden_dim: int = 64,
                 img_size: int = 224, stem: str = "imagenet", mixer: str = "outlook", drop_path_rate: float = 0.0,
                 qkv_bias: bool = False, in_chans: int = 3, mix_token: bool = False, name: str = "volo"):
        super().__init__()
        check_stem(stem)
        if mixer not in MIXERS:
            raise ValueError(f"mixer='{mixer}' is not a token mixer; valid mixers: {', '.join(MIXERS)}")
        patch = 8 if stem == "imagenet" else 2
        self.patch, self.mix_token = patch, mix_token
        if img_size % (patch * 2):
            raise ValueError(f"img_size={img_size} must be a multiple of {patch * 2} for the {stem} stem")
        plan = AttentionPlan(attention, name, layers, positions=VOLO_POSITIONS, gate_position="standard")
        self.attach_input(plan.input(), in_chans)
        self.patch_embed = PatchEmbed(in_chans, stem_hidden_dim, embed_dims[0], 2 if stem == "imagenet" else 1,
                                      patch // 2 if stem == "imagenet" else patch)
        self.attn_stem = stem_slot(plan.stem(), embed_dims[0], tokens=True)
        grid = img_size // patch // 2
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dims[-1]))
        total = sum(layers)

        def make_unit(s: int, i: int, dim: int) -> nn.Module:
            """Unit i of stage s: stage 1 mixes with ``mixer``, the others with global self-attention."""
            heads = num_heads[s - 1]
            if s == 1:  # the official code gives the first stage no stochastic depth
                unit_mixer, rate = build_mixer(mixer, dim, heads, qkv_bias), 0.0
            else:
                unit_mixer = SelfAttention(dim, heads, qkv_bias)
                rate = drop_path_rate * (i + sum(layers[:s - 1])) / (total - 1)
            # built even where a block replaces it: a seed then draws the same weights for the rest of the network
            return VoloBlock(dim, unit_mixer, mlp_ratio, rate, AttentionSlots(plan.unit(s, i), tokens=True))

        def make_transition(s: int, dim: int) -> nn.Module | None:
            """The 2x2 patch merging into stage 2."""
            return Downsample(dim, embed_dims[1]) if s == 2 else None

        stages, transitions, _ = build_stages(layers, embed_dims[0], make_unit, make_transition)
        # [stage 1, downsample, stage 2, stage 3, stage 4]: timm's indices, so its state dicts load
        self.network = nn.ModuleList([stages[0], transitions[2], *stages[1:]])
        # the four stages as a list, built once and kept out of the module tree (no second state-dict name)
        object.__setattr__(self, "_stage_list", nn.ModuleList(stages))
        self.token_map = nn.Identity()  # the last stage's tokens as a feature map, for Grad-CAM
        self.num_features = embed_dims[-1]
        self.post_network = nn.ModuleList([ClassBlock(self.num_features, num_heads[-1], mlp_ratio, qkv_bias)
                                           for _ in range(2)])
        self.cls_token = nn.Parameter(torch.zeros(1, 1, self.num_features))
        self.aux_head = nn.Linear(self.num_features, num_classes)
        self.norm = nn.LayerNorm(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        """The official init: truncated normal (std 0.02) linears, embeddings and class token; then blocks' own."""
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        restore_block_inits(self)

    @property
    def stages(self) -> nn.ModuleList:
        """The four stages (the downsample between the first two is ``between_stages``)."""
        return self._stage_list

    def forward_stem(self, x: torch.Tensor, mix_box: tuple[int, int, int, int] | None = None) -> torch.Tensor:
        """x: (B, 3, H, W) -> stage 1's tokens (B, H/r, W/r, C), MixToken's box swapped in where one is given."""
        tokens = self.patch_embed(x).permute(0, 2, 3, 1)
        return self.attn_stem(tokens if mix_box is None else swap_box(tokens, mix_box, MIX_SCALE))

    def forward(self, x: torch.Tensor) -> torch.Tensor | TokenMixOutput:
        """x: (B, 3, H, W) -> logits (B, num_classes); with MixToken in training, a ``TokenMixOutput``."""
        if not (self.mix_token and self.training):
            return super().forward(x)
        box = draw_token_box(x.shape[-2] // self.patch // MIX_SCALE, x.shape[-1] // self.patch // MIX_SCALE)
        x = self.forward_stem(self.attn_input(x), box)
        for index, stage in enumerate(self.stages):
            x = stage(self.between_stages(index, x))
        grid = x.shape[1:3]
        features = self.forward_neck(x)
        token_logits = self.aux_head(features[:, 1:])  # B, N, K
        b, n, k = token_logits.shape
        token_logits = swap_box(token_logits.reshape(b, *grid, k), box).reshape(b, n, k)  # back to their images
        return TokenMixOutput(self.head(features[:, 0]), token_logits, box)

    def between_stages(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Before stage 2: the downsample, then the position embedding (resampled for another grid)."""
        if index != 1:
            return x
        x = self.network[1](x)
        pos = self.pos_embed
        if pos.shape[1:3] != x.shape[1:3]:
            pos = resample_abs_pos_embed_nhwc(pos, x.shape[1:3])
        return x + pos

    def stage_map(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens (B, h, w, C) -> a (B, C, h, w) map."""
        return x.permute(0, 3, 1, 2)

    def forward_neck(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's tokens (B, h, w, C) -> normalised tokens (B, 1 + N, C), class token first."""
        x = self.token_map(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # a (B, C, h, w) hook point for Grad-CAM
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x.flatten(1, 2)], dim=1)  # B, 1 + N, C
        for block in self.post_network:
            x = block(x)
        return self.norm(x)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """features: tokens (B, 1 + N, C) -> the class token (B, C) when ``pre_logits``, else logits."""
        if pre_logits:
            return features[:, 0]
        return self.head(features[:, 0]) + 0.5 * self.aux_head(features[:, 1:]).max(dim=1).values

    def feature_map(self, features: torch.Tensor) -> torch.Tensor:
        """Tokens (B, 1 + N, C) -> the patch tokens as a (B, C, h, w) map (square grids only)."""
        b, n, c = features[:, 1:].shape
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"volo: {n} patch tokens do not form a square grid")
        return features[:, 1:].transpose(1, 2).reshape(b, c, side, side)

    def init_classifier(self, linear: nn.Linear) -> None:
        """The official init: truncated normal (std 0.02), zero bias."""
        trunc_normal_(linear.weight, std=0.02)
        nn.init.zeros_(linear.bias)

    def cam_layer(self) -> nn.Module:
        """The last stage's tokens as a (B, C, h, w) map."""
        return self.token_map


def volo(variant: str, num_classes: int = 1000, attention: Sequence[AttentionSpec] = (), img_size: int = 224,
         stem: str = "imagenet", mixer: str = "outlook", drop_path_rate: float = 0.0, in_chans: int = 3,
         mix_token: bool = False, layers: Sequence[int] | None = None, embed_dims: Sequence[int] | None = None,
         num_heads: Sequence[int] | None = None) -> VOLO:
    """VOLO-D1 ... D5 by name (``volo_d1`` ...); ``layers``, ``embed_dims``, ``num_heads`` override the variant's."""
    sizes = dict(VARIANTS[variant])
    sizes.update({k: tuple(v) for k, v in (("layers", layers), ("embed_dims", embed_dims), ("num_heads", num_heads))
                  if v is not None})
    return VOLO(num_classes, attention, img_size=img_size, stem=stem, mixer=mixer, drop_path_rate=drop_path_rate,
                in_chans=in_chans, mix_token=mix_token, name=variant, **sizes)


# The every-block tests run VOLO-D1's code at a fraction of its size: one unit a stage, narrow.
SMALL = {"stem": "cifar", "img_size": 32, "layers": (1, 1, 1, 1), "embed_dims": (32, 64, 64, 64),
         "num_heads": (2, 4, 4, 4)}
for _name in VARIANTS:
    register_backbone(_name, functools.partial(volo, _name), small=SMALL if _name == "volo_d1" else None)
