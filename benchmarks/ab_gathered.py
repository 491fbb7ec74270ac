"""Same-process A/B of the gathered mixed-domain pass: `layers/gathered.py` at a git revision against the
working tree's, each as a ratio of one domain's batch of the same size.

For each case (`backbone:px:batch:domains`), a model with random non-zero adapters (as after training) on a
random backbone; three variants interleaved in rotated order: one domain's batch (fused weights, plain
tree), the batch spread over the domains with the revision's gathered functions, and with the working
tree's. Thread CPU time (`time.thread_time`, one torch thread: every op runs in the calling thread), which
other jobs on shared cores move less than wall time; medians of per-repeat ratios. Also prints each
version's largest difference from running each sample alone, relative to the largest logit. The CIFAR
ResNet-56 gets its real weights when `../shared/data/resnet_cifar10/` has them.

    PYTHONPATH=. python benchmarks/ab_gathered.py --base 61be15f convnext_atto:64:32:32 cifar_resnet56:32:8:4
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import types
from pathlib import Path

import torch
from _common import module_at, served_domains, write_report

import adapterkit.layers.norm as norm_module
import adapterkit.layers.wrappers as wrappers
from adapterkit import AdapterModel

HERE = Path(__file__).resolve().parent
R56_WEIGHTS = HERE.parent.parent / "shared" / "data" / "resnet_cifar10" / "resnet56.safetensors"
NAMES = ("conv_forward", "linear_forward", "norm_forward")


def _module_at(revision: str, name: str) -> types.ModuleType:
    """`adapterkit/layers/<name>.py` as it was at `revision`, as a module of the package."""
    return module_at(revision, f"adapterkit/layers/{name}.py", "adapterkit.layers")


def functions_at(revision: str) -> dict:
    """The gathered functions at `revision`, loaded beside the current ones (`norm_forward` from
    `gathered_norms.py` once it moved there, importing the revision's `gathered.py`)."""
    gathered = _module_at(revision, "gathered")
    if hasattr(gathered, "norm_forward"):
        return {name: getattr(gathered, name) for name in NAMES}
    current, sys.modules["adapterkit.layers.gathered"] = sys.modules["adapterkit.layers.gathered"], gathered
    try:
        norms = _module_at(revision, "gathered_norms")
    finally:
        sys.modules["adapterkit.layers.gathered"] = current
    return {"conv_forward": gathered.conv_forward, "linear_forward": gathered.linear_forward} | {
        "norm_forward": norms.norm_forward
    }


def install(functions: dict) -> None:
    """Make the wrappers and norms call `functions` (they import them by name)."""
    wrappers.conv_forward, wrappers.linear_forward = functions["conv_forward"], functions["linear_forward"]
    norm_module.norm_forward = functions["norm_forward"]


def build(backbone: str, px: int, domains: int) -> AdapterModel:
    extra = {"img_size": px} if "vit" in backbone else {}
    real = backbone == "cifar_resnet56" and R56_WEIGHTS.is_file()
    model = AdapterModel.from_backbone(backbone, pretrained=R56_WEIGHTS if real else False, **extra)
    return served_domains(model, domains, px)


def case(spec: str, base: dict, current: dict, repeats: int) -> dict:
    backbone, px, batch, domains = spec.split(":")
    px, batch, domains = int(px), int(batch), int(domains)
    model = build(backbone, px, domains)
    x = torch.randn(batch, 3, px, px, generator=torch.Generator().manual_seed(0))
    spread = [f"d{i % domains}" for i in range(batch)]

    def gathered(functions):
        install(functions)
        try:
            return model(x, domain=spread)
        finally:
            install(current)

    fns = {
        "one": lambda: model(x, domain="d0"),
        "base": lambda: gathered(base),
        "new": lambda: gathered(current),
    }
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.inference_mode():
        a, b = gathered(base), gathered(current)
        alone = torch.cat([model(x[i : i + 1], domain=d) for i, d in enumerate(spread)])
        for fn in fns.values():
            fn()
        for r in range(repeats):
            names = list(fns)[r % 3 :] + list(fns)[: r % 3]
            for name in names:
                start = time.thread_time()
                fns[name]()
                times[name].append(time.thread_time() - start)
    out = {
        "ms": {name: 1e3 * statistics.median(t) for name, t in times.items()},
        "throughput_vs_one": {
            name: statistics.median(o / t for o, t in zip(times["one"], times[name], strict=True))
            for name in ("base", "new")
        },
        "vs_alone_max_rel_diff": {
            name: float((logits - alone).abs().max() / alone.abs().max())
            for name, logits in (("base", a), ("new", b))
        },
    }
    print(spec, out, flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="+", help="backbone:px:batch:domains")
    parser.add_argument("--base", required=True, help="git revision of the baseline layers/gathered.py")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "ab_gathered.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    current = {name: getattr(wrappers if name != "norm_forward" else norm_module, name) for name in NAMES}
    base = functions_at(args.base)
    results = {spec: case(spec, base, current, args.repeats) for spec in args.cases}
    write_report(args.out, "ab_gathered", vars(args) | {"out": str(args.out)}, results, start)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
