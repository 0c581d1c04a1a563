"""AG-CNN: attention-guided hard attention around any backbone.

Paper: "Diagnose like a Radiologist: Attention Guided Convolutional Neural Network for Thorax
Disease Classification", Guan, Huang, Zhong, Zheng, Zheng, Yang, 2018. https://arxiv.org/abs/1801.09927

A global branch (the backbone) sees the whole image. Its last feature map gives a heat map
H(x, y) = max_k |f_k(x, y)|, upsampled to the image and normalised to [0, 1] per image; the mask
H > tau (0.7) keeps its largest connected region, whose bounding box is cropped from the input and
resized to the input size. A local branch (a second backbone) classifies the crop, and a fusion branch
(a linear layer) classifies the concatenated pooled features of both. The crop is hard attention: no
gradient flows through it.

Training runs in the paper's three stages: global branch, then local branch (global fixed), then the
fusion layer (both branches fixed); ``set_epoch`` switches stage by the fractions of the run in
``stage_fractions``. A fixed branch runs without gradient and with its norms in eval mode. Its
parameters stay registered with DDP, which therefore needs ``find_unused_parameters``
(``unused_in_some_phase`` declares them). Each stage runs the learning-rate schedule from its own start,
as the paper trains each branch (``phase_epochs`` for ``engine.optim``'s phased scheduler).
"""
import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from models.backbones.base import BACKBONES, Backbone, register_backbone
from models.placement import AttentionSpec

STAGES = ("global", "local", "fusion")


@torch.no_grad()
def attention_boxes(feature_map: torch.Tensor, image_size: tuple[int, int], tau: float = 0.7) -> torch.Tensor:
    """Bounding boxes (x0, y0, x1, y1) in input pixels of the largest region where the heat map exceeds tau.

    Args:
        feature_map: (B, C, h, w) last feature map of the global branch.
        image_size: (H, W) of the input the boxes refer to.
        tau: threshold on the heat map normalised to [0, 1]; an image with no pixel above it keeps
            the whole image.
    Returns:
        (B, 4) float boxes, x1 and y1 exclusive.
    """
    heat = feature_map.float().abs().amax(dim=1, keepdim=True)  # B, 1, h, w
    heat = F.interpolate(heat, size=image_size, mode="bilinear", align_corners=False)
    low = heat.amin(dim=(2, 3), keepdim=True)
    high = heat.amax(dim=(2, 3), keepdim=True)
    heat = (heat - low) / (high - low).clamp_min(1e-12)
    masks = (heat[:, 0] > tau).cpu().numpy()  # connected components run on the host
    h, w = image_size
    from scipy import ndimage  # only AG-CNN needs SciPy: its import stays out of every other run's start-up

    boxes = []
    for mask in masks:
        labels, count = ndimage.label(mask)
        if count == 0:
            boxes.append((0, 0, w, h))
            continue
        largest = 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
        ys, xs = np.nonzero(labels == largest)
        boxes.append((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1))
    return torch.tensor(boxes, dtype=torch.float32, device=feature_map.device)


