"""Many domains in one process (issue 15.8): memory, load time, and batches spread over many domains.

For each model a family of `--domains` domains (random adapters, as after training) is written by a child
process; this process then loads all of it with `AdapterModel.from_pretrained` and measures:

- resident memory: RSS growth over the load against the backbone's tensors plus the sum of domain files;
- load time of the whole family, and per domain;
- throughput of a batch of 32 whose samples draw their domain uniformly at random from 1, 8, 32 or all
  loaded domains, with mixed batches run `gathered` (one pass of the frozen layers, each sample's adapter,
  norm and head gathered) and `grouped` (one pass per domain present, the fused-weight cache at its
  default), as a ratio of the one-domain batch's throughput in the same repeat (interleaved, medians);
- the largest relative difference between the gathered and grouped logits of each batch;
- where grouped execution wins: batches of 8 and 32 over 2, 4 and 8 domains, both ways, and what
  `mixed_execution="auto"` picks;
- over HTTP: the family behind `create_app` (a server process), 32 closed-loop clients sending one-image
  requests whose domains are drawn uniformly from 1, 8, 32 or all domains; throughput and latency against
  the one-domain load in the same repeat (bench_serve.py's load generator), with the server's mean images
  and distinct domains per forward and its forward time per image over each run (read from /metrics).

Models: the CIFAR ResNet-56 at 32 px with the real weights of ../shared/data (overhead-bound on CPU), and
ResNet-50 at `--r50-px` with random calibrated weights (compute-bound). One torch thread. On a GPU
(`--device cuda --mixed-precision bf16 --calls 10`, benchmarks/gpu_session.sh) the model runs there under
autocast, each timed call is `--calls` forwards and a synchronise, and memory is also read as the
device's allocated bytes over the backbone and the files.

    PYTHONPATH=. python benchmarks/bench_many_domains.py                     # both models, 200 domains
    PYTHONPATH=. python benchmarks/bench_many_domains.py --models r56 --domains 40 --repeats 3   # smoke
    PYTHONPATH=. python benchmarks/bench_many_domains.py --models r50 --http-only  # the service only
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from _common import calibrated_backbone, interleaved, on_device, perturb, write_report
from _load import GENERATOR, free_port, run_load, serve_app
from bench_serve import bodies
from prometheus_client.parser import text_string_to_metric_families

from adapterkit import AdapterModel
from adapterkit.layers.gathered import Mixed
from adapterkit.serve_domains import PRECISIONS, autocast

HERE = Path(__file__).resolve().parent
R56_WEIGHTS = HERE.parent.parent / "shared" / "data" / "resnet_cifar10" / "resnet56.safetensors"
BATCH = 32
TOTALS = {  # the server's metrics a run reads (/metrics)
    "adapterkit_batch_size_count": "count",
    "adapterkit_batch_size_sum": "images",
    "adapterkit_batch_domains_sum": "domains",
    "adapterkit_forward_seconds_sum": "forward",
}
BATCH_KEYS = ("mean_batch", "mean_domains", "forward_ms_per_image")


def backbone(kind: str, px: int):
    """(what from_backbone takes, keyword arguments)"""
    if kind == "r56":
        return "cifar_resnet56", {"pretrained": R56_WEIGHTS if R56_WEIGHTS.is_file() else False}
    return calibrated_backbone("resnet50", px), {}


def build_family(kind: str, px: int, n: int, folder: Path) -> None:
    name, kwargs = backbone(kind, px)
    model = AdapterModel.from_backbone(name, **kwargs)
    for i in range(n):
        model.add_domain(f"d{i}", 10, data_config={"input_size": px})
        perturb(model.trainable_parameters(f"d{i}"), seed=i)
    model.save_pretrained(folder)


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def load(kind: str, px: int, n: int, folder: Path, device: str = "cpu") -> tuple[AdapterModel, dict]:
    """The whole family loaded (then moved to `device`), with its memory and time against what is on disk."""
    gc.collect()
    before = rss_bytes()
    kwargs = {} if kind == "r56" else {"backbone": backbone(kind, px)[0]}
    start = time.perf_counter()
    model = AdapterModel.from_pretrained(folder, **kwargs).eval()
    load_s = time.perf_counter() - start
    gc.collect()
    grown = rss_bytes() - before
    files = sum(f.stat().st_size for f in folder.glob("domains/*.safetensors"))
    state = model.backbone.state_dict()
    backbone_bytes = sum(t.numel() * t.element_size() for k, t in state.items() if ".adapters." not in k)
    out = {
        "load_s": load_s,
        "load_ms_per_domain": 1e3 * load_s / n,
        "domain_file_bytes_total": files,
        "backbone_bytes": backbone_bytes,
        "rss_growth_bytes": grown,
        "rss_growth_over_backbone_plus_files": grown / (backbone_bytes + files),
    }
    if device != "cpu":
        on = torch.device(device)
        held = torch.cuda.memory_allocated(on) if on.type == "cuda" else 0
        start = time.perf_counter()
        model.to(on)
        out["to_device_s"] = time.perf_counter() - start
        if on.type == "cuda":
            grown = torch.cuda.memory_allocated(on) - held
            out["device_bytes"] = grown
            out["device_bytes_over_backbone_plus_files"] = grown / (backbone_bytes + files)
    return model, out


def spread(model: AdapterModel, n: int, px: int, repeats: int, timing: dict) -> dict:
    """A batch of 32 over 1, 8, 32 and n domains, gathered and grouped, against one domain (`timing`:
    `on_device`'s device, precision and calls)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, 3, px, px, generator=g).to(timing["device"])
    draws = {
        k: [f"d{int(i)}" for i in torch.randint(0, k, (BATCH,), generator=g)]
        for k in sorted({min(8, n), min(32, n), n})
    }
    fns = {"one": on_device(lambda: model(x, domain="d0"), **timing)}
    for k, domains in draws.items():
        for how in ("gathered", "grouped"):
            fns[f"{how}_{k}"] = on_device(lambda d=domains, h=how: run(model, x, d, h), **timing)
    with torch.inference_mode():
        timed = interleaved(fns, repeats=repeats, baseline="one")
        errors = {}
        for k, domains in draws.items():
            with autocast(timing["precision"], x.device.type):
                a, b = run(model, x, domains, "gathered").float(), run(model, x, domains, "grouped").float()
            finite = torch.isfinite(b)
            errors[k] = float((a - b).abs()[finite].max() / b[finite].abs().max())
    out = {"one_ms": timed["one"]["ms"]}
    for k, domains in draws.items():
        out[str(k)] = {
            "distinct_domains": len(set(domains)),
            "max_relative_difference": errors[k],
            **{
                how: {
                    "ms": timed[f"{how}_{k}"]["ms"],
                    "throughput_vs_one": 1 / timed[f"{how}_{k}"]["ratio"],
                }
                for how in ("gathered", "grouped")
            },
        }
    return out


def serve_family(kind: str, px: int, folder: Path, port: int, device: str, precision: str) -> None:
    """Child process: the whole family behind `create_app` (batches of up to 32, 5 ms wait)."""
    from adapterkit.serve import create_app

    model, _ = load(kind, px, 1, folder, device)
    app = create_app(model, max_batch_size=BATCH, max_wait_ms=5.0, threads=2, mixed_precision=precision)
    serve_app(app, port)


def payloads(kind: str, k: int, n: int = 64) -> list[bytes]:
    """One-image JSON bodies whose domains are drawn uniformly from the first k."""
    image = bodies(kind, 1, n)  # JPEG images of the model's size, domain d0
    rng = random.Random(k)
    out = []
    for body in image:
        request = json.loads(body)
        request["images"][0]["domain"] = f"d{rng.randrange(k)}"
        out.append(json.dumps(request).encode())
    return out


def batch_totals(url: str) -> dict[str, float]:
    """The server's running totals of forwards, images and distinct domains per forward, and forward
    seconds (its /metrics), to tell a slower forward from smaller batches."""
    text = httpx.get(f"{url}/metrics").text
    samples = (s for family in text_string_to_metric_families(text) for s in family.samples)
    totals = {TOTALS[s.name]: s.value for s in samples if s.name in TOTALS}
    return totals


def timed_run(url: str, payloads: list[bytes], window: float, generator: str) -> dict:
    """One closed-loop run of 32 clients, with the server's batches over the run: mean images and
    domains per forward, and forward milliseconds per image."""
    before = batch_totals(url)
    out = run_load(url, payloads, BATCH, 1.0, window, generator)
    after = batch_totals(url)
    d = {k: after[k] - before[k] for k in after}
    out["mean_batch"] = d["images"] / d["count"]
    out["mean_domains"] = d["domains"] / d["count"]
    out["forward_ms_per_image"] = 1e3 * d["forward"] / d["images"]
    return out


def http_spread(
    kind: str, px: int, n: int, folder: Path, repeats: int, window: float, generator: str, on: list[str]
) -> dict:
    """32 closed-loop clients over 1, 8, 32 and n domains against the served family; each spread's
    throughput over the one-domain throughput of the same repeat (rotated order, medians), and the
    server's mean batch size, domains per batch and forward time per image over those runs."""
    gc.collect()
    gc.freeze()  # the load generator's own full collections would stall every client (the server freezes its)
    port = free_port()
    cmd = [sys.executable, __file__, "--domains", str(n), "--serve", kind, str(px), str(folder), str(port)]
    cmd += on  # --device, --mixed-precision
    path = os.pathsep.join([str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")])  # (wheels: GPU)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    process = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)
    try:
        if process.stdout.readline().strip() != "READY":
            raise RuntimeError(f"the {kind} server did not start (exit {process.poll()})")
        url = f"http://127.0.0.1:{port}"
        spreads = sorted({1, min(8, n), min(32, n), n})
        bodies_of = {k: payloads(kind, k) for k in spreads}
        runs: dict[int, list[dict]] = {k: [] for k in spreads}
        for k in spreads:  # warm-up: the server meets every batch size and domain before it is timed
            run_load(url, bodies_of[k], BATCH, 0.0, window / 2, generator)
        for r in range(repeats):
            for k in spreads[r % len(spreads) :] + spreads[: r % len(spreads)]:
                runs[k].append(timed_run(url, bodies_of[k], window, generator))
    finally:
        process.stdin.close()
        process.wait(120)
    out = {}
    for k in spreads:
        ratios = [a["throughput"] / b["throughput"] for a, b in zip(runs[k], runs[1], strict=True)]
        out[str(k)] = {
            "throughput": statistics.median(x["throughput"] for x in runs[k]),
            "throughput_vs_one": statistics.median(ratios),
            "p50_ms": statistics.median(x["p50_ms"] for x in runs[k]),
            "p99_ms": statistics.median(x["p99_ms"] for x in runs[k]),
            "failed": sum(x["failed"] for x in runs[k]),
            **{key: statistics.median(x[key] for x in runs[k]) for key in BATCH_KEYS},
        }
    return out


def policy(model: AdapterModel, px: int, repeats: int, timing: dict) -> dict:
    """Where grouped execution beats gathered: batches of 8 and 32 over 2, 4 and 8 domains (each domain
    the same share), both ways against the one-domain batch of the same size; what `auto` picks."""
    out = {}
    for n in (8, 32):
        x = torch.randn(n, 3, px, px, generator=torch.Generator().manual_seed(n)).to(timing["device"])
        for u in (2, 4, 8):
            domains = [f"d{i % u}" for i in range(n)]
            fns = {"one": on_device(lambda x=x: model(x, domain="d0"), **timing)}
            for how in ("gathered", "grouped"):
                fns[how] = on_device(lambda x=x, d=domains, h=how: run(model, x, d, h), **timing)
            with torch.inference_mode():
                timed = interleaved(fns, repeats=repeats, baseline="one")
            model.mixed_execution = "auto"
            out[f"{n}x{u}"] = {
                **{f"{how}_vs_one": 1 / timed[how]["ratio"] for how in ("gathered", "grouped")},
                "auto_picks": "gathered"
                if model._mixed.gathers(x, Mixed.of(domains, x.device), False)
                else "grouped",
            }
    return out


def run(model: AdapterModel, x: torch.Tensor, domains: list[str], how: str) -> torch.Tensor:
    model.mixed_execution = how
    return model(x, domain=domains)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="r56,r50")
    parser.add_argument("--domains", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--r50-px", type=int, default=128)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "many_domains.json")
    parser.add_argument("--http-only", action="store_true", help="skip the in-process batches and policy")
    parser.add_argument("--window", default="r56=5,r50=12", help="measured seconds per HTTP run, per model")
    parser.add_argument("--load", **GENERATOR)
    parser.add_argument("--device", default="cpu", help="where the model runs (cuda: a GPU)")
    parser.add_argument("--mixed-precision", choices=list(PRECISIONS), default="no", help="autocast dtype")
    parser.add_argument("--calls", type=int, default=1, help="forwards per timed call (10 on a GPU)")
    parser.add_argument("--build", nargs=3, help=argparse.SUPPRESS)  # kind px folder (child process)
    parser.add_argument("--serve", nargs=4, help=argparse.SUPPRESS)  # kind px folder port (child process)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.build:
        build_family(args.build[0], int(args.build[1]), args.domains, Path(args.build[2]))
        return
    if args.serve:
        kind, px, folder, port = args.serve
        serve_family(kind, int(px), Path(folder), int(port), args.device, args.mixed_precision)
        return
    windows = {k: float(v) for k, v in (item.split("=") for item in args.window.split(","))}
    timing = {"device": torch.device(args.device), "precision": args.mixed_precision, "calls": args.calls}
    start = time.perf_counter()
    results = {}
    for kind in args.models.split(","):
        px = 32 if kind == "r56" else args.r50_px
        with tempfile.TemporaryDirectory(prefix=f"bench-many-{kind}-") as tmp:
            folder = Path(tmp) / "family"
            # another process writes the family, so that this one's heap has nothing freed to reuse
            cmd = [
                sys.executable,
                __file__,
                "--domains",
                str(args.domains),
                "--build",
                kind,
                str(px),
                str(folder),
            ]
            subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            model, memory = load(kind, px, args.domains, folder, args.device)
            results[kind] = {"px": px, **memory}
            if not args.http_only:
                results[kind]["batches"] = spread(model, args.domains, px, args.repeats, timing)
                results[kind]["policy"] = policy(model, px, args.repeats, timing)
            del model
            gc.collect()
            on = ["--device", args.device, "--mixed-precision", args.mixed_precision]
            http = http_spread(kind, px, args.domains, folder, args.repeats, windows[kind], args.load, on)
            results[kind]["http_32_clients"] = http
            print(json.dumps({kind: results[kind]}, indent=1), flush=True)
    config = {
        "domains": args.domains,
        "repeats": args.repeats,
        "batch": BATCH,
        "threads": 1,
        "window": windows,
        "device": args.device,
        "mixed_precision": args.mixed_precision,
        "calls": args.calls,
    }
    write_report(args.out, "many_domains", config, results, start)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
