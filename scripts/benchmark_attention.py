"""Forward+backward time and peak memory of every attention block against timm's equivalent.

Usage: python scripts/benchmark_attention.py [--channels 256] [--sizes 56 14] [--batch 8] [--repeats 5]
       python scripts/benchmark_attention.py --volo-stage1 [--batch 8] [--repeats 5]
Both modules of a pair are built with matching arguments and timed alternately in one process;
the table's ratios (ours / timm) are measured in this run. ``--volo-stage1`` compares VOLO-D1's
stage 1 (four Outlookers on 28x28 tokens of width 192, as at 224x224) with timm's, weights copied. Peak memory is the most tensor bytes alive
at once during one forward+backward: torch.cuda's counter on a GPU, a dispatch-level tracker on the CPU.
"""
import argparse
import statistics
import sys
import time
import weakref

import torch
from timm.layers import EcaModule, GlobalContext, NonLocalAttn, SEModule
from timm.layers.bottleneck_attn import BottleneckAttn
from timm.layers.cbam import CbamModule
from timm.layers.coord_attn import CoordAttn
from timm.models.volo import OutlookAttention as TimmOutlookAttention
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from _project import use_project

use_project()  # before the project's own imports

from models.attention import ATTENTION_BLOCKS, MultiHeadSelfAttention2d  # noqa: E402
from models.attention.eca import eca_kernel_size  # noqa: E402
from models.attention.outlook import outlook_heads  # noqa: E402


