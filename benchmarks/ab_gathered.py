"""The gathered pass of another commit against this checkout's, in one process (issue 15.8's A/B check).

Loads `adapterkit/layers/gathered.py` as it was at `--old` next to the current one and runs the CIFAR
ResNet-56 (real weights when present) on a one-domain batch and on the same batch spread over `--domains`
domains, gathered by each version in turn: interleaved, rotated, thread CPU time, one torch thread. Prints
each version's throughput against the one-domain batch (median over repeats of the per-repeat ratio) and its
largest difference from per-sample execution. Only `gathered.py` changes: the rest (tables, wrappers) is
this checkout's in both.

    PYTHONPATH=. python benchmarks/ab_gathered.py --old 61be15f --batch 8 --domains 4
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time
import types
from pathlib import Path

import torch
from profile_gathered import build

import adapterkit.layers.gathered as current
from adapterkit.layers import norm, wrappers

ROOT = Path(__file__).resolve().parent.parent


def gathered_at(commit: str) -> types.ModuleType:
    """`adapterkit/layers/gathered.py` as it was at `commit`, as a module of the package."""
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{commit}:adapterkit/layers/gathered.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    module = types.ModuleType("adapterkit.layers.gathered_old")
    module.__package__ = "adapterkit.layers"
    exec(compile(source, f"gathered.py@{commit}", "exec"), module.__dict__)  # noqa: S102 (our own file)
    return module


def use(module: types.ModuleType) -> None:
    """Route the wrappers' mixed-batch calls to `module`'s functions."""
    wrappers.conv_forward, wrappers.linear_forward = module.conv_forward, module.linear_forward
    norm.norm_forward = module.norm_forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", default="HEAD", help="the commit whose gathered.py is the baseline")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--domains", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)
    versions = {"old": gathered_at(args.old), "new": current}
    model = build("r56", 32, args.domains)
    x = torch.randn(args.batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    spread = [f"d{i % args.domains}" for i in range(args.batch)]
    fns = {"one": lambda: model(x, domain="d0")}
    for name, module in versions.items():
        fns[name] = lambda module=module: (use(module), model(x, domain=spread))[1]
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.inference_mode():
        alone = torch.cat([model(x[i : i + 1], domain=d) for i, d in enumerate(spread)])
        for name in versions:
            error = (fns[name]() - alone).abs().max() / alone.abs().max()
            print(f"{name}: largest difference from per-sample execution {float(error):.1e}")
        names = list(fns)
        for r in range(args.repeats):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                start = time.thread_time()
                fns[name]()
                times[name].append(time.thread_time() - start)
    use(current)
    for name, t in times.items():
        ratio = statistics.median(b / a for a, b in zip(t, times["one"], strict=True))
        print(f"{name:4s} {1e3 * statistics.median(t):7.2f} ms a batch, throughput vs one domain {ratio:.3f}")


if __name__ == "__main__":
    main()
