"""Time ONE incremental basis update vs a full joint SVD as the number of domains T grows.

For each backbone's adapter shapes, domains arrive one at a time; per layer a basis is kept between steps
exactly as an incremental run would (``extend_basis`` with a fixed budget of new columns, appended).
At T in ``--domains`` we time the update for domain T (summed over all layers) and, separately, the
paper's joint compression of all T domains at K = C/2 (``joint_compress(basis_rank=0.5)``, summed over layers).
Medians of ``--repeats``; adapters are synthetic Gaussian matrices (worst case: full-rank residuals).

Run from the repository root:
    PYTHONPATH=. python benchmarks/bench_basis.py --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from _common import write_report

from adapterkit.basis import extend_basis, joint_compress

# (C_out, C_in) of the 1x1 parallel adapter of every adapted conv.
# ResNet-26 of Rebuffi et al. (srebuffi/residual_adapters, models.py): 3x3 stem 3->32, then 3 stages of
# 4 basic blocks (64/128/256 channels, 2 convs each); each stage's first conv maps C/2 -> C.
RESNET26 = [(32, 3)] + [s for c in (64, 128, 256) for s in [(c, c // 2)] + [(c, c)] * 7]
# ResNet-50: the 7x7 stem 3->64 and the 3x3 conv of every bottleneck (3/4/6/3 blocks).
RESNET50 = [(64, 3)] + [(64, 64)] * 3 + [(128, 128)] * 4 + [(256, 256)] * 6 + [(512, 512)] * 3
ARCHS = {"resnet26": RESNET26, "resnet50": RESNET50}


def adapter(domain: int, layer: int, shape: tuple[int, int]) -> torch.Tensor:
    """Domain ``domain``'s synthetic adapter at ``layer``, regenerated on demand (never all in memory)."""
    g = torch.Generator().manual_seed(1_000_003 * domain + layer)
    return 0.01 * torch.randn(*shape, generator=g)


def timed(fn, repeats: int) -> tuple[list[float], object]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return times, out


def bench_arch(name: str, shapes: list[tuple[int, int]], domains: list[int], new_cols: int, repeats: int):
    rows = []
    betas = [torch.zeros(c_out, 0) for c_out, _ in shapes]
    for t in range(1, max(domains) + 1):
        reps = repeats if t in domains else 1
        step = [0.0] * reps
        for layer, shape in enumerate(shapes):
            alpha = adapter(t, layer, shape)
            times, ext = timed(lambda b=betas[layer], a=alpha: extend_basis(b, a, new_columns=new_cols), reps)
            step = [s + x for s, x in zip(step, times, strict=True)]
            betas[layer] = torch.cat([betas[layer], ext.new_columns], dim=1)  # commit, as a real run would
        if t not in domains:
            continue
        full = [0.0] * repeats
        for layer, shape in enumerate(shapes):
            alphas = [adapter(d, layer, shape) for d in range(1, t + 1)]
            times, _ = timed(lambda a=alphas: joint_compress(a, basis_rank=0.5), repeats)
            full = [f + x for f, x in zip(full, times, strict=True)]
        inc_s, full_s = statistics.median(step), statistics.median(full)
        rows.append(
            {
                "arch": name,
                "domains": t,
                "incremental_s": inc_s,
                "full_svd_s": full_s,
                "ratio_incremental_over_full": inc_s / full_s,
                "basis_columns": sum(b.shape[1] for b in betas),
                "basis_capacity": sum(c_out for c_out, _ in shapes),
            }
        )
        r = rows[-1]
        print(
            f"{name:9s} T={t:4d}  incremental {1e3 * inc_s:9.1f} ms  full SVD {1e3 * full_s:10.1f} ms  "
            f"ratio {r['ratio_incremental_over_full']:.4f}  basis {r['basis_columns']}/{r['basis_capacity']}",
            flush=True,
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--domains", type=int, nargs="+", default=[5, 20, 50, 100])
    p.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    p.add_argument("--new-columns", type=int, default=8, help="per-domain budget of new basis columns")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: stable on a shared machine)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/basis.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rows = [
        r
        for a in args.archs
        for r in bench_arch(a, ARCHS[a], sorted(args.domains), args.new_columns, args.repeats)
    ]
    report = write_report(
        args.out,
        "incremental extend_basis step vs full joint_compress (K = C/2), summed over adapted layers",
        {
            "domains": sorted(args.domains),
            "new_columns_per_domain": args.new_columns,
            "full_rank": "K = C/2 (basis_rank=0.5)",
            "repeats": args.repeats,
            "statistic": "median",
            "dtype": "float32",
            "layers": {a: ARCHS[a] for a in args.archs},
        },
        rows,
        start,
    )
    print(f"wrote {args.out} ({report['total_wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
