"""HTTP load for the serving benchmarks: closed-loop clients sending JSON predict requests, driven by `wrk`
(C, one thread: it takes little of the CPU the servers share with it; `apt install wrk`) or by asyncio +
httpx in this process (`python`, which also reads each answer's Server-Timing and its own loop's lag).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_app(app, port: int) -> None:
    """Serve `app` on loopback `port` (uvicorn, in a thread), print READY, and stop once the parent
    process closes our stdin: the server side of a benchmark's child process."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    print("READY", flush=True)
    sys.stdin.read()
    server.should_exit = True


WRK_SCRIPT = """
local bodies, n = {}, 0
for i, path in ipairs({%s}) do
  local f = io.open(path, "rb"); bodies[i] = f:read("*all"); f:close()
end
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  n = n + 1
  return wrk.format(nil, "/v1/predict", nil, bodies[(n - 1) %% #bodies + 1])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('{"requests": %%d, "duration_us": %%d, "p50_us": %%d, "p99_us": %%d, ' ..
    '"status_errors": %%d, "other_errors": %%d}\\n', summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), e.status, e.connect + e.read + e.write + e.timeout))
end
"""


GENERATOR = {  # the --load option of bench_serve.py and bench_many_domains.py
    "choices": ["wrk", "python"],
    "default": "wrk" if shutil.which("wrk") else "python",
    "help": "load generator: wrk (apt install wrk; the default where installed) or asyncio + httpx",
}


def run_load(
    url: str, payloads: list[bytes], clients: int, warmup: float, window: float, generator: str
) -> dict:
    """One closed-loop run of `clients` clients: `wrk` (C, one thread: it takes little of the CPU the
    servers share with it) or `python` (asyncio + httpx in this process, which also reads each answer's
    Server-Timing)."""
    if generator == "python":
        return asyncio.run(closed_loop(url, payloads, clients, warmup, window))
    with tempfile.TemporaryDirectory(prefix="bench-serve-wrk-") as tmp:
        paths = []
        for i, body in enumerate(payloads):
            paths.append(Path(tmp) / f"{i}.json")
            paths[-1].write_bytes(body)
        script = Path(tmp) / "post.lua"
        script.write_text(WRK_SCRIPT % ", ".join(json.dumps(str(p)) for p in paths))
        cmd = ["wrk", "-t1", f"-c{clients}", "--timeout", "120s", "-s", str(script), url]
        if warmup > 0:  # (wrk takes whole seconds)
            subprocess.run([*cmd, f"-d{max(1, round(warmup))}s"], capture_output=True, check=True)
        out = subprocess.run(
            [*cmd, f"-d{max(1, round(window))}s"], capture_output=True, text=True, check=True
        )
    r = json.loads(out.stdout.strip().splitlines()[-1])
    answers = r["requests"] - r["status_errors"]
    return {
        "throughput": answers / (r["duration_us"] / 1e6),
        "p50_ms": r["p50_us"] / 1e3,
        "p99_ms": r["p99_us"] / 1e3,
        "answers": answers,
        "failed": r["status_errors"] + r["other_errors"],
    }


async def closed_loop(url: str, payloads: list[bytes], clients: int, warmup: float, window: float) -> dict:
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    latencies: list[float] = []
    server: list[float] = []  # each answer's time in the server (its Server-Timing `total`)
    failed = 0
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        t_start = time.perf_counter() + warmup
        t_end = t_start + window

        async def worker(k: int) -> None:
            nonlocal failed
            i = k
            while time.perf_counter() < t_end:
                body = payloads[i % len(payloads)]
                i += clients
                t0 = time.perf_counter()
                r = await client.post(
                    "/v1/predict", content=body, headers={"content-type": "application/json"}
                )
                t1 = time.perf_counter()
                failed += r.status_code != 200
                if t_start <= t1 <= t_end:
                    latencies.append(t1 - t0)
                    timing = r.headers.get("server-timing", "")
                    server.extend(
                        float(p.split("=")[1]) / 1e3 for p in timing.split(", ") if p.startswith("total;")
                    )

        async def probe() -> None:  # the load generator's own event-loop lag (its CPU share on this host)
            while time.perf_counter() < t_end:
                t0 = time.perf_counter()
                await asyncio.sleep(0.01)
                if t_start <= t0:
                    lags.append(time.perf_counter() - t0 - 0.01)

        lags: list[float] = []
        await asyncio.gather(probe(), *(worker(k) for k in range(clients)))
    return {
        "throughput": len(latencies) / window,
        **quantiles("", latencies),
        **quantiles("server_", server),
        **quantiles("client_lag_", lags),
        "answers": len(latencies),
        "failed": failed,
    }


def quantiles(prefix: str, seconds: list[float]) -> dict[str, float]:
    """p50 and p99 in milliseconds, keyed `{prefix}p50_ms`, `{prefix}p99_ms`."""
    seconds, n = sorted(seconds), len(seconds)
    return {
        f"{prefix}p50_ms": 1e3 * seconds[n // 2] if n else float("nan"),
        f"{prefix}p99_ms": 1e3 * seconds[min(n - 1, int(0.99 * n))] if n else float("nan"),
    }
