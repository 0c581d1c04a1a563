"""The training loss a data config asks for, and token labelling's loss for VOLO's MixToken forward
(``model.mix_token``), with image-level targets."""
import torch
from timm.data import Mixup
from timm.data.mixup import mixup_target
from timm.loss import SoftTargetCrossEntropy
from torch import nn

from errors import ConfigError
from models.backbones.volo import TokenMixOutput

# The official main.py's defaults (--cls-weight, --dense-weight): the class token's loss and the tokens' share.
CLS_WEIGHT, DENSE_WEIGHT = 1.0, 0.5


class MixTokenLoss(nn.Module):
    """The official ``TokenLabelCrossEntropy`` for (B, K) targets around any other criterion.

    A ``TokenMixOutput`` gets soft cross-entropy of the class token against the targets mixed with the batch's
    mirror image by the box's token share (lam = 1 - box area / N), plus ``DENSE_WEIGHT`` x that of every token
    against its own image's target (token labelling's annotator scores are not part of attnlab). Anything
    else (evaluation, or a model without MixToken) goes to ``criterion``.

    Args:
        criterion: the run's loss for plain logits.
        num_classes: K, for integer targets.
        label_smoothing: for integer targets, as timm's one-hot targets (mixup's already carry theirs).
    """

    def __init__(self, criterion: nn.Module, num_classes: int, label_smoothing: float = 0.0):
        super().__init__()
        self.criterion, self.num_classes, self.label_smoothing = criterion, num_classes, label_smoothing
        self.soft_cross_entropy = SoftTargetCrossEntropy()

    def forward(self, output: torch.Tensor | TokenMixOutput, target: torch.Tensor) -> torch.Tensor:
        """output: logits (B, K) or a ``TokenMixOutput``; target: labels (B,) or probabilities (B, K) -> the loss."""
        if not isinstance(output, TokenMixOutput):
            return self.criterion(output, target)
        soft = target if target.ndim == 2 else mixup_target(target, self.num_classes, 1.0, self.label_smoothing)
        b, n, k = output.token_logits.shape
        top, left, bottom, right = output.box
        lam = 1.0 - (bottom - top) * (right - left) / n
        class_loss = self.soft_cross_entropy(output.logits, lam * soft + (1.0 - lam) * soft.flip(0))
        token_loss = self.soft_cross_entropy(output.token_logits.reshape(b * n, k), soft.repeat_interleave(n, 0))
        return CLS_WEIGHT * class_loss + DENSE_WEIGHT * token_loss


def build_criterion(data_cfg, mix_token: bool = False) -> tuple[nn.Module, Mixup | None]:
    """Soft-target cross-entropy with timm's mixup/cutmix, cross-entropy with label smoothing, or binary
    cross-entropy for multi-label data; wrapped in ``MixTokenLoss`` for a MixToken model."""
    criterion, mixup = _base_criterion(data_cfg)
    if mix_token:  # VOLO's MixToken forward returns class and token logits in training
        criterion = MixTokenLoss(criterion, data_cfg.num_classes, 0.0 if mixup else data_cfg.label_smoothing)
    return criterion, mixup


def _base_criterion(data_cfg) -> tuple[nn.Module, Mixup | None]:
    """The loss of plain logits, and the batch mixing that goes with it."""
    if data_cfg.multi_label:
        if data_cfg.mixup > 0 or data_cfg.cutmix > 0 or data_cfg.label_smoothing > 0:
            raise ConfigError("data.multi_label=true takes no data.mixup, data.cutmix or data.label_smoothing; "
                              "set them to 0")
        return nn.BCEWithLogitsLoss(), None
    if data_cfg.mixup > 0 or data_cfg.cutmix > 0:
        if data_cfg.skip_corrupt:
            raise ConfigError("data.skip_corrupt=true cannot go with data.mixup/cutmix (a batch that loses an "
                              "image can be odd-sized, which timm's Mixup refuses); turn one off")
        mixup = Mixup(mixup_alpha=data_cfg.mixup, cutmix_alpha=data_cfg.cutmix,
                      label_smoothing=data_cfg.label_smoothing, num_classes=data_cfg.num_classes)
        return SoftTargetCrossEntropy(), mixup
    return nn.CrossEntropyLoss(label_smoothing=data_cfg.label_smoothing), None
