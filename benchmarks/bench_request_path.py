"""CPU per request of each server thread (event loop, batch worker, decoding pool): adapterkit's service
against the minimal bare server of bench_serve.py. By default on a tiny backbone (`test_resnet` at 32 px),
so that the forward costs little and the request path's own work shows; `--model r56|r50` serves
bench_serve's models. Each server runs in its own process (as bench_serve's: in one shared process, one
server's batch thread could pay page faults the other's did not). Read from /proc per thread over `wrk`
runs of closed-loop clients (Linux; `apt install wrk`).

    PYTHONPATH=. python benchmarks/bench_request_path.py --rounds 3
    PYTHONPATH=. python benchmarks/bench_request_path.py --model r56 --domains 4 --clients 32

Prints, per round and server, requests answered and milliseconds of CPU per request by thread
(docs/benchmarks.md, "Run G").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

import bench_serve
import torch
from _load import free_port, run_load

SERVERS = ("bare", "adapterkit")
SIZE = {"input_size": (3, 32, 32)}


def serve(server: str, port: int, kind: str) -> None:
    import uvicorn

    from adapterkit import AdapterModel
    from adapterkit.inject import create_backbone
    from adapterkit.serve import create_app

    torch.set_num_threads(1)
    if kind == "tiny":
        size, bare = SIZE, create_backbone("test_resnet").eval()
        model = AdapterModel.from_backbone("test_resnet")
        for i in range(4):
            model.add_domain(f"d{i}", 10, data_config=SIZE)
    else:  # bench_serve's models, with its 4 domains
        model, bare = bench_serve.build(kind, None)
        size = {"input_size": bench_serve.MODELS[kind][1]}
    if server == "bare":
        app = bench_serve.bare_app(bare, size, 32, 5.0, 2)
    else:
        app = create_app(model.eval(), max_batch_size=32, max_wait_ms=5.0, threads=2)
    s = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=s.run, daemon=True, name="event-loop").start()
    while not s.started:
        time.sleep(0.05)
    print("READY", flush=True)
    for _ in sys.stdin:  # each line asks for the threads' names (workers start with the first request)
        print(json.dumps({t.native_id: t.name for t in threading.enumerate()}), flush=True)


def cpu(pid: int) -> dict[int, float]:
    """CPU seconds of each thread of `pid`."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--model", default="tiny", choices=["tiny", *sorted(bench_serve.MODELS)])
    parser.add_argument("--domains", type=int, default=1, help="domains the requests cycle over (<= 4)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--serve", nargs=2, help=argparse.SUPPRESS)  # server port (child process)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve[0], int(args.serve[1]), args.model)
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    children, ports = {}, {}
    try:
        for server in SERVERS:
            ports[server] = free_port()
            cmd = [sys.executable, __file__, "--model", args.model, "--serve", server, str(ports[server])]
            children[server] = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
            )
            if children[server].stdout.readline().strip() != "READY":
                raise RuntimeError(f"the {server} server did not start")
        payloads = bench_serve.bodies("r56" if args.model == "tiny" else args.model, args.domains)
        for _ in range(args.rounds):
            for server, child in children.items():
                before = cpu(child.pid)
                run = run_load(
                    f"http://127.0.0.1:{ports[server]}", payloads, args.clients, 0, args.seconds, "wrk"
                )
                after = cpu(child.pid)
                child.stdin.write("names\n")
                child.stdin.flush()
                names = {int(k): v for k, v in json.loads(child.stdout.readline()).items()}
                n = run["answers"]
                busy: dict[str, float] = {}  # by thread name (a pool's threads share theirs)
                for t in after:
                    name = names.get(t, str(t))
                    busy[name] = busy.get(name, 0.0) + 1e3 * (after[t] - before.get(t, 0)) / n
                busy = {k: round(v, 3) for k, v in sorted(busy.items(), key=lambda kv: -kv[1]) if v > 0.01}
                print(json.dumps({"server": server, "requests": n, "cpu_ms_per_request": busy}), flush=True)
    finally:
        for child in children.values():
            child.stdin.close()
            child.wait(60)


if __name__ == "__main__":
    main()
