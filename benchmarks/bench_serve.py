"""Serving benchmark (issue 15.7): closed-loop HTTP load on `adapterkit.serve` with dynamic batching,
the same server with batching off, and a minimal server running the bare timm backbone with the same
batching; plus hot-add latency under load.

Three servers per model, each in its own process on its own loopback port, as they are deployed:
`batched` (create_app, max_batch_size 32), `unbatched` (create_app, max_batch_size 1) and `bare` (a 40-line
Starlette app: JSON base64 images, the same decoding, preprocessing and `Batcher`, the bare backbone's
forward, top-1). The adapterkit servers serve one model with 4 domains (random adapters, as after
training; each process builds the same model from the same seeds). Until run G the three shared one
process, where the batch thread of one server could get a malloc arena that returned its heap to the
kernel after every forward (ResNet-50: 4,354 page faults, about 10 % of a one-image forward, in one
server's thread and not in the others'). The load
generator runs N closed-loop clients, each sending one-image requests back to back (over 1 domain, or
cycling over 4 so that batches mix domains), for a warm-up and then a measured window; throughput counts
answers completed in the window, latencies are theirs. It is `wrk` where installed (`apt install wrk`: C,
one thread, so the servers keep the CPU they share with it), else asyncio + httpx in this process
(`--load python`), which takes a core's share of the 2 and adds its own event loop's lag to every latency:
it also reads each answer's `Server-Timing` (the server's own p50/p99) and its own loop's lag. For every
(model, clients, domains) cell the three servers run interleaved in a rotated order, `--repeats` times,
and each figure is the median over repeats of the ratio to `bare` measured in the same repeat.

Hot-add: with 32 clients on the batched server, `POST /v1/domains` loads a 5th domain from a family
folder mid-window and `DELETE` removes it; its latency under load vs idle, and failed requests.

Many domains in one process (issue 15.8) are measured by bench_many_domains.py.

On a GPU (`--device cuda --mixed-precision bf16 --px r50=224`, benchmarks/gpu_session.sh) every server runs
its forward there under autocast, the bare one included.

Run from the repository root (CIFAR ResNet-56 weights from ../shared/data when present):
    PYTHONPATH=. python benchmarks/bench_serve.py                  # ~15 min on 2 cores
    PYTHONPATH=. python benchmarks/bench_serve.py --models r56 --clients 1,8 --repeats 1   # smoke
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from _load import GENERATOR, closed_loop, free_port, run_load, serve_app
from PIL import Image

ROOT = Path(__file__).resolve().parent
R56_WEIGHTS = ROOT.parent.parent / "shared" / "data" / "resnet_cifar10" / "resnet56.safetensors"
MODELS = {"r56": ("cifar_resnet56", 32, 36), "r50": ("resnet50", 128, 146)}  # name, input px, image px
TOKEN = "bench-serve-admin-token"
VARIANTS = ("bare", "batched", "unbatched")


# ---------------------------------------------------------------------- server side
def build(kind: str, family_dir: Path | None):
    """(AdapterModel with d0..d3, bare backbone with the same weights); d4 only in `family_dir` (when
    given: the family is written there)."""
    import copy

    from _common import calibrated_backbone, perturb

    from adapterkit import AdapterModel
    from adapterkit.inject import create_backbone

    name, size, _ = MODELS[kind]
    if kind == "r56":
        weights = R56_WEIGHTS if R56_WEIGHTS.is_file() else False
        bare = create_backbone(name, weights)
        model = AdapterModel.from_backbone(name, pretrained=weights)
    else:
        module = calibrated_backbone(name, size)
        bare = copy.deepcopy(module)
        model = AdapterModel.from_backbone(module)
    for i in range(5):
        model.add_domain(f"d{i}", 10, data_config={"input_size": size})
        perturb(model.trainable_parameters(f"d{i}"), seed=i)
    if family_dir is not None:
        model.save_pretrained(family_dir)
    model.remove_domain("d4")
    return model.eval(), bare.eval()


def bare_app(
    bare, data_config: dict, max_batch_size: int, max_wait_ms: float, threads: int, precision: str = "no"
):
    """A minimal server for the bare backbone: same JSON body, decoding, preprocessing and batching (on
    the backbone's device, under autocast in `precision`)."""
    from concurrent.futures import ThreadPoolExecutor

    import torch
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from adapterkit.serve_batching import Batcher, Item, server_timing
    from adapterkit.serve_domains import autocast
    from adapterkit.transforms import Preprocess, resolve_data_config

    preprocess = Preprocess(resolve_data_config(bare.pretrained_cfg, data_config))
    pool = ThreadPoolExecutor(threads)
    device = next(bare.parameters()).device

    def run(items):
        with torch.inference_mode(), autocast(precision, device.type):
            return list(bare(torch.stack([i.x for i in items]).to(device)).float().cpu())

    batcher = Batcher(run, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, queue_size=256)

    def decode(data: str):
        return preprocess(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))

    async def predict(request):
        began = time.monotonic()
        loop = asyncio.get_running_loop()
        body = json.loads(await request.body())
        with batcher.expecting(len(body["images"])):
            xs = await asyncio.gather(
                *(loop.run_in_executor(pool, decode, i["data"]) for i in body["images"])
            )
            items = [Item(x, "bare", loop.create_future(), loop) for x in xs]
            batcher.submit(items)
        rows = await asyncio.gather(*(i.future for i in items))
        out = []
        for row in rows:
            score, index = torch.softmax(row, 0).max(0)
            out.append({"index": int(index), "score": float(score)})
        return JSONResponse({"predictions": out}, headers={"Server-Timing": server_timing(began, items)})

    return Starlette(routes=[Route("/v1/predict", predict, methods=["POST"])])


