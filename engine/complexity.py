"""Parameter and multiply-accumulate counts of a model's forward pass."""
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from models.backbones.base import Backbone

aten = torch.ops.aten


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of the CPU fused attention kernel, which FlopCounterMode has no formula for."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# Kernels that run matmuls but are missing from torch's FLOP registry on the CPU.
_EXTRA_FORMULAS = {aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flop}


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not)."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_size: tuple[int, int, int]) -> int:
    """Multiply-accumulates of one forward pass of one image of ``input_size`` (C, H, W).

    Counts convolutions, linear layers and matmuls (bmm, einsum, scaled_dot_product_attention), the
    papers' convention; elementwise ops, pooling and norms are not counted.
    """
    return macs_by_module(model, input_size)[""]


@torch.no_grad()
def macs_by_module(model: nn.Module, input_size: tuple[int, int, int]) -> dict[str, int]:
    """MACs of one forward pass per module name (``""`` is the whole model), as ``count_macs`` counts them."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS) as counter:
            model(torch.zeros(1, *input_size, device=device))
    finally:
        model.train(was_training)
    root = type(model).__name__
    counts = {"": counter.get_total_flops() // 2}  # FlopCounterMode counts 2 FLOPs per multiply-add
    for name, ops in counter.get_flop_counts().items():
        if name.startswith(root + "."):
            counts[name[len(root) + 1:]] = sum(ops.values()) // 2
    return counts


def complexity_by_part(model: Backbone, input_size: tuple[int, int, int]) -> list[dict[str, int | str]]:
    """Parameters and MACs of each of the model's ``parts()``, then of the rest (stem, head) and the total.

    Attention blocks count in the part that holds them.
    """
    macs = macs_by_module(model, input_size)
    names = {module: name for name, module in model.named_modules()}

    def part_macs(module: nn.Module) -> int:
        """A module's MACs; one whose methods were called rather than itself, or a grouping outside the
        module tree (DenseNet's stage: its block and transition), sums its children's."""
        name = names.get(module)
        if name in macs:
            return macs[name]
        return sum(part_macs(child) for child in module.children())

    rows = [{"part": part, "params": count_params(module), "macs": part_macs(module)}
            for part, module in model.parts().items()]
    total = {"part": "total", "params": count_params(model), "macs": macs[""]}
    rest = {"part": "rest (stem, head)", "params": total["params"] - sum(r["params"] for r in rows),
            "macs": total["macs"] - sum(r["macs"] for r in rows)}
    return [*rows, rest, total]


def bottleneck_widths(model: nn.Module) -> list[dict[str, int | str]]:
    """Each attention block's effective bottleneck width (its ``width``: C // r, at least 1) and input channels."""
    rows = []
    for name, module in model.named_modules():
        width = getattr(module, "width", None)
        if isinstance(width, int) and type(module).__module__.startswith("models.attention"):
            conv = next(m for m in module.modules() if isinstance(m, nn.Conv2d))
            rows.append({"block": name, "type": type(module).__name__, "channels": conv.in_channels, "width": width})
    return rows
