"""CBAM: channel gate then spatial gate.

Paper: "CBAM: Convolutional Block Attention Module", Woo, Park, Lee, Kweon, ECCV 2018.
https://arxiv.org/abs/1807.06521 . Reference code: https://github.com/Jongchan/attention-module

As the official code: the channel MLP (C -> C/r -> C, with biases) is shared by the average- and
max-pooled descriptors and their outputs are summed before the sigmoid; the spatial gate is a
7x7 conv (no bias) + BN (momentum 0.01) over the channel-wise (max, mean) maps. timm's ``CbamModule`` differs:
no MLP biases by default (``bias=False`` here gives that) and (mean, max) channel order (a
permutation of the 7x7 kernel's two input channels, so no option is needed; ``timm_twin`` swaps them).
"""
import torch
from timm.layers.cbam import CbamModule, ChannelAttn
from torch import nn

from models.attention.base import AttentionBlock, Maps, bottleneck_width, require_positive


class ChannelGate(nn.Module):
    """sigmoid(MLP(avgpool x) + MLP(maxpool x)) scales each channel."""

    def __init__(self, channels: int, reduction: int = 16, bias: bool = True):
        super().__init__()
        require_positive(reduction=reduction)
        hidden = bottleneck_width(channels, reduction)
        self.width = hidden  # the effective bottleneck width (scripts/complexity.py lists it)
        self.fc1 = nn.Conv2d(channels, hidden, 1, bias=bias)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, 1, bias=bias)

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> channel weights (B, C, 1, 1) in (0, 1)."""
        avg = self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True))))
        mx = self.fc2(self.act(self.fc1(x.amax((2, 3), keepdim=True))))
        return torch.sigmoid(avg + mx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)."""
        return x * self.gate(x)


class SpatialGate(nn.Module):
    """sigmoid(BN(conv7x7([max_c x, mean_c x]))) scales each position."""

    def __init__(self, kernel_size: int = 7):
        super().__init__()
        require_positive(kernel_size=kernel_size)
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(1, momentum=0.01)  # the official BasicConv's (torch's default is 0.1)

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> spatial weights (B, 1, H, W) in (0, 1)."""
        # max with indices rather than amax: measured faster and with a lower peak than amax here,
        # whose backward keeps the gated input for its mask (scripts/benchmark_attention.py)
        pooled = torch.cat([x.max(1, keepdim=True).values, x.mean(1, keepdim=True)], dim=1)  # B, 2, H, W
        return torch.sigmoid(self.bn(self.conv(pooled)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)."""
        return x * self.gate(x)


class CBAM(AttentionBlock):
    """Channel attention followed by spatial attention, applied in sequence.

    Args:
        channels: input and output channel count C.
        reduction: channel MLP reduction r (width C // r, at least 1).
        kernel_size: spatial gate kernel (7 in the paper).
        bias: biases in the channel MLP (the official code has them).
        spatial: include the spatial gate (False: the paper's channel-only ablation).
    """

    default_position = "standard"
    is_gate = True

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7, bias: bool = True,
                 spatial: bool = True):
        super().__init__()
        require_positive(reduction=reduction, kernel_size=kernel_size)
        self.channel = ChannelGate(channels, reduction, bias)
        self.spatial = SpatialGate(kernel_size) if spatial else nn.Identity()
        self.init_weights()

    def init_weights(self) -> None:
        """The official ResNets' init (Jongchan/attention-module, ``model_resnet.py``): its loop re-draws only
        keys holding "conv" or "bn" and zeroes every bias, so the channel MLP (``nn.Linear`` there) keeps
        PyTorch's default weights with zero biases: redrawn here after the backbone's kaiming fan-out loop,
        which would start them about 10x larger. The spatial gate's BN scale starts at 0, so the gate is a
        uniform 0.5 at first; torch's BN default would start it at 1."""
        for fc in (self.channel.fc1, self.channel.fc2):  # a 1x1 conv's default init is a Linear's
            fc.reset_parameters()
            if fc.bias is not None:
                nn.init.zeros_(fc.bias)
        if isinstance(self.spatial, SpatialGate):
            nn.init.zeros_(self.spatial.bn.weight)
            nn.init.zeros_(self.spatial.bn.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)."""
        return self.spatial(self.channel(x))

    def attention_maps(self, x: torch.Tensor, query: tuple[float, float] = (0.5, 0.5)) -> Maps:
        """The channel gate (B, C) and the spatial gate (B, H, W) applied after it."""
        channel = self.channel.gate(x)  # B, C, 1, 1
        maps = {"channel gate": ("channel", channel.flatten(1))}
        if isinstance(self.spatial, SpatialGate):
            maps["spatial gate"] = ("spatial", self.spatial.gate(x * channel)[:, 0])
        return maps

    def timm_twin(self) -> nn.Module:
        """timm's ``CbamModule`` (its ``ChannelAttn`` without the spatial gate) with this block's weights."""
        fc1 = self.channel.fc1
        width = dict(rd_channels=fc1.out_channels, mlp_bias=fc1.bias is not None)
        if not isinstance(self.spatial, SpatialGate):
            return self._loaded_twin(ChannelAttn(fc1.in_channels, **width), self.channel.state_dict())
        twin = CbamModule(fc1.in_channels, spatial_kernel_size=self.spatial.conv.kernel_size[0], **width)
        return self._loaded_twin(twin, {
            **{f"channel.{k}": v for k, v in self.channel.state_dict().items()},
            # timm stacks (mean, max), the official code (max, mean): swap the kernel's inputs
            "spatial.conv.conv.weight": self.spatial.conv.weight[:, [1, 0]],
            **{f"spatial.conv.bn.{k}": v for k, v in self.spatial.bn.state_dict().items()},
        })
