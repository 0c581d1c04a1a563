"""The interface every backbone offers (timm's names), and the registry that backbone files add themselves to.

The engine and the tools ask a model through these methods (its stages, its classifier, its
intermediate feature maps, its training phases) and never by a backbone's attribute names.
"""
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from timm.models._features import feature_take_indices
from torch import nn

# Config name -> constructor taking ``num_classes``, ``attention`` and the backbone's own options.
BACKBONES: dict[str, Callable[..., "Backbone"]] = {}
# Config name -> options for a small instance that runs on 32x32 inputs (the registry-driven tests).
SMALL_OPTIONS: dict[str, dict[str, Any]] = {}


def register_backbone(name: str, builder: Callable[..., "Backbone"],
                      small: Mapping[str, Any] | None = None) -> None:
    """Make ``builder`` the backbone ``model.name=<name>``; ``small`` enters it in the every-block tests."""
    if name in BACKBONES:
        raise ValueError(f"backbone '{name}' is registered twice")
    BACKBONES[name] = builder
    if small is not None:
        SMALL_OPTIONS[name] = dict(small)


class Backbone(nn.Module):
    """Stem -> ``stages`` -> neck -> head, with timm's model interface.

    A subclass sets ``stages`` (an ``nn.ModuleList``, or a property returning one where its state-dict
    names are other attributes), ``num_features`` (the width ``forward_head`` pools) and the classifier
    names, and implements ``forward_stem`` and ``forward_head``; the stage loop is here.
    """

    stages: nn.ModuleList
    num_features: int
    # Attribute paths of the classifier layers: what ``reset_classifier`` rebuilds and what a
    # fine-tuning run with a new class list leaves freshly initialised. The first is ``get_classifier()``.
    classifier_names: tuple[str, ...] = ("fc",)
    # Submodules that get no gradient in some training phase (DDP must then look for unused parameters).
    unused_in_some_phase: tuple[str, ...] = ()

    def __init__(self) -> None:
        """No input or head block until ``attach_input`` and ``attach_head`` place them."""
        super().__init__()
        self.attn_input: nn.Module = nn.Identity()
        self.attn_head: nn.Module = nn.Identity()

    def attach_input(self, factory: Callable[..., nn.Module] | None, in_chans: int) -> None:
        """Put the ``input`` position's block on the image (``in_chans`` channels), before the stem."""
        if factory is not None:
            self.attn_input = factory(in_chans)

    def attach_head(self, factories: Sequence[Callable[..., nn.Module]]) -> None:
        """Put the ``head`` position's blocks on the last feature map (``num_features`` wide), each on the width
        the one before produces; the classifier, built after this, takes the last one's width."""
        blocks = []
        for factory in factories:
            blocks.append(factory(self.num_features))
            self.num_features = getattr(blocks[-1], "out_channels", self.num_features)
        if blocks:
            del self.attn_head  # registered again here, after the stages: the module tree in network order
            self.attn_head = blocks[0] if len(blocks) == 1 else nn.Sequential(*blocks)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) -> the first stage's input (with the stem's attention block)."""
        raise NotImplementedError

    def between_stages(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """What runs before stage ``index`` (0-based): nothing here; VOLO's downsample before its second."""
        return x

    def stage_map(self, x: torch.Tensor) -> torch.Tensor:
        """A stage's output as a (B, C, h, w) map (CNN stages output one already)."""
        return x

    def forward_neck(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's output -> ``forward_features``' output: nothing here; MobileNetV2's 1x1 conv."""
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) -> what ``forward_head`` takes (a (B, C, h, w) map for the CNNs)."""
        x = self.forward_stem(self.attn_input(x))
        for index, stage in enumerate(self.stages):
            x = stage(self.between_stages(index, x))
        return self.attn_head(self.forward_neck(x))

    def forward_intermediates(self, x: torch.Tensor, indices: int | Sequence[int] | None = None,
                              intermediates_only: bool = False, norm: bool = False, output_fmt: str = "NCHW"
                              ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Each chosen stage's output as a (B, C, h, w) map, as timm's ``forward_intermediates``.

        Args:
            x: (B, 3, H, W) images.
            indices: None for every stage, an int n for the last n, or 0-based stage indices.
            intermediates_only: return the maps alone, without running the rest of the network.
            norm, output_fmt: timm's feature wrapper passes them; the maps are the stages' own, in NCHW.
        Returns:
            The maps, or ``(forward_features(x), maps)``.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt={output_fmt!r}: the stage maps are NCHW")
        take, last = feature_take_indices(len(self.stages), indices)
        maps = []
        x = self.forward_stem(self.attn_input(x))
        for index, stage in enumerate(self.stages):
            if intermediates_only and index > last:
                break
            x = stage(self.between_stages(index, x))
            if index in take:
                maps.append(self.stage_map(x))
        return maps if intermediates_only else (self.attn_head(self.forward_neck(x)), maps)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """``forward_features``' output -> pooled (B, num_features) when ``pre_logits``, else logits."""
        raise NotImplementedError

    def feature_map(self, features: torch.Tensor) -> torch.Tensor:
        """``forward_features``' output as a (B, C, h, w) map (already one for the CNNs)."""
        return features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) -> logits (B, num_classes)."""
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        """The classifier layer (timm's name)."""
        return self.get_submodule(self.classifier_names[0])

    def init_classifier(self, linear: nn.Linear) -> None:
        """A new classifier layer's init: PyTorch's default here."""

    def reset_classifier(self, num_classes: int) -> None:
        """Rebuild every classifier layer for ``num_classes`` classes, freshly initialised."""
        for name in self.classifier_names:
            parent, _, attr = name.rpartition(".")
            owner = self.get_submodule(parent)
            old = getattr(owner, attr)
            new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None).to(old.weight.device)
            self.init_classifier(new)
            setattr(owner, attr, new)

    def set_epoch(self, epoch: int, epochs: int) -> str | None:
        """Tell a model trained in phases which epoch this is; returns the phase's name (None: one phase)."""
        return None

    def phase_epochs(self, epochs: int) -> list[int] | None:
        """How many of ``epochs`` each training phase takes, where each restarts the lr schedule (None: one)."""
        return None

    def cam_layer(self) -> nn.Module:
        """The module whose (B, C, h, w) output Grad-CAM explains: the head block where there is one, else the
        last stage (the map the classifier pools)."""
        return self.stages[-1] if isinstance(self.attn_head, nn.Identity) else self.attn_head

    def stage_units(self, index: int) -> list[nn.Module]:
        """The units of stage ``index`` (0-based) in the attention plan's numbering (``units:``, ``every``)."""
        return list(self.stages[index])

    def parts(self) -> dict[str, nn.Module]:
        """The parts a complexity table lists: the stages."""
        return {f"stage {s}": stage for s, stage in enumerate(self.stages, start=1)}


class PooledBackbone(Backbone):
    """A CNN whose head is global average pooling -> dropout -> linear ``fc``."""

    def build_head(self, num_classes: int, dropout: float = 0.0) -> None:
        """The pool, dropout and ``fc`` layers over ``num_features`` channels."""
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(self.num_features, num_classes)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """features: (B, C, h, w) -> pooled (B, C) when ``pre_logits``, else logits (B, num_classes)."""
        pooled = torch.flatten(self.pool(features), 1)
        return pooled if pre_logits else self.fc(self.dropout(pooled))
