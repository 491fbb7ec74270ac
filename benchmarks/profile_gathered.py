"""Where a gathered batch's time goes, against one domain's batch of the same size (issue 15.8's diagnosis).

For each case, a model with random non-zero adapters (as after training) on a real or calibrated backbone;
times a batch run for one domain (fused weights, plain module tree) and the same batch with its samples
spread over several domains (`mixed_execution="gathered"`), interleaved; then one `torch.profiler` run of
each over `--profiled` calls and the self CPU time per op, per call. Cases: the CIFAR ResNet-56 at 32 px,
batch 8 over 4 domains (overhead-bound), and ResNet-50 at 128 px, batch 16 over 16 domains (compute-bound;
the batches the service forms under 32 closed-loop clients, bench_many_domains.py). One torch thread.

    PYTHONPATH=. python benchmarks/profile_gathered.py --out benchmarks/results/profile_gathered.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from _common import calibrated_backbone, interleaved, served_domains, write_report

from adapterkit import AdapterModel

HERE = Path(__file__).resolve().parent
R56_WEIGHTS = HERE.parent.parent / "shared" / "data" / "resnet_cifar10" / "resnet56.safetensors"
CASES = {"r56": (32, 8, 4), "r50": (128, 16, 16)}  # image size, batch, domains


def build(kind: str, px: int, domains: int) -> AdapterModel:
    if kind == "r56":
        model = AdapterModel.from_backbone(
            "cifar_resnet56", pretrained=R56_WEIGHTS if R56_WEIGHTS.is_file() else False
        )
    else:
        model = AdapterModel.from_backbone(calibrated_backbone("resnet50", px))
    return served_domains(model, domains, px)


def op_times(fn, calls: int) -> tuple[float, dict[str, float]]:
    """Milliseconds per call under the profiler, and the self CPU milliseconds per call of each op,
    largest first (what the ops leave of the call's time is Python and the profiler's own)."""
    for _ in range(3):
        fn()
    with torch.profiler.profile() as prof:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        wall = (time.perf_counter() - start) * 1e3 / calls
    times = {e.key: e.self_cpu_time_total / 1e3 / calls for e in prof.key_averages()}
    return wall, dict(sorted(times.items(), key=lambda kv: -kv[1]))


def profile(kind: str, repeats: int, calls: int) -> dict:
    px, batch, domains = CASES[kind]
    model = build(kind, px, domains)
    x = torch.randn(batch, 3, px, px, generator=torch.Generator().manual_seed(0))
    spread = [f"d{i % domains}" for i in range(batch)]
    fns = {"one": lambda: model(x, domain="d0"), "gathered": lambda: model(x, domain=spread)}
    with torch.inference_mode():
        timed = interleaved(fns, repeats=repeats, baseline="one")
        profiled = {name: op_times(fn, calls) for name, fn in fns.items()}
    ops = {name: o for name, (_, o) in profiled.items()}
    out = {
        "px": px,
        "batch": batch,
        "domains": domains,
        "ms": {name: timed[name]["ms"] for name in fns},
        "gathered_throughput_vs_one": 1 / timed["gathered"]["ratio"],
        "profiled_ms_per_call": {name: wall for name, (wall, _) in profiled.items()},
        "ops_total_ms_per_call": {name: sum(o.values()) for name, o in ops.items()},
    }
    print(kind, out, flush=True)
    largest = {name: {k: round(v, 3) for k, v in o.items() if v >= 0.05} for name, o in ops.items()}
    return out | {"ops_ms_per_call_over_0.05": largest}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="r56,r50")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--profiled", type=int, default=5, help="calls under the profiler")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "profile_gathered.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    results = {kind: profile(kind, args.repeats, args.profiled) for kind in args.cases.split(",")}
    write_report(args.out, "profile_gathered", vars(args) | {"out": str(args.out)}, results, start)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