def crop_and_resize(images: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Crop each image to its box and resize it bilinearly to ``size``: (B, C, H, W) -> (B, C, *size)."""
    index = torch.arange(len(boxes), device=boxes.device, dtype=boxes.dtype)[:, None]
    rois = torch.cat([index, boxes], dim=1).to(images.dtype)
    return roi_align(images, rois, size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)


class AGCNN(Backbone):
    """Global branch, attention-guided crop, local branch and fusion layer.

    Its ``stages`` and intermediate maps are the global branch's (the one that sees the whole image);
    ``forward_features`` gives both branches' pooled features, the fusion layer's input.

    Args:
        global_branch, local_branch: backbones (any registered one).
        num_classes: classes of the fusion layer.
        tau: heat-map threshold.
        stage_fractions: fractions of the epochs spent in the global, local and fusion stages.
    """

    unused_in_some_phase = ("global_branch", "local_branch", "fusion")  # each is fixed in some stage

    def __init__(self, global_branch: Backbone, local_branch: Backbone, num_classes: int, tau: float = 0.7,
                 stage_fractions: Sequence[float] = (0.5, 0.25, 0.25)):
        super().__init__()
        if not 0 <= tau < 1:
            raise ValueError(f"tau={tau} must be in [0, 1)")
        if len(stage_fractions) != 3 or any(f < 0 for f in stage_fractions) or sum(stage_fractions) <= 0:
            raise ValueError(f"stage_fractions={list(stage_fractions)} must be three non-negative "
                              "fractions (global, local, fusion)")
        self.global_branch = global_branch
        self.local_branch = local_branch
        self.num_features = global_branch.num_features + local_branch.num_features
        self.fusion = nn.Linear(self.num_features, num_classes)
        self.tau = tau
        total = sum(stage_fractions)
        self.stage_fractions = tuple(f / total for f in stage_fractions)
        self.stage = "fusion"  # inference runs every branch

    @property
    def classifier_names(self) -> tuple[str, ...]:
        """The fusion layer, then each branch's own classifiers (trained in the first two stages)."""
        return ("fusion", *(f"{branch}.{name}" for branch in ("global_branch", "local_branch")
                            for name in getattr(self, branch).classifier_names))

    @property
    def stages(self) -> nn.ModuleList:
        """The global branch's stages."""
        return self.global_branch.stages

    def forward_intermediates(self, x: torch.Tensor, indices: int | Sequence[int] | None = None,
                              intermediates_only: bool = False):
        """The global branch's stage maps, and the fused features unless ``intermediates_only``."""
        maps = self.global_branch.forward_intermediates(x, indices, intermediates_only=True)
        return maps if intermediates_only else (self.forward_features(x), maps)

    def cam_layer(self) -> nn.Module:
        """The global branch's, whose map chooses the crop."""
        return self.global_branch.cam_layer()

    def parts(self) -> dict[str, nn.Module]:
        """The two branches and the fusion layer."""
        return {"global branch": self.global_branch, "local branch": self.local_branch, "fusion": self.fusion}

    def _stage_index(self, epoch: int, epochs: int) -> int:
        """The stage (0, 1, 2) whose share of the run holds 1-based ``epoch``."""
        ends = np.cumsum(self.stage_fractions) * epochs
        return min(int(np.searchsorted(ends, epoch - 0.5)), 2)

    def set_epoch(self, epoch: int, epochs: int) -> str:
        """Pick the training stage of 1-based ``epoch`` out of ``epochs``; returns its name."""
        self.stage = STAGES[self._stage_index(epoch, epochs)]
        self.train(self.training)  # re-apply which branches' norms are fixed
        return self.stage

    def phase_epochs(self, epochs: int) -> list[int]:
        """The three stages' epochs: the paper trains each branch in turn, each from the start of its lr schedule."""
        stages = [self._stage_index(epoch, epochs) for epoch in range(1, epochs + 1)]
        return [stages.count(s) for s in range(3) if stages.count(s)]

    def train(self, mode: bool = True) -> "AGCNN":
        """Train mode for the stage's trainable part only; fixed branches keep eval-mode norms."""
        super().train(mode)
        if mode:
            self.global_branch.train(self.stage == "global")
            self.local_branch.train(self.stage == "local")
        return self

    def local_input(self, x: torch.Tensor, global_features: torch.Tensor) -> torch.Tensor:
        """The attention-guided crop of ``x`` at ``x``'s size, taken from the image the global branch saw (the
        output of a block at its ``input`` position, such as STN, whose coordinates its heat map has)."""
        size = tuple(x.shape[-2:])
        boxes = attention_boxes(self.global_branch.feature_map(global_features), size, self.tau)
        with torch.no_grad():  # the crop trains no part of the global branch
            seen = self.global_branch.attn_input(x)
        return crop_and_resize(seen, boxes, size)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) -> both branches' pooled features (B, num_features), global first."""
        g = self.global_branch.forward_features(x)
        return self.pooled(g, self.local_branch.forward_features(self.local_input(x, g.detach())))

    def pooled(self, global_features: torch.Tensor, local_features: torch.Tensor) -> torch.Tensor:
        """Both branches' ``forward_features`` -> their pooled features side by side (B, num_features)."""
        return torch.cat([self.global_branch.forward_head(global_features, pre_logits=True),
                          self.local_branch.forward_head(local_features, pre_logits=True)], dim=1)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pooled features (B, num_features) -> themselves when ``pre_logits``, else the fusion logits."""
        return features if pre_logits else self.fusion(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) -> logits (B, num_classes) of the current stage's head."""
        train_global = self.stage == "global"
        with torch.set_grad_enabled(train_global and torch.is_grad_enabled()):
            g = self.global_branch.forward_features(x)
        if train_global:
            return self.global_branch.forward_head(g)
        crop = self.local_input(x, g.detach())
        with torch.set_grad_enabled(self.stage == "local" and torch.is_grad_enabled()):
            l_features = self.local_branch.forward_features(crop)
        if self.stage == "local":
            return self.local_branch.forward_head(l_features)
        return self.fusion(self.pooled(g, l_features))


def agcnn(backbones: Mapping[str, Callable[..., nn.Module]], num_classes: int = 1000,
          attention: Sequence[AttentionSpec] = (), backbone: str = "resnet50",
          backbone_options: Mapping[str, Any] | None = None, stem: str = "imagenet", img_size: int = 224,
          tau: float = 0.7, stage_fractions: Sequence[float] = (0.5, 0.25, 0.25)) -> AGCNN:
    """AG-CNN around two copies of ``backbone`` (a key of ``backbones``), each with the attention specs.

    ``stem`` and ``img_size`` reach the backbone when it takes them; ``backbone_options`` holds the
    backbone's own keys (``width_mult``, ``mixer`` ...).
    """
    valid = [name for name in backbones if name != "agcnn"]
    if backbone not in valid:
        raise ValueError(f"backbone='{backbone}' is not a backbone; valid: {', '.join(valid)}")
    accepted = [p for p in inspect.signature(backbones[backbone]).parameters if p not in ("num_classes", "attention")]
    options = {k: v for k, v in (("stem", stem), ("img_size", img_size)) if k in accepted}
    unknown = sorted(set(backbone_options or {}) - set(accepted))
    if unknown:
        raise ValueError(f"backbone_options: {backbone} has no key(s) {', '.join(unknown)}; "
                          f"valid keys: {', '.join(accepted)}")
    options.update(backbone_options or {})
    branches = [backbones[backbone](num_classes=num_classes, attention=attention, **options) for _ in range(2)]
    return AGCNN(*branches, num_classes=num_classes, tau=tau, stage_fractions=stage_fractions)


register_backbone("agcnn", functools.partial(agcnn, BACKBONES),  # the registry as it is when a model is built
                  small={"backbone": "resnet20", "stem": "cifar", "img_size": 32})
