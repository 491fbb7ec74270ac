"""One adapted 3x3 conv over a batch that mixes domains, three ways, against the fused one-domain conv.

- fused:    one domain, adapter and norm folded into the kernel: one conv (what a one-domain batch runs);
- gathered: the frozen conv once, plus each sample's 1x1 adapter (batched matrix product) and eval-mode
            norm (per-sample scale and shift), as layers/gathered.py runs a mixed batch;
- grouped:  each sample's own fused kernel stacked, one grouped conv over the batch (groups = samples):
            the alternative measured in docs/benchmarks.md, not what adapterkit runs.

CIFAR ResNet shapes (16/32/64 channels at 32/16/8 px), 8 and 32 samples over 4 domains, one torch thread,
median of interleaved calls; prints each variant's time as a ratio of the fused conv's.

    python benchmarks/bench_gathered_conv.py
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def median_times(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds per call of each function, calls interleaved (one of each per round)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(repeats + 10):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if round_ >= 10:  # warm-up rounds
                times[name].append(time.perf_counter() - start)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def variants(n: int, c: int, px: int, domains: int):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, px, px, generator=g)
    weight, bias = torch.randn(c, c, 3, 3, generator=g), torch.randn(c, generator=g)
    per_domain = torch.randn(domains, c, c, 3, 3, generator=g)
    per_domain_bias = torch.randn(domains, c, generator=g)
    alpha = torch.randn(domains, c, c, generator=g)
    scale, shift = torch.randn(domains, c, generator=g), torch.randn(domains, c, generator=g)
    index = torch.arange(n) % domains

    def fused():
        return F.conv2d(x, weight, bias, padding=1)

    def gathered():
        y = F.conv2d(x, weight, None, padding=1)
        y.view(n, c, -1).baddbmm_(alpha.index_select(0, index), x.reshape(n, c, -1))
        return torch.addcmul(shift[index][:, :, None, None], y, scale[index][:, :, None, None])

    def grouped():
        w = per_domain.index_select(0, index).reshape(n * c, c, 3, 3)
        b = per_domain_bias.index_select(0, index).reshape(-1)
        return F.conv2d(x.reshape(1, n * c, px, px), w, b, padding=1, groups=n).view(n, c, px, px)

    return {"fused": fused, "gathered": gathered, "grouped": grouped}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--domains", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("samples channels px | fused us | gathered / fused | grouped / fused")
    for n in (8, 32):
        for c, px in ((16, 32), (32, 16), (64, 8)):
            t = median_times(variants(n, c, px, args.domains), args.repeats)
            print(
                f"{n:7d} {c:8d} {px:2d} | {t['fused'] * 1e6:8.0f} | {t['gathered'] / t['fused']:16.2f} | "
                f"{t['grouped'] / t['fused']:15.2f}"
            )


if __name__ == "__main__":
    main()
