"""CPU inference: bare timm backbone vs AdapterModel (one domain) vs the exported folded model, and
mixed-domain batches vs single-domain batches of the same size.

Per backbone: 4 domains with random non-zero adapters, norms and heads. Variants, timed interleaved
under `torch.inference_mode()`:

- `bare`: the timm backbone alone (its own classifier), the baseline of every ratio;
- `bare_again`: the same bare backbone timed again: its ratio shows the noise floor of the row;
- `adapter`: `AdapterModel(x, domain="d0")` (eval mode: adapters fused into the weights);
- `unfused` (small batches): the same with fusion off (`configure_fusion(enabled=False)`: adapters as
  separate ops);
- `export`: `model.export_domain("d0")`, a plain timm model with the adapters folded in;
- `mixed`: `model(x, domain=[d0, d1, d2, d3, d0, ...])`; its throughput is reported relative to
  `adapter` (a single-domain batch of the same size);
- `bare_split` (small batches): the bare backbone run on 4 chunks of the batch, the cost floor of
  any method that splits the batch by domain.

Run from the repository root (see docs/benchmarks.md for the recorded run):
    PYTHONPATH=. python benchmarks/bench_inference.py
Against another checkout (e.g. the code before the optimisations), point PYTHONPATH at it; the
`unfused` column is skipped when that code has no `configure_fusion`.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from _common import calibrated_backbone, interleaved, paired_ratio, perturb, write_report

from adapterkit import AdapterModel

try:
    from adapterkit.layers import configure_fusion
except ImportError:  # code from before eval-mode fusion
    configure_fusion = None

MODELS = {  # name: input size
    "resnet26_decathlon": 72,
    "resnet50": 224,
    "convnext_tiny": 224,
    "vit_small_patch16_224": 224,
}
DOMAINS = ["d0", "d1", "d2", "d3"]


def build(name: str, size: int):
    backbone = calibrated_backbone(name, size)
    bare = copy.deepcopy(backbone)
    model = AdapterModel(backbone).eval()
    for i, d in enumerate(DOMAINS):
        model.add_domain(d, num_classes=10)
        perturb(model.trainable_parameters(d), seed=i)
    exported = model.export_domain("d0").eval()
    unfused = None
    if configure_fusion is not None:
        unfused = copy.deepcopy(model).eval()
        configure_fusion(unfused, enabled=False)
    return bare, model, exported, unfused


def bench_model(name: str, size: int, batches: list[int], repeats: tuple[int, int], mixed_batches: list[int]):
    bare, model, exported, unfused = build(name, size)
    rows = []
    for batch in sorted(set(batches) | set(mixed_batches)):
        x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
        fns = {"bare": lambda x=x: bare(x), "bare_again": lambda x=x: bare(x)}  # the noise floor
        if batch in batches:
            fns["adapter"] = lambda x=x: model(x, domain="d0")
            fns["export"] = lambda x=x: exported(x)
            if unfused is not None and batch <= 8:  # fusion's in-process before/after (time budget)
                fns["unfused"] = lambda x=x: unfused(x, domain="d0")
        if batch in mixed_batches:
            per_sample = [DOMAINS[i % len(DOMAINS)] for i in range(batch)]
            if "adapter" not in fns:
                fns["adapter"] = lambda x=x: model(x, domain="d0")
            fns["mixed"] = lambda x=x, d=per_sample: model(x, domain=d)
            if batch <= 8:  # the floor of any split: the bare backbone run once per domain's share
                fns["bare_split"] = lambda x=x: [bare(c) for c in x.chunk(len(DOMAINS))]
        reps = repeats[0] if batch <= 8 else repeats[1]
        start = time.perf_counter()
        with torch.inference_mode():  # large batches: no warm-up call (one-off costs are < 1 % there)
            res = interleaved(fns, reps, baseline="bare", warmup=1 if batch <= 8 else 0)
        row = {"model": name, "input": size, "batch": batch, "repeats": reps, "results": res}
        if "mixed" in res:
            row["mixed_over_single_throughput"] = paired_ratio(res, "adapter", "mixed")
        rows.append(row)
        cols = "  ".join(f"{k} {v['ratio']:.3f}x" for k, v in res.items() if k != "bare")
        extra = (
            f"  mixed throughput / single {row['mixed_over_single_throughput']:.3f}" if "mixed" in res else ""
        )
        print(
            f"{name:22s} {size:3d}px b={batch:<3d} bare {res['bare']['ms']:9.1f} ms  {cols}{extra}"
            f"  ({reps} reps, {time.perf_counter() - start:.0f} s)",
            flush=True,
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--mixed-batches", type=int, nargs="+", default=[4, 8, 64])
    p.add_argument("--repeats", type=int, default=11, help="repeats at batch sizes <= 8")
    p.add_argument("--repeats-large", type=int, default=3, help="repeats at larger batch sizes")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: stable on a shared machine)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/inference.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    repeats = (args.repeats, args.repeats_large)
    start = time.perf_counter()
    rows = []
    for name in args.models:
        rows += bench_model(name, MODELS[name], args.batches, repeats, args.mixed_batches)
    report = write_report(
        args.out,
        "CPU inference: ratios against the bare timm backbone; mixed vs single-domain batches",
        {
            "models": {m: MODELS[m] for m in args.models},
            "domains": DOMAINS,
            "fusion_available": configure_fusion is not None,
            "statistic": "median over interleaved repeats of (variant time / bare time in the same repeat)",
            "weights": "random; BatchNorm gamma 1 and running statistics estimated on noise",
        },
        rows,
        start,
    )
    print(f"wrote {args.out} ({report['total_wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
