"""Global context block.

Paper: "GCNet: Non-local Networks Meet Squeeze-Excitation Networks and Beyond", Cao, Xu, Lin, Wei,
Hu, ICCVW 2019. https://arxiv.org/abs/1904.11492 . Reference code: https://github.com/xvjiarui/GCNet

As the official ``ContextBlock``: softmax attention pooling (1x1 conv C -> 1), a bottleneck transform
1x1 conv (C -> C/r) -> LayerNorm -> ReLU -> 1x1 conv (C/r -> C), fused by add (default) or by
multiplying with its sigmoid; the last conv starts at zero (with add fusion the block starts as the identity).
timm's ``GlobalContext`` defaults differ: multiply fusion, r = 8, no zero init, LayerNorm eps 1e-6
(the official ``nn.LayerNorm``: 1e-5); ``timm_twin`` builds it with this block's fusion, width and eps.
"""
import timm.layers
import torch
import torch.nn.functional as F
from torch import nn

from models.attention.base import AttentionBlock, Maps, bottleneck_width, require_positive


class GlobalContext(AttentionBlock):
    """Attention-pooled global context, transformed and fused into every position.

    Args:
        channels: input and output channel count C.
        reduction: bottleneck ratio r (width C // r, at least 1; the paper's default 16).
        fusion: ``add`` (the paper's default) or ``mul`` (x * sigmoid(transform)).
        pooling: ``att`` (softmax attention pooling) or ``avg`` (the paper's ablation).
    """

    default_position = "standard"
    is_gate = True

    def __init__(self, channels: int, reduction: int = 16, fusion: str = "add", pooling: str = "att"):
        super().__init__()
        require_positive(reduction=reduction)
        if fusion not in ("add", "mul") or pooling not in ("att", "avg"):
            raise ValueError(f"fusion='{fusion}', pooling='{pooling}'; use fusion add|mul, pooling att|avg")
        hidden = bottleneck_width(channels, reduction)
        self.width = hidden  # the effective bottleneck width (scripts/complexity.py lists it)
        self.fusion, self.pooling = fusion, pooling
        self.conv_mask = nn.Conv2d(channels, 1, 1) if pooling == "att" else None
        self.transform = nn.Sequential(
            nn.Conv2d(channels, hidden, 1),
            nn.LayerNorm([hidden, 1, 1]),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1),
        )
        self.init_weights()

    def init_weights(self) -> None:
        """Kaiming (fan_in) attention conv and a zero last conv, as the official ``reset_parameters``."""
        if self.conv_mask is not None:
            nn.init.kaiming_normal_(self.conv_mask.weight, mode="fan_in", nonlinearity="relu")
            nn.init.zeros_(self.conv_mask.bias)
        nn.init.zeros_(self.transform[-1].weight)
        nn.init.zeros_(self.transform[-1].bias)

    def context_weights(self, x: torch.Tensor) -> torch.Tensor | None:
        """x: (B, C, H, W) -> the attention pooling's softmax weights (B, 1, HW); None for average pooling."""
        if self.conv_mask is None:
            return None
        b, _, h, w = x.shape
        return F.softmax(self.conv_mask(x).view(b, 1, h * w), dim=-1)

    def context(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> global context (B, C, 1, 1)."""
        b, c, h, w = x.shape
        weights = self.context_weights(x)
        if weights is None:
            return x.mean((2, 3), keepdim=True)
        return torch.bmm(x.reshape(b, c, h * w), weights.transpose(1, 2)).view(b, c, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)."""
        t = self.transform(self.context(x))
        return x + t if self.fusion == "add" else x * torch.sigmoid(t)

    def attention_maps(self, x: torch.Tensor, query: tuple[float, float] = (0.5, 0.5)) -> Maps:
        """The attention pooling's weights (B, H, W); none for average pooling, where all weigh the same."""
        weights = self.context_weights(x)
        return {} if weights is None else {"context attention": ("spatial", weights.view(-1, *x.shape[2:]))}

    def timm_twin(self) -> nn.Module:
        """timm's ``GlobalContext`` with this pooling, fusion, width, LayerNorm eps and weights."""
        fc1, norm, fc2 = self.transform[0], self.transform[1], self.transform[3]
        twin = timm.layers.GlobalContext(fc1.in_channels, use_attn=self.conv_mask is not None,
                                         fuse_add=self.fusion == "add", fuse_scale=self.fusion == "mul",
                                         rd_channels=fc1.out_channels)
        mlp = "mlp_add" if self.fusion == "add" else "mlp_scale"
        getattr(twin, mlp).norm.eps = norm.eps
        state = {f"{mlp}.fc1.weight": fc1.weight, f"{mlp}.fc1.bias": fc1.bias,
                 f"{mlp}.norm.weight": norm.weight.flatten(), f"{mlp}.norm.bias": norm.bias.flatten(),
                 f"{mlp}.fc2.weight": fc2.weight, f"{mlp}.fc2.bias": fc2.bias}
        if self.conv_mask is not None:
            state.update({"conv_attn.weight": self.conv_mask.weight, "conv_attn.bias": self.conv_mask.bias})
        return self._loaded_twin(twin, state)
