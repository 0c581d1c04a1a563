"""Non-local block (config name ``nonlocal``; the file is named so because that is a Python keyword).

Paper: "Non-local Neural Networks", Wang, Girshick, Gupta, He, CVPR 2018.
https://arxiv.org/abs/1711.07971 . Reference code: https://github.com/facebookresearch/video-nonlocal-net

z = x + BN(W y), y_i = sum_j f(x_i, x_j) g(x_j) / C(x), with theta, phi, g and W 1x1 convs (with
biases) and inner width d = C / 2. Pairwise functions: ``embedded_gaussian`` (softmax of
theta^T phi), ``gaussian`` (softmax of x^T x), ``dot`` (theta^T phi / N) and ``concat``
(ReLU(w^T [theta_i, phi_j]) / N).

Defaults are the released code's (``lib/core/config.py`` of video-nonlocal-net: USE_SCALE,
USE_MAXPOOL, CONV_INIT_STD = 0.01, BN_INIT_GAMMA = 0), which the paper's equations leave out:
softmax logits scaled by d^-1/2; x max-pooled 2x2 before phi and g (theta sees every position);
theta, phi, g and W initialised N(0, 0.01) with zero biases; the BN's gamma (and beta) at zero, so
the block starts as the identity. ``scale=1.0 subsample=false init_std=null`` is the equation as written.

The softmax forms run through ``scaled_dot_product_attention`` (memory linear in H*W where a fused
kernel applies); ``dot`` uses the associativity theta (phi^T g) / N, also linear. timm's
``NonLocalAttn`` differs: inner width C / 8 rounded to 8, logits scaled by C^-1/2, no subsampling,
embedded Gaussian only; ``timm_twin`` gives it for that mode at scale 1 or C^-1/2 without
subsampling, any width.
"""
import math

import torch
import torch.nn.functional as F
from timm.layers import NonLocalAttn
from torch import nn

from models.attention.base import AttentionBlock, Maps, query_index, require_positive

MODES = ("embedded_gaussian", "gaussian", "dot", "concat")