class TimmOutlook(nn.Module):
    """timm's VOLO outlook attention in the same residual (B, C, H, W) form as ours."""

    def __init__(self, channels: int, heads: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.attention = TimmOutlookAttention(channels, num_heads=heads, kernel_size=3, padding=1, stride=2)

    def forward(self, x):
        """x: (B, C, H, W) -> (B, C, H, W)."""
        return x + self.attention(self.norm(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)


def timm_equivalent(name: str, c: int, size: int) -> nn.Module | None:
    """timm's module for block ``name`` with arguments that match ours, or None."""
    return {
        "se": lambda: SEModule(c, rd_channels=c // 16),
        "cbam": lambda: CbamModule(c, rd_channels=c // 16, mlp_bias=True),
        "eca": lambda: EcaModule(c) if eca_kernel_size(c) >= 3 else None,
        "coord": lambda: CoordAttn(c, rd_channels=max(8, c // 32), bias=True),
        "gc": lambda: GlobalContext(c, fuse_add=True, fuse_scale=False, rd_channels=c // 16),
        "nonlocal": lambda: NonLocalAttn(c, rd_channels=c // 2, use_scale=False),
        "mhsa": lambda: BottleneckAttn(c, c, feat_size=(size, size), num_heads=4),
        "outlook": lambda: TimmOutlook(c, outlook_heads(c)),  # our default heads
    }.get(name, lambda: None)()


def ours(name: str, c: int, size: int) -> nn.Module:
    """Our block with its paper defaults (replace_spatial blocks at stride 1, C -> C; non-local as timm's)."""
    cls = ATTENTION_BLOCKS[name]
    if name == "nonlocal":  # what timm's NonLocalAttn computes: no subsampling, logits unscaled
        return cls(c, subsample=False, scale=1.0)
    if cls is MultiHeadSelfAttention2d:
        return cls(c, c, 1, max_size=size)
    return cls(c, c, 1) if "replace_spatial" in cls.positions else cls(c)


class PeakTensorMemory(TorchDispatchMode):
    """Most bytes held by tensor storages alive at once while the mode is active (CPU)."""

    def __init__(self):
        super().__init__()
        self.live, self.peak, self.seen = 0, 0, set()

    def _release(self, key, nbytes):
        """Called when a storage is freed: it no longer counts as live."""
        self.seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.seen:
                    self.seen.add(key)
                    self.live += storage.nbytes()
                    weakref.finalize(storage, self._release, key, storage.nbytes())
        self.peak = max(self.peak, self.live)
        return out


def step(module: nn.Module, x: torch.Tensor) -> None:
    """One forward and backward pass."""
    module(x).sum().backward()


def measure(module: nn.Module, x: torch.Tensor, repeats: int) -> tuple[float, float]:
    """(median seconds, peak MiB) of a forward+backward pass."""
    cuda = x.device.type == "cuda"
    step(module, x)  # warm-up
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        step(module, x)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(module, x)
        peak = torch.cuda.max_memory_allocated() - base
    else:
        with PeakTensorMemory() as tracker:
            step(module, x)
        peak = tracker.peak
    return statistics.median(times), peak / 2**20


def volo_stage1(batch: int, repeats: int, device: torch.device, rounds: int = 6) -> None:
    """Our VOLO-D1 stage 1 against timm's with the same weights: time and peak memory of forward+backward."""
    import timm

    from models import build_model

    torch.manual_seed(0)
    mine = build_model({"name": "volo_d1"}, {"name": "none"}).network[0].to(device)
    theirs = timm.create_model("volo_d1_224").network[0].to(device)
    theirs.load_state_dict(mine.state_dict())
    x = torch.randn(batch, 28, 28, 192, device=device, requires_grad=True)
    torch.testing.assert_close(mine(x), theirs(x), rtol=1e-4, atol=1e-4)
    print(f"device {device.type}, VOLO-D1 stage 1 (4 Outlookers, 28x28x192), batch {batch}, "
          f"median of {repeats} forward+backward passes, alternating")
    print("| round | ours ms | timm ms | time ours/timm | ours MiB | timm MiB | memory ours/timm |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    ratios = []
    for r in range(rounds):  # alternate the order so neither side always runs first
        pair = [(mine, "ours"), (theirs, "timm")]
        results = dict((name, measure(m, x, repeats)) for m, name in (pair if r % 2 == 0 else pair[::-1]))
        (t_o, m_o), (t_t, m_t) = results["ours"], results["timm"]
        ratios.append(t_o / t_t)
        print(f"| {r + 1} | {1e3 * t_o:.1f} | {1e3 * t_t:.1f} | {t_o / t_t:.2f} | {m_o:.3g} | {m_t:.3g} "
              f"| {m_o / m_t:.2f} |")
    print(f"median time ratio ours/timm over {rounds} rounds: {statistics.median(ratios):.2f}")


def main(argv: list[str] | None = None) -> None:
    """Measure every block at each size and print one markdown table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--sizes", type=int, nargs="+", default=[56, 14])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--blocks", nargs="+", default=list(ATTENTION_BLOCKS))
    parser.add_argument("--volo-stage1", action="store_true", help="VOLO-D1 stage 1, ours against timm's")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.volo_stage1:
        volo_stage1(args.batch, args.repeats, device)
        return
    c = args.channels
    print(f"device {device.type}, C={c}, batch {args.batch}, median of {args.repeats} forward+backward passes")
    print("| block | size | ours ms | timm ms | time ours/timm | ours MiB | timm MiB | memory ours/timm |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for size in args.sizes:
        for name in args.blocks:
            torch.manual_seed(0)
            x = torch.randn(args.batch, c, size, size, device=device, requires_grad=True)
            mine = ours(name, c, size).to(device)
            t_ours, m_ours = measure(mine, x, args.repeats)
            theirs = timm_equivalent(name, c, size)
            if theirs is None:
                print(f"| {name} | {size} | {1e3 * t_ours:.1f} | - | - | {m_ours:.3g} | - | - |")
                continue
            t_timm, m_timm = measure(theirs.to(device), x, args.repeats)
            print(f"| {name} | {size} | {1e3 * t_ours:.1f} | {1e3 * t_timm:.1f} | {t_ours / t_timm:.2f} "
                  f"| {m_ours:.3g} | {m_timm:.3g} | {m_ours / max(m_timm, 1e-9):.2f} |")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