def run_server(kind: str, variant: str, port: int, family_dir: Path, threads: int, on: dict) -> None:
    """One server of `variant` on `port` until the parent closes our stdin; `batched` also writes the family
    folder the hot-add reads (the other servers' models are the same, built from the same seeds); `on`:
    the device and mixed precision."""
    import torch

    from adapterkit.serve import create_app

    torch.set_num_threads(1)
    model, bare = build(kind, family_dir if variant == "batched" else None)
    if variant == "bare":
        app = bare_app(
            bare.to(on["device"]), {"input_size": MODELS[kind][1]}, 32, 5.0, threads, on["precision"]
        )
    else:
        size, wait = (32, 5.0) if variant == "batched" else (1, 0)
        app = create_app(
            model.to(on["device"]),
            max_batch_size=size,
            max_wait_ms=wait,
            admin_token=TOKEN,
            threads=threads,
            mixed_precision=on["precision"],
        )
    serve_app(app, port)


# ---------------------------------------------------------------------- load side
def bodies(kind: str, domains: int, n: int = 16) -> list[bytes]:
    """JSON bodies of one JPEG image each, cycling over `domains` domains."""
    px = MODELS[kind][2]
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (px, px, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=90)
        data = base64.b64encode(buffer.getvalue()).decode()
        out.append(json.dumps({"images": [{"domain": f"d{i % domains}", "data": data}]}).encode())
    return out


async def hot_add_under_load(url: str, payloads: list[bytes], family_dir: Path, clients: int, window: float):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    body = {"source": str(family_dir), "domain": "d4"}
    async with httpx.AsyncClient(base_url=url, timeout=120) as admin:

        async def change() -> dict:
            t0 = time.perf_counter()
            r = await admin.post("/v1/domains", json=body, headers=auth)
            t1 = time.perf_counter()
            assert r.status_code == 201, r.text
            d = await admin.delete("/v1/domains/d4", headers=auth)
            t2 = time.perf_counter()
            assert d.status_code == 200, d.text
            return {"hot_add_s": t1 - t0, "remove_s": t2 - t1}

        idle = await change()
        load = asyncio.create_task(closed_loop(url, payloads, clients, 1.0, window))
        await asyncio.sleep(1.0 + window / 3)
        busy = await change()
        result = await load
    return {"idle": idle, "under_load": busy, "load": result}