class NonLocal(AttentionBlock):
    """Self-attention over all positions, added back through a zero-initialised BN.

    Args:
        channels: input and output channel count C.
        mode: the pairwise function, one of ``MODES``.
        reduction: inner width is d = C // reduction (2 in the paper).
        subsample: 2x2 max-pool x before phi and g (the released code; the paper's cheaper variant).
        scale: factor on the softmax logits; None is the released code's d^-1/2 over the key width d
            (C / reduction; C for ``gaussian``, which has no embedding); 1.0: the paper's equation.
        init_std: theta, phi, g and W start N(0, init_std) with zero biases (0.01, the released code's);
            None leaves them to the backbone's conv init (PyTorch's for a block built alone).
    """

    default_position = "post"

    def __init__(self, channels: int, mode: str = "embedded_gaussian", reduction: int = 2,
                 subsample: bool = True, scale: float | None = None, init_std: float | None = 0.01):
        super().__init__()
        require_positive(reduction=reduction)
        if mode not in MODES:
            raise ValueError(f"mode='{mode}' is not valid; use one of {', '.join(MODES)}")
        inner = channels // reduction
        if inner < 1:
            raise ValueError(f"nonlocal: reduction={reduction} leaves no inner channels for {channels}")
        self.mode = mode
        key_width = channels if mode == "gaussian" else inner  # what q . k sums over
        self.scale = scale if scale is not None else 1 / math.sqrt(key_width)
        self.init_std = init_std
        self.theta = nn.Conv2d(channels, inner, 1) if mode != "gaussian" else None
        self.phi = nn.Conv2d(channels, inner, 1) if mode != "gaussian" else None
        self.g = nn.Conv2d(channels, inner, 1)
        self.concat_project = nn.Conv2d(2 * inner, 1, 1, bias=False) if mode == "concat" else None
        self.subsample = subsample
        self.W = nn.Conv2d(inner, channels, 1)
        self.bn = nn.BatchNorm2d(channels)
        self.init_weights()

    def init_weights(self) -> None:
        """The released code's init: convs N(0, init_std), zero biases, BN gamma and beta zero (the identity)."""
        if self.init_std is not None:
            for conv in (self.theta, self.phi, self.g, self.W, self.concat_project):
                if conv is not None:
                    nn.init.normal_(conv.weight, 0, self.init_std)
                    if conv.bias is not None:
                        nn.init.zeros_(conv.bias)
        nn.init.zeros_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H', W'): the 2x2 max-pool before phi and g, in floor mode as the released
        code (an odd map drops its last row or column); a side below 2 has nothing to pool and is kept."""
        if not self.subsample:
            return x
        kernel = (2 if x.shape[2] >= 2 else 1, 2 if x.shape[3] >= 2 else 1)
        return F.max_pool2d(x, kernel) if kernel != (1, 1) else x

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (B, C, H, W) -> queries (B, N, C'), keys (B, M, C'), values (B, M, C'); M after subsampling.

        ``gaussian`` has no embedding: its queries and keys are x itself (C channels).
        """
        pooled = self.pool(x)  # the released code pools x, then embeds: phi and g see the pooled map
        g = self.g(pooled).flatten(2).transpose(1, 2)  # B, M, C'
        if self.mode == "gaussian":
            q = x.flatten(2).transpose(1, 2)  # B, N, C
            k = pooled.flatten(2).transpose(1, 2)  # B, M, C
        else:
            q = self.theta(x).flatten(2).transpose(1, 2)  # B, N, C'
            k = self.phi(pooled).flatten(2).transpose(1, 2)  # B, M, C'
        return q, k, g

    def _concat_relation(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """q (B, N, C'), k (B, M, C') -> ReLU(w^T [theta_i, phi_j]) (B, N, M), before the 1/M."""
        # w^T [theta_i, phi_j] = a^T theta_i + b^T phi_j: two 1-channel maps, then an N x M ReLU
        wq, wk = self.concat_project.weight.flatten().chunk(2)
        return F.relu((q @ wq).unsqueeze(2) + (k @ wk).unsqueeze(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)."""
        b, _, h, w = x.shape
        q, k, g = self._embed(x)
        if self.mode in ("embedded_gaussian", "gaussian"):
            y = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), g.unsqueeze(1),
                                               scale=self.scale).squeeze(1)  # B, N, C'
        elif self.mode == "dot":
            y = q @ (k.transpose(1, 2) @ g) / k.shape[1]  # theta (phi^T g) / M: never N x M
        else:
            y = self._concat_relation(q, k) @ g / k.shape[1]
        y = y.transpose(1, 2).reshape(b, -1, h, w)  # B, C', H, W
        return x + self.bn(self.W(y))

    def attention_maps(self, x: torch.Tensor, query: tuple[float, float] = (0.5, 0.5)) -> Maps:
        """The query position's weights f(x_i, x_j) / C(x) over the (subsampled) keys: (B, h, w)."""
        b, _, h, w = x.shape
        i, j = query_index(h, w, query)
        q, k, _ = self._embed(x)
        q = q[:, i * w + j].unsqueeze(1)  # B, 1, C'
        if self.mode in ("embedded_gaussian", "gaussian"):
            weights = torch.softmax(q @ k.transpose(1, 2) * self.scale, dim=-1)  # B, 1, M
        elif self.mode == "dot":
            weights = q @ k.transpose(1, 2) / k.shape[1]
        else:
            weights = self._concat_relation(q, k) / k.shape[1]
        keys = self.pool(x[:1, :1]).shape[2:]  # the keys' grid: what the subsampling leaves of H x W
        return {"query attention": ("query", weights.view(b, *keys))}

    def timm_twin(self) -> nn.Module | None:
        """timm's ``NonLocalAttn`` with this width and weights; None where it has no equivalent.

        timm has only the embedded Gaussian, without subsampling, at logit scale 1 or C^-1/2.
        """
        channels = self.bn.num_features
        expressible = (self.mode == "embedded_gaussian" and not self.subsample
                       and self.scale in (1.0, channels ** -0.5))
        if not expressible:
            return None
        twin = NonLocalAttn(channels, use_scale=self.scale != 1.0, rd_channels=self.g.out_channels)
        names = {"theta": "t", "phi": "p", "g": "g", "W": "z", "bn": "norm"}
        return self._loaded_twin(twin, {f"{names[k.split('.')[0]]}.{k.split('.', 1)[1]}": v
                                        for k, v in self.state_dict().items()})
