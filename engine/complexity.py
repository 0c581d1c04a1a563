"""Parameter and multiply-accumulate counts of a model's forward pass."""
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

aten = torch.ops.aten


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of the CPU fused attention kernel, which FlopCounterMode has no formula for."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# Kernels that run matmuls but are missing from torch's FLOP registry on the CPU.
_EXTRA_FORMULAS = {aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flop}


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not)."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, input_size: tuple[int, int, int]) -> int:
    """Multiply-accumulates of one forward pass of one image of ``input_size`` (C, H, W).

    Counts convolutions, linear layers and matmuls (bmm, einsum, scaled_dot_product_attention), the
    papers' convention; elementwise ops, pooling and norms are not counted.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS) as counter:
            model(torch.zeros(1, *input_size, device=device))
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2  # FlopCounterMode counts 2 FLOPs per multiply-add
