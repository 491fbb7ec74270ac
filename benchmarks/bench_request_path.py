"""CPU per request of each server thread (event loop, batch worker, decoding pool): adapterkit's service
against the minimal bare server of bench_serve.py, on a tiny backbone (`test_resnet` at 32 px), so that
the forward costs little and the request path's own work shows. Read from /proc per thread over `wrk`
runs of 8 closed-loop clients (Linux; `apt install wrk`).

    PYTHONPATH=. python benchmarks/bench_request_path.py --rounds 3

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

SERVERS = ("bare", "adapterkit")
SIZE = {"input_size": (3, 32, 32)}


def serve(ports: list[int]) -> None:
    import uvicorn

    from adapterkit import AdapterModel
    from adapterkit.inject import create_backbone
    from adapterkit.serve import create_app

    torch.set_num_threads(1)
    model = AdapterModel.from_backbone("test_resnet")
    model.add_domain("d0", 10, data_config=SIZE)
    apps = [
        bench_serve.bare_app(create_backbone("test_resnet").eval(), SIZE, 32, 5.0, 2),
        create_app(model.eval(), max_batch_size=32, max_wait_ms=5.0, threads=2),
    ]
    for port, app, server in zip(ports, apps, SERVERS, strict=True):
        s = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        threading.Thread(target=s.run, daemon=True, name=f"{server}-event-loop").start()
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
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve([int(p) for p in args.serve.split(",")])
        return
    ports = [bench_serve.free_port() for _ in SERVERS]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--serve", ",".join(map(str, ports))]
    child = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        if child.stdout.readline().strip() != "READY":
            raise RuntimeError("the servers did not start")
        payloads = bench_serve.bodies("r56", 1)  # 36 px JPEGs for domain d0
        for _ in range(args.rounds):
            for server, port in zip(SERVERS, ports, strict=True):
                before = cpu(child.pid)
                run = bench_serve.run_load(f"http://127.0.0.1:{port}", payloads, 8, 0, args.seconds, "wrk")
                after = cpu(child.pid)
                child.stdin.write("names\n")
                child.stdin.flush()
                names = {int(k): v for k, v in json.loads(child.stdout.readline()).items()}
                n = run["answers"]
                busy: dict[str, float] = {}  # by thread name (both servers' batch workers share theirs)
                for t in after:
                    name = names.get(t, str(t))
                    busy[name] = busy.get(name, 0.0) + 1e3 * (after[t] - before.get(t, 0)) / n
                busy = {k: round(v, 3) for k, v in sorted(busy.items(), key=lambda kv: -kv[1]) if v > 0.01}
                print(json.dumps({"server": server, "requests": n, "cpu_ms_per_request": busy}), flush=True)
    finally:
        child.stdin.close()
        child.wait(60)


if __name__ == "__main__":
    main()
