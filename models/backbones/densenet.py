"""DenseNet with attention plug points.

Paper: "Densely Connected Convolutional Networks", Huang, Liu, van der Maaten, Weinberger, CVPR 2017.
https://arxiv.org/abs/1608.06993

torchvision's layout, names and initialisation (``torchvision.models.densenet121``: growth rate 32,
blocks of 6, 12, 24, 16 layers, bottleneck width 4 x 32, transitions halving the channels), so with no
attention the state dicts are interchangeable. The ImageNet stem is the 7x7/2 conv and 3x3/2 max-pool;
the CIFAR stem a 3x3/1 conv without pooling, so 32x32 inputs end at 4x4 after the three transitions.

Stage s is dense block s followed, for s < 4, by its transition: the transition is the stage's last
unit, so ``every`` and ``units`` count it.
"""
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.backbones.base import Backbone, register_backbone
from models.layers import AttentionSlots, check_stem, restore_block_inits, stem_slot
from models.placement import AttentionPlan, AttentionSpec, Factory

# Positions a dense layer or a transition offers (see their docstrings).
DENSENET_POSITIONS = ("pre", "standard", "identity", "post", "replace_spatial", "input", "stem", "head")


class DenseLayer(nn.Module):
    """BN-ReLU-1x1 (to ``bn_size * growth``) -> BN-ReLU-3x3 (to ``growth``), concatenated to the input.

    Positions: ``pre`` (on the input the layer's convs see; the concatenation keeps it ungated),
    ``replace_spatial`` (the 3x3 conv), ``standard`` (the ``growth`` new channels before the
    concatenation), ``identity`` (the input's copy in the concatenation), ``post`` (the concatenated output).
    """

    def __init__(self, in_channels: int, growth: int, bn_size: int, drop_rate: float = 0.0,
                 factories: Mapping[str, Factory] | None = None):
        super().__init__()
        slots = AttentionSlots(factories)
        width = bn_size * growth
        self.out_channels = in_channels + growth
        self.attn_pre = slots.at("pre", in_channels)
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(width)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = slots.spatial(width, growth, 1, lambda: nn.Conv2d(width, growth, 3, padding=1, bias=False))
        self.drop_rate = drop_rate
        self.attn_standard = slots.at("standard", growth)
        self.attn_identity = slots.at("identity", in_channels)
        self.attn_post = slots.at("post", self.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C + growth, H, W)."""
        out = self.conv1(self.relu1(self.norm1(self.attn_pre(x))))
        out = self.conv2(self.relu2(self.norm2(out)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return self.attn_post(torch.cat([self.attn_identity(x), self.attn_standard(out)], 1))


class Transition(nn.Module):
    """BN-ReLU-1x1 conv (halving the channels) -> 2x2 average pool.

    Positions: ``pre`` (its input), ``standard`` (after the conv, before the pool), ``post`` (after the pool).
    """

    def __init__(self, in_channels: int, out_channels: int, factories: Mapping[str, Factory] | None = None):
        super().__init__()
        slots = AttentionSlots(factories, shortcut=False)
        self.out_channels = out_channels
        self.attn_pre = slots.at("pre", in_channels)
        self.norm = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.attn_standard = slots.at("standard", out_channels)
        self.pool = nn.AvgPool2d(2, stride=2)
        self.attn_post = slots.at("post", out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C', H/2, W/2)."""
        out = self.conv(self.relu(self.norm(self.attn_pre(x))))
        return self.attn_post(self.pool(self.attn_standard(out)))


