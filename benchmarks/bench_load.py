"""Loading many domains: time per domain as a family grows, against reading the same files (issue 15.8).

A family of `--domains` domains (random adapters, as after training) is written once; then, in rotated
order over `--repeats` repeats, this process loads its first k domains (`from_pretrained(...,
domains=[...])`, less the same call with `domains=[]`, which builds the backbone alone) for each k
in `--sizes`, and hot-adds one more domain into the model of k
(`load_domain`, then unloads it, `--hot-adds` times). Baseline in the same repeat: reading and parsing
the same k safetensors files (`read_safetensors`, checksums included), the part of a load that no model
code can avoid. Reported per domain, as medians: load / read, and each size's per-domain time against
the smallest size's (1.0x: flat in family size).

    PYTHONPATH=. python benchmarks/bench_load.py                         # ResNet-56, 200 domains
    PYTHONPATH=. python benchmarks/bench_load.py --domains 40 --sizes 10 40 --repeats 2   # smoke
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _common import write_report
from bench_many_domains import build_family

from adapterkit import AdapterModel
from adapterkit.format import read_safetensors


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def one_size(folder: Path, k: int, hot_adds: int) -> dict[str, float]:
    names = [f"d{i}" for i in range(k)]
    files = [folder / "domains" / f"{n}.safetensors" for n in names]
    read = timed(lambda: [read_safetensors(f, "domain file") for f in files])
    model = None

    def load() -> None:
        nonlocal model
        model = AdapterModel.from_pretrained(folder, domains=names)

    backbone_s = timed(lambda: AdapterModel.from_pretrained(folder, domains=[]))
    load_s = timed(load) - backbone_s
    extra = f"d{k}"
    adds = []
    for _ in range(hot_adds):
        adds.append(timed(lambda: model.load_domain(folder, extra)))
        model.unload_domain(extra)
    return {
        "read_ms": 1e3 * read / k,
        "load_ms": 1e3 * load_s / k,
        "hot_add_ms": 1e3 * statistics.median(adds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--domains", type=int, default=200)
    parser.add_argument("--sizes", type=int, nargs="+", default=[25, 100, 199])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hot-adds", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/load.json")
    args = parser.parse_args()
    if max(args.sizes) >= args.domains:
        parser.error("every size must be below --domains (one more domain is hot-added)")
    torch.set_num_threads(1)
    start = time.perf_counter()
    runs: dict[int, list[dict]] = {k: [] for k in args.sizes}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "family"
        build_family("r56", 32, args.domains, folder)
        for r in range(args.repeats):
            sizes = args.sizes[r % len(args.sizes) :] + args.sizes[: r % len(args.sizes)]
            for k in sizes:
                runs[k].append(one_size(folder, k, args.hot_adds))
                print(f"repeat {r} size {k}: {runs[k][-1]}", flush=True)
    rows = {}
    for k, samples in runs.items():
        rows[k] = {key: statistics.median(s[key] for s in samples) for key in samples[0]}
        rows[k]["load_over_read"] = statistics.median(s["load_ms"] / s["read_ms"] for s in samples)
    first = rows[args.sizes[0]]
    for k, row in rows.items():
        row["load_vs_smallest"] = row["load_ms"] / first["load_ms"]
        row["hot_add_vs_smallest"] = row["hot_add_ms"] / first["hot_add_ms"]
        print(
            f"{k:4d} domains: load {row['load_ms']:.1f} ms/domain ({row['load_over_read']:.1f}x reading, "
            f"{row['load_vs_smallest']:.2f}x the smallest), hot-add {row['hot_add_ms']:.1f} ms "
            f"({row['hot_add_vs_smallest']:.2f}x)"
        )
    results = {"sizes": {str(k): v for k, v in rows.items()}, "runs": {str(k): v for k, v in runs.items()}}
    write_report(Path(args.out), "load", vars(args), results, start)


if __name__ == "__main__":
    main()
