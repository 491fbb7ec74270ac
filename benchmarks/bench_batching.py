"""How batches form under steady closed-loop load: the Batcher of this checkout against the one of a git
revision (`adapterkit/serve_batching.py` at `--base`), each run in a fresh server process.

Each run starts one batched server (`create_app`, max_batch_size 32, max_wait_ms 5; bench_serve.py's
model with 4 domains), drives it with `wrk` for a warm-up and a window of one-image requests (over 1
domain, or cycling over 4), and reads the server's own batch-size histogram from `/metrics`. The two
Batchers alternate, `--runs` runs each. A closed loop of N clients can settle into full batches of N,
or into groups that take turns (docs/benchmarks.md, "Batches that take turns"); which one depends on
timing, so it is counted over runs, not read from one.

    PYTHONPATH=. python benchmarks/bench_batching.py --base 961a7d8 --runs 4 --clients 8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import bench_serve
import httpx
from _common import module_at
from _load import free_port, run_load, serve_app

HERE = Path(__file__).resolve().parent


def serve(kind: str, port: int, base: str | None) -> None:
    import torch

    import adapterkit.serve
    from adapterkit.serve import create_app

    torch.set_num_threads(1)
    if base:
        adapterkit.serve.Batcher = module_at(base, "adapterkit/serve_batching.py", "adapterkit").Batcher
    model, _ = bench_serve.build(kind, None)
    app = create_app(model, max_batch_size=32, max_wait_ms=5.0, threads=2)
    serve_app(app, port)


def batch_sizes(url: str) -> list[float]:
    """The batch-size histogram's cumulative counts (buckets 1, 2, 4, 8, 16, 32, ..., +Inf) and its sum."""
    lines = httpx.get(f"{url}/metrics").text.splitlines()
    counts = [float(x.split()[-1]) for x in lines if x.startswith("adapterkit_batch_size_bucket")]
    return counts + [float(x.split()[-1]) for x in lines if x.startswith("adapterkit_batch_size_sum")]


def one_run(args: argparse.Namespace, base: str | None) -> dict:
    port = free_port()
    cmd = [sys.executable, __file__, "--model", args.model, "--serve", str(port)]
    cmd += ["--base", base] if base else []
    path = os.pathsep.join([str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    child = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        if child.stdout.readline().strip() != "READY":
            raise RuntimeError("the server did not start")
        url = f"http://127.0.0.1:{port}"
        payloads = bench_serve.bodies(args.model, args.domains)
        load = run_load(url, payloads, args.clients, 1.0, args.seconds, "wrk")
        *counts, total = batch_sizes(url)
    finally:
        child.stdin.close()
        child.wait(60)
    return {
        "batcher": base or "this checkout",
        "throughput": load["throughput"],
        "p50_ms": load["p50_ms"],
        "failed": load["failed"],
        "batches": counts[-1],
        "mean_batch": total / counts[-1],
        "batches_up_to_4": counts[2],  # (warm-up included: the histogram counts from the start)
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", help="git revision of the Batcher to compare with")
    parser.add_argument("--model", default="r56", choices=sorted(bench_serve.MODELS))
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--domains", type=int, default=1, choices=[1, 4])
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)  # port (child process)
    args = parser.parse_args()
    if args.serve:
        serve(args.model, args.serve, args.base)
        return
    results = []
    for _ in range(args.runs):
        for base in [None, args.base] if args.base else [None]:
            results.append(one_run(args, base))
            print(json.dumps(results[-1]), flush=True)
    for name in dict.fromkeys(r["batcher"] for r in results):
        mine = [r for r in results if r["batcher"] == name]
        print(
            f"{name}: images/s median {statistics.median(r['throughput'] for r in mine):.1f} "
            f"(min {min(r['throughput'] for r in mine):.1f}); mean batch per run "
            f"{[round(r['mean_batch'], 1) for r in mine]}"
        )


if __name__ == "__main__":
    main()