class DenseNet(Backbone):
    """Stem -> dense blocks with transitions -> BN-ReLU -> global pool -> linear ``classifier``.

    Args:
        depths: dense layers per block ((6, 12, 24, 16) for DenseNet-121).
        growth: channels each dense layer adds (k = 32).
        init_channels: the stem's width (2k = 64).
        bn_size: bottleneck width factor of the 1x1 convs (4).
        num_classes: size of the linear head.
        attention: parsed attention specs; ``position: default`` puts gates at ``standard`` (the new
            channels of each dense layer, a transition's conv output), other blocks at their own.
        stem: ``imagenet`` or ``cifar``.
        drop_rate: dropout after each dense layer (0 in torchvision's DenseNet-121).
        in_chans: input image channels.
        name: the variant's name, for error messages.
    """

    classifier_names = ("classifier",)

    def __init__(self, depths: Sequence[int] = (6, 12, 24, 16), growth: int = 32, init_channels: int = 64,
                 bn_size: int = 4, num_classes: int = 1000, attention: Sequence[AttentionSpec] = (),
                 stem: str = "imagenet", drop_rate: float = 0.0, in_chans: int = 3, name: str = "densenet"):
        super().__init__()
        check_stem(stem)
        unit_counts = [d + (s < len(depths)) for s, d in enumerate(depths, start=1)]  # + the transition
        plan = AttentionPlan(attention, name, unit_counts, positions=DENSENET_POSITIONS, gate_position="standard")
        self.attach_input(plan.input(), in_chans)
        layers: list[tuple[str, nn.Module]] = [
            ("conv0", nn.Conv2d(in_chans, init_channels, 7, 2, 3, bias=False) if stem == "imagenet"
             else nn.Conv2d(in_chans, init_channels, 3, 1, 1, bias=False)),
            ("norm0", nn.BatchNorm2d(init_channels)), ("relu0", nn.ReLU(inplace=True)),
            ("pool0", nn.MaxPool2d(3, 2, 1) if stem == "imagenet" else nn.Identity()),
        ]
        self.attn_stem = stem_slot(plan.stem(), init_channels)
        stages, channels = [], init_channels
        for s, depth in enumerate(depths, start=1):
            block = nn.Sequential(OrderedDict(
                (f"denselayer{i + 1}", DenseLayer(channels + i * growth, growth, bn_size, drop_rate, plan.unit(s, i)))
                for i in range(depth)))
            channels += depth * growth
            layers.append((f"denseblock{s}", block))
            stage = list(block)  # the stage's units: its dense layers, then its transition
            if s < len(depths):
                transition = Transition(channels, channels // 2, plan.unit(s, depth))
                channels //= 2
                layers.append((f"transition{s}", transition))
                stage.append(transition)
            stages.append(nn.Sequential(*stage))
        layers.append(("norm5", nn.BatchNorm2d(channels)))
        self.features = nn.Sequential(OrderedDict(layers))  # torchvision's names: features.denseblock1 ...
        # the stages as a list, kept out of the module tree (no second state-dict name)
        object.__setattr__(self, "_stage_list", nn.ModuleList(stages))
        self.num_features = channels
        self.attach_head(plan.head())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(self.num_features, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        """torchvision's DenseNet init (Kaiming-normal convs, unit norms, zero linear bias), then blocks' own."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.classifier.bias)
        restore_block_inits(self)

    @property
    def stages(self) -> nn.ModuleList:
        """Stage s (1-based) is ``stages[s - 1]``: dense block s's layers and, for s < 4, its transition."""
        return self._stage_list

    def cam_layer(self) -> nn.Module:
        """The head block where there is one, else ``norm5``: the map the classifier pools (after its ReLU)."""
        return self.features.norm5 if isinstance(self.attn_head, nn.Identity) else self.attn_head

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) -> (B, 64, H/r, W/r)."""
        f = self.features
        return self.attn_stem(f.pool0(f.relu0(f.norm0(f.conv0(x)))))

    def forward_neck(self, x: torch.Tensor) -> torch.Tensor:
        """The last dense block's output -> BN -> ReLU, as torchvision's forward."""
        return F.relu(self.features.norm5(x))

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """features: (B, C, h, w) -> pooled (B, C) when ``pre_logits``, else logits (B, num_classes)."""
        pooled = torch.flatten(self.pool(features), 1)
        return pooled if pre_logits else self.classifier(pooled)


def densenet121(num_classes: int = 1000, attention: Sequence[AttentionSpec] = (), stem: str = "imagenet",
                drop_rate: float = 0.0, in_chans: int = 3) -> DenseNet:
    """DenseNet-121 (k = 32, blocks of 6, 12, 24, 16 layers): torchvision's ``densenet121``."""
    return DenseNet((6, 12, 24, 16), 32, 64, 4, num_classes, attention, stem, drop_rate, in_chans, "densenet121")


register_backbone("densenet121", densenet121, small={"stem": "cifar"})
