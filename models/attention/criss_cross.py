"""Criss-cross attention.

Paper: "CCNet: Criss-Cross Attention for Semantic Segmentation", Huang, Wang, Huang, Huang, Wei, Liu,
ICCV 2019 (TPAMI 2020). https://arxiv.org/abs/1811.11721 . Reference code: https://github.com/speedinghzl/CCNet

Each position attends over its row and its column (H + W - 1 positions: the column's entry for the
position itself is masked so it counts once), one softmax over both. Query and key are 1x1 convs to
C / 8, value a 1x1 conv to C, all with biases; out = gamma * attention + x with gamma starting at 0.
The recurrent module applies the same weights R times (2 in the paper), so information reaches every
position. Pure PyTorch: row and column attention as einsums, never an (HW) x (HW) tensor.

At position ``head`` (its default) the block is CCNet's RCCA module as the official ``RCCAModule``:
3x3 conv to C / 4 + BN + leaky ReLU (0.01, the official InPlaceABN's), criss-cross attention R times
with shared weights, 3x3 conv + BN + leaky ReLU, concatenation with the input, a 3x3 bottleneck conv
to ``head_width`` (C / 4 by default: 512 on ResNet-50's 2048 channels, as CCNet) + BN + leaky ReLU,
Dropout2d(0.1); the classifier pools that. The official
code's 1x1 segmentation classifier is the backbone's linear classifier here.
"""
import torch
from torch import nn

from models.attention.base import AttentionBlock, Maps, conv_bn_act, query_index, require_positive


class RCCAHead(nn.Module):
    """CCNet's recurrent criss-cross attention head on the last feature map (see the module docstring).

    Args: as ``CrissCrossAttention``; ``head_width`` is the output width (None: C / 4, CCNet's 512 on 2048).
    """

    def __init__(self, channels: int, reduction: int = 8, recurrence: int = 2, head_width: int | None = None):
        super().__init__()
        require_positive(head_width=head_width)
        inner = max(1, channels // 4)
        head_width = head_width or inner
        self.out_channels = head_width
        self.conva = conv_bn_act(channels, inner, nn.LeakyReLU(0.01, inplace=True))
        self.cca = CrissCrossAttention(inner, reduction, recurrence)
        self.convb = conv_bn_act(inner, inner, nn.LeakyReLU(0.01, inplace=True))
        self.bottleneck = nn.Sequential(conv_bn_act(channels + inner, head_width, nn.LeakyReLU(0.01, inplace=True)),
                                        nn.Dropout2d(0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, head_width, H, W)."""
        out = self.convb(self.cca(self.conva(x)))
        return self.bottleneck(torch.cat([x, out], 1))  # the maps are its criss-cross module's


class CrissCrossAttention(AttentionBlock):
    """Recurrent criss-cross attention with a gamma-scaled residual.

    Args:
        channels: input and output channel count C.
        reduction: query/key width is C // reduction (8 in the paper).
        recurrence: R, how many times the shared module is applied.
        head_width: the RCCA head's output width, at position ``head`` only (None: C / 4, CCNet's 512).
    """

    default_position = "head"
    fallback_position = "post"  # after the units of the chosen stages where a backbone has no head (VOLO)
    head_class = RCCAHead

    def __init__(self, channels: int, reduction: int = 8, recurrence: int = 2, head_width: int | None = None):
        super().__init__()
        require_positive(reduction=reduction, recurrence=recurrence, head_width=head_width)
        inner = max(1, channels // reduction)
        self.recurrence = recurrence
        self.query = nn.Conv2d(channels, inner, 1)
        self.key = nn.Conv2d(channels, inner, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def row_column_weights(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, C, H, W) -> each position's weights over its column (B, H, W, H) and its row (B, H, W, W)."""
        h = x.shape[2]
        q, k = self.query(x), self.key(x)
        e_col = torch.einsum("bchw,bckw->bhwk", q, k)  # B, H, W, H: attend down the column
        self_mask = torch.eye(h, dtype=torch.bool, device=x.device).view(h, 1, h)
        e_col = e_col.masked_fill(self_mask, float("-inf"))  # the position itself counts once, in its row
        e_row = torch.einsum("bchw,bchk->bhwk", q, k)  # B, H, W, W: attend along the row
        att = torch.softmax(torch.cat([e_col, e_row], dim=3), dim=3)
        a_col, a_row = att.split([h, att.shape[3] - h], dim=3)
        return a_col, a_row

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """One criss-cross pass: x (B, C, H, W) -> x + gamma * attention (B, C, H, W)."""
        a_col, a_row = self.row_column_weights(x)
        v = self.value(x)
        out = torch.einsum("bhwk,bckw->bchw", a_col, v) + torch.einsum("bhwk,bchk->bchw", a_row, v)
        return x + self.gamma * out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)."""
        for _ in range(self.recurrence):
            x = self.attend(x)
        return x

    def attention_maps(self, x: torch.Tensor, query: tuple[float, float] = (0.5, 0.5)) -> Maps:
        """The first pass's weights of the query over its row and column (B, H, W), the self position once."""
        b, _, h, w = x.shape
        i, j = query_index(h, w, query)
        a_col, a_row = self.row_column_weights(x)
        weights = x.new_zeros(b, h, w)
        weights[:, :, j] += a_col[:, i, j]  # zero at (i, j): masked in the column
        weights[:, i, :] += a_row[:, i, j]
        return {"query attention": ("query", weights)}
