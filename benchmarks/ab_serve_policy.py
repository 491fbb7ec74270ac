"""HTTP A/B of `auto` mixed execution's rule: two batched servers of one model, the rule before the
compute-bound clause (`old`: grouped at 8 images a domain, or 4 with at most 4 domains) and the current
one, plus the bare server, each in its own process (as bench_serve's), driven in turn by `wrk` with
one-image requests cycling over 4 domains.

    PYTHONPATH=. python benchmarks/ab_serve_policy.py --model r50 --clients 8 --rounds 3 --seconds 8

Prints each round's images/s per server and the new/old ratio of each round (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import types

import bench_serve
import torch
from _load import free_port, run_load, serve_app

SERVERS = ("bare", "old", "new")


def old_rule(self, x: torch.Tensor, mixed) -> bool:
    """The rule before the compute-bound clause (mixed.py's GROUPED_IMAGES and GROUPED_FEW alone)."""
    per_domain, n = x.shape[0] / len(mixed.domains), len(mixed.domains)
    return per_domain >= 8 or (n <= 4 and per_domain >= 4)


def serve(kind: str, server: str, port: int) -> None:

    from adapterkit.serve import create_app

    torch.set_num_threads(1)
    model, bare = bench_serve.build(kind, None)
    if server == "bare":
        app = bench_serve.bare_app(bare, {"input_size": bench_serve.MODELS[kind][1]}, 32, 5.0, 2)
    else:
        if server == "old":
            model._mixed._fair = types.MethodType(old_rule, model._mixed)
        app = create_app(model, max_batch_size=32, max_wait_ms=5.0, threads=2)
    serve_app(app, port)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="r50", choices=sorted(bench_serve.MODELS))
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--serve", nargs=2, help=argparse.SUPPRESS)  # server port (child process)
    args = parser.parse_args()
    if args.serve:
        serve(args.model, args.serve[0], int(args.serve[1]))
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    children, ports = [], {}
    try:
        for server in SERVERS:
            ports[server] = free_port()
            cmd = [sys.executable, __file__, "--model", args.model, "--serve", server, str(ports[server])]
            children.append(
                subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
            )
            if children[-1].stdout.readline().strip() != "READY":
                raise RuntimeError(f"the {server} server did not start")
        payloads = bench_serve.bodies(args.model, 4)
        rounds = []
        for _ in range(args.rounds):
            rounds.append({
                name: run_load(f"http://127.0.0.1:{port}", payloads, args.clients, 1.0, args.seconds, "wrk")["throughput"]
                for name, port in ports.items()
            })  # fmt: skip
            print(json.dumps({**rounds[-1], "new/old": rounds[-1]["new"] / rounds[-1]["old"]}), flush=True)
    finally:
        for child in children:
            child.stdin.close()
            child.wait(60)


if __name__ == "__main__":
    main()