def start_servers(
    kind: str, family_dir: Path, threads: int, on: list[str]
) -> tuple[list[subprocess.Popen], dict[str, str]]:
    """One process per server variant of `kind`, each started once the last answers; {variant: url}."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONFAULTHANDLER": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT.parent), os.environ.get("PYTHONPATH", "")]),
    }
    processes, urls = [], {}
    for variant in VARIANTS:
        port = free_port()
        cmd = [sys.executable, __file__, "--serve", kind, "--variant", variant, "--port", str(port)]
        cmd += ["--family", str(family_dir), "--threads", str(threads), *on]
        process = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)
        processes.append(process)
        if process.stdout.readline().strip() != "READY":
            stop_servers(processes)
            raise RuntimeError(f"the {kind} {variant} server did not start (exit {process.poll()})")
        urls[variant] = f"http://127.0.0.1:{port}"
    return processes, urls


def stop_servers(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        process.stdin.close()
    for process in processes:
        process.wait(60)


def run_cell(
    urls: dict, payloads: list[bytes], clients: int, repeats: int, window: float, generator: str
) -> dict:
    """Each variant `repeats` times, interleaved in a rotated order; raw runs per variant."""
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for r in range(repeats):
        order = VARIANTS[r % 3 :] + VARIANTS[: r % 3]
        for variant in order:
            runs[variant].append(run_load(urls[variant], payloads, clients, 1.0, window, generator))
    return runs


def summarise(runs: dict[str, list[dict]]) -> dict:
    """Medians per variant and the same-repeat ratios the targets are stated in."""

    def med(v: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[v])

    def ratio(a: str, b: str) -> float:
        return statistics.median(
            x["throughput"] / y["throughput"] for x, y in zip(runs[a], runs[b], strict=True)
        )

    keys = ("throughput", "p50_ms", "p99_ms", "server_p50_ms", "server_p99_ms", "client_lag_p99_ms")
    out = {v: {k: med(v, k) for k in keys if k in runs[v][0]} for v in VARIANTS}
    out["failed"] = sum(r["failed"] for v in VARIANTS for r in runs[v])
    out["batched_vs_bare"] = ratio("batched", "bare")
    out["unbatched_vs_bare"] = ratio("unbatched", "bare")
    out["batched_vs_unbatched"] = ratio("batched", "unbatched")
    out["p99_over_p50"] = {v: out[v]["p99_ms"] / out[v]["p50_ms"] for v in VARIANTS}
    if "server_p50_ms" in out["bare"]:  # (the python load generator reads each answer's Server-Timing)
        out["server_p99_over_p50"] = {v: out[v]["server_p99_ms"] / out[v]["server_p50_ms"] for v in VARIANTS}
    return out


def run_benchmark(args: argparse.Namespace) -> None:
    from _common import write_report

    start = time.perf_counter()
    gc.collect()
    gc.freeze()  # the load generator's own full collections would add its pauses to every server's latency
    windows = dict(item.split("=") for item in args.window.split(","))
    results: dict = {"cells": [], "hot_add": {}}
    for kind in args.models.split(","):
        with tempfile.TemporaryDirectory(prefix=f"bench-serve-{kind}-") as tmp:
            on = ["--device", args.device, "--mixed-precision", args.mixed_precision, "--px", args.px]
            processes, urls = start_servers(kind, Path(tmp) / "family", args.threads, on)
            try:
                window = float(windows[kind])
                for domains in map(int, args.domains.split(",")):
                    payloads = bodies(kind, domains)
                    for clients in map(int, args.clients.split(",")):
                        runs = run_cell(urls, payloads, clients, args.repeats, window, args.load)
                        cell = {"model": kind, "domains": domains, "clients": clients, **summarise(runs)}
                        cell["runs"] = runs
                        results["cells"].append(cell)
                        print(json.dumps({k: v for k, v in cell.items() if k != "runs"}), flush=True)
                hot = asyncio.run(
                    hot_add_under_load(urls["batched"], bodies(kind, 4), Path(tmp) / "family", 32, window)
                )
                results["hot_add"][kind] = hot
                print(json.dumps({"hot_add": kind, **hot}), flush=True)
            finally:
                stop_servers(processes)
    config = {k: v for k, v in vars(args).items() if k not in ("serve", "ports", "family", "out")}
    config["models"] = {
        k: {"timm": MODELS[k][0], "input_px": MODELS[k][1], "image_px": MODELS[k][2]} for k in MODELS
    }
    config["r56_weights"] = str(R56_WEIGHTS) if R56_WEIGHTS.is_file() else "random"
    write_report(args.out, "serve", config, results, start)
    print(f"wrote {args.out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--family", help=argparse.SUPPRESS)
    parser.add_argument("--models", default="r56,r50")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--domains", default="1,4")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--window", default="r56=5,r50=12", help="measured seconds per run, per model")
    parser.add_argument("--threads", type=int, default=2, help="decoding threads of each server")
    parser.add_argument("--load", **GENERATOR)
    parser.add_argument("--device", default="cpu", help="where the servers run their forwards (cuda: a GPU)")
    parser.add_argument(
        "--mixed-precision", choices=["no", "bf16", "fp16"], default="no", help="autocast dtype"
    )
    parser.add_argument("--px", default="", help="input px per model, e.g. r50=224 (images 1/0.875 larger)")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "serve.json")
    args = parser.parse_args()
    for item in filter(None, args.px.split(",")):
        kind, px = item.split("=")
        MODELS[kind] = (MODELS[kind][0], int(px), round(int(px) / 0.875))
    if args.serve:
        on = {"device": args.device, "precision": args.mixed_precision}
        run_server(args.serve, args.variant, args.port, Path(args.family), args.threads, on)
        return
    run_benchmark(args)


if __name__ == "__main__":
    main()
