"""Hot-add latency: `model.load_domain(repo_id, name)` from a local adapterkit registry, for ResNet-50
families of 1, 10 and 50 domains.

The registry (`adapterkit_registry.RegistryServer`) runs in this process on loopback, as in the tests.
Each family is pushed once (`push_to_hub`, random adapter weights). A served model (the same
backbone, no domains) then hot-adds one domain at a time, cold: a fresh Hub cache per load, so each
load downloads `adapterkit.json` and the domain's file, checks and builds the domain, and publishes it;
the domain is unloaded again afterwards. Interleaved with each load, the baseline: a bare
`hf_hub_download` of the same domain file into another fresh cache (the transfer floor).

Run from the repository root:
    PYTHONPATH=. python benchmarks/bench_hotadd.py
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

TMP = Path(tempfile.mkdtemp(prefix="adapterkit-bench-hotadd-"))
atexit.register(shutil.rmtree, TMP, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# huggingface_hub reads these when it is imported (timm imports it): set them first.
PORT = _free_port()
os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{PORT}"
os.environ["HF_HOME"] = str(TMP / "hf_home")
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "HF_HUB_DISABLE_XET"):
    os.environ.pop(var, None)
assert "huggingface_hub" not in sys.modules

import copy  # noqa: E402

import timm  # noqa: E402
import torch  # noqa: E402
from _common import perturb, write_report  # noqa: E402
from adapterkit_registry import RegistryServer  # noqa: E402
from huggingface_hub import hf_hub_download  # noqa: E402

from adapterkit import AdapterModel  # noqa: E402

TOKEN = "bench-write-token-for-hot-add"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--families", type=int, nargs="+", default=[1, 10, 50])
    p.add_argument("--repeats", type=int, default=7, help="hot-adds per family size")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/hotadd.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    torch.manual_seed(0)
    backbone = timm.create_model(args.backbone).eval()
    source = AdapterModel(copy.deepcopy(backbone), backbone_name=args.backbone).eval()
    names = [f"d{i:02d}" for i in range(max(args.families))]
    for i, name in enumerate(names):
        source.add_domain(name, num_classes=10)
        perturb(source.trainable_parameters(name), seed=i)
    domain_mb = sum(t.numel() * t.element_size() for t in source.domain_state_dict(names[0]).values()) / 2**20
    served = AdapterModel(copy.deepcopy(backbone), backbone_name=args.backbone).eval()
    rows = []
    with RegistryServer(TMP / "registry", port=PORT, tokens={TOKEN: ("bench", "write")}):
        repos = {}
        for n in args.families:
            t0 = time.perf_counter()
            repos[n] = f"bench/{args.backbone}-{n}-domains"
            source.push_to_hub(repos[n], domains=names[:n], token=TOKEN)
            print(f"pushed {repos[n]} ({n} domains, {time.perf_counter() - t0:.1f} s)", flush=True)
        times: dict[int, dict[str, list[float]]] = {n: {"load": [], "download": []} for n in args.families}
        for r in range(args.repeats):
            sizes = args.families[r % len(args.families) :] + args.families[: r % len(args.families)]
            for n in sizes:
                name = names[r % n]
                cache = TMP / f"cache-{n}-{r}"
                t0 = time.perf_counter()
                served.load_domain(repos[n], name, token=TOKEN, cache_dir=cache / "load")
                times[n]["load"].append(time.perf_counter() - t0)
                served.unload_domain(name)
                t0 = time.perf_counter()
                hf_hub_download(repos[n], f"domains/{name}.safetensors", token=TOKEN, cache_dir=cache / "raw")
                times[n]["download"].append(time.perf_counter() - t0)
        base = statistics.median(times[args.families[0]]["load"])
        for n in args.families:
            load, raw = times[n]["load"], times[n]["download"]
            row = {
                "family_domains": n,
                "load_s": statistics.median(load),
                "load_s_max": max(load),
                "download_s": statistics.median(raw),
                "load_over_download": statistics.median(a / b for a, b in zip(load, raw, strict=True)),
                "load_over_smallest_family": statistics.median(load) / base,
                "times_s": {"load": load, "download": raw},
            }
            rows.append(row)
            print(
                f"family of {n:3d}: load_domain {1e3 * row['load_s']:7.1f} ms (max {1e3 * row['load_s_max']:.0f})  "
                f"bare download {1e3 * row['download_s']:6.1f} ms  load/download x{row['load_over_download']:.2f}  "
                f"vs family of {args.families[0]}: x{row['load_over_smallest_family']:.2f}",
                flush=True,
            )
    report = write_report(
        args.out,
        "hot-add latency of load_domain from a local registry vs family size",
        {
            "backbone": args.backbone,
            "families": args.families,
            "repeats": args.repeats,
            "domain_file_mib": domain_mb,
            "cache": "fresh Hub cache per load (cold: adapterkit.json + the domain file are downloaded)",
            "registry": "adapterkit_registry.RegistryServer in the same process, loopback HTTP",
        },
        rows,
        start,
    )
    print(f"wrote {args.out} ({report['total_wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
