"""Residual Attention Networks: Attention-56 and Attention-92.

Paper: "Residual Attention Network for Image Classification", Wang, Jiang, Qian, Yang, Li, Zhang,
Wang, Tang, CVPR 2017. https://arxiv.org/abs/1704.06904 . Reference: the official Caffe prototxts
(https://github.com/fwang91/residual-attention-network, ``imagenet_model/Attention-{56,92}-deploy``).

As the prototxts: a 7x7 / 2 conv of 64 channels, BN, ReLU and a 3x3 / 2 max-pool (rounding up, so
224 gives 56); stages 1-3 each a pre-activation bottleneck unit (to 256, 512, 1024 channels; stride 2
from stage 2) then 1, 1, 1 (Attention-56) or 1, 2, 3 (Attention-92) Attention Modules whose soft
masks pool 3, 2 and 1 times; stage 4 three units to 2048 channels (the first with stride 2); BN-ReLU,
global average pooling and the classifier. No conv has a bias. The CIFAR stem is a 3x3 / 1 conv without
pooling (the official repository has no CIFAR network; ``width`` scales every stage).

Attention blocks go in the trunk's units (each stage's first unit, every Attention Module's four
trunk units, stage 4's three), at the ResNets' positions; the soft-mask branches get none.
"""
import functools
from collections.abc import Sequence

import torch
from torch import nn

from models.attention.residual_attention import PreActUnit, ResidualAttention
from models.backbones.base import PooledBackbone, register_backbone
from models.layers import check_stem, restore_block_inits, stem_slot
from models.placement import POSITIONS, AttentionPlan, AttentionSpec


class AttentionStageModule(ResidualAttention):
    """The Attention Module as part of the network: its four trunk units take the plan's attention blocks."""

    def __init__(self, channels: int, levels: int, unit_factories: Sequence[dict]):
        nn.Module.__init__(self)
        self.out_channels = channels
        self.build(channels, levels, unit_factories)


class ResidualAttentionNet(PooledBackbone):
    """Stem -> three attention stages -> stage 4 -> BN-ReLU -> pool -> linear.

    Args:
        modules_per_stage: Attention Modules in stages 1-3 ((1, 1, 1): Attention-56; (1, 2, 3): Attention-92).
        num_classes: size of the linear head.
        attention: parsed attention specs; gates at ``standard`` of the trunk units (their own place
            on the ResNets), other blocks at their own default.
        stem: ``imagenet`` or ``cifar``.
        width: the stem's width and stage 1's bottleneck (64 in the paper); stage outputs are 4, 8, 16, 32 x it.
        in_chans: input image channels.
        name: the variant's name, for error messages.
    """

    def __init__(self, modules_per_stage: Sequence[int] = (1, 1, 1), num_classes: int = 1000,
                 attention: Sequence[AttentionSpec] = (), stem: str = "imagenet", width: int = 64,
                 in_chans: int = 3, name: str = "attention56"):
        super().__init__()
        check_stem(stem)
        depths = [1 + 4 * m for m in modules_per_stage] + [3]  # trunk units per stage
        plan = AttentionPlan(attention, name, depths, positions=POSITIONS)
        self.attach_input(plan.input(), in_chans)
        imagenet = stem == "imagenet"
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, width, 7 if imagenet else 3, 2 if imagenet else 1, 3 if imagenet else 1, bias=False),
            nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, ceil_mode=True) if imagenet else nn.Identity(),  # Caffe rounds up: 112 -> 56
        )
        self.attn_stem = stem_slot(plan.stem(), width)
        stages, channels = [], width
        for s, modules in enumerate(modules_per_stage, start=1):
            out = 4 * width * 2 ** (s - 1)
            units = [PreActUnit(channels, out, 1 if s == 1 else 2, factories=plan.unit(s, 0))]
            units += [AttentionStageModule(out, 4 - s, [plan.unit(s, 1 + 4 * m + i) for i in range(4)])
                      for m in range(modules)]
            stages.append(nn.Sequential(*units))
            channels = out
        last = 2 * channels
        stages.append(nn.Sequential(*(PreActUnit(channels if i == 0 else last, last, 2 if i == 0 else 1,
                                                 factories=plan.unit(len(depths), i)) for i in range(3))))
        self.stages = nn.ModuleList(stages)
        self.num_features = last
        self.final = nn.Sequential(nn.BatchNorm2d(last), nn.ReLU(inplace=True))
        self.attach_head(plan.head())
        self.build_head(num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        """Kaiming-normal convs (MSRA, as Caffe's ResNets), unit norms; then blocks' own inits."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        restore_block_inits(self)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) -> (B, width, H/4, W/4) (ImageNet stem) or (B, width, H, W) (CIFAR stem)."""
        return self.attn_stem(self.stem(x))

    def stage_units(self, index: int) -> list[nn.Module]:
        """Stage ``index``'s trunk units in the plan's numbering: the first unit, then each module's four."""
        units = []
        for module in self.stages[index]:
            units += module.units() if isinstance(module, AttentionStageModule) else [module]
        return units

    def forward_neck(self, x: torch.Tensor) -> torch.Tensor:
        """Stage 4's output -> BN-ReLU (the units are pre-activation: the last sum is not yet activated)."""
        return self.final(x)


def residual_attention_net(modules_per_stage: Sequence[int], name: str, num_classes: int = 1000,
                           attention: Sequence[AttentionSpec] = (), stem: str = "imagenet", width: int = 64,
                           in_chans: int = 3) -> ResidualAttentionNet:
    """Attention-56 or Attention-92 by its modules per stage."""
    return ResidualAttentionNet(modules_per_stage, num_classes, attention, stem, width, in_chans, name)


register_backbone("attention56", functools.partial(residual_attention_net, (1, 1, 1), "attention56"),
                  small={"stem": "cifar", "width": 8})
register_backbone("attention92", functools.partial(residual_attention_net, (1, 2, 3), "attention92"))
