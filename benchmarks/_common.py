"""Helpers shared by the performance benchmarks (issue 6): machine info, backbones with trained-like
activation scales, and interleaved timing whose results are ratios against a baseline of the same run.

Timing rule: every figure is the median, over repeats, of (candidate time / baseline time) measured
in the same repeat; the variants run interleaved, in a rotated order, so load from other jobs on a
shared machine hits baseline and candidate alike.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, object]:
    """Machine and library versions, for the JSON report."""
    versions = {}
    for name in ("torch", "timm", "huggingface_hub", "safetensors", "peft", "psutil"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": os.getloadavg(),
        **versions,
    }


@torch.no_grad()
def calibrated_backbone(name: str, size: int, seed: int = 0) -> nn.Module:
    """A timm backbone with random weights whose activations have trained-like scales.

    timm zero-initialises the last BatchNorm gamma of each residual block and leaves running
    statistics at (0, 1); a network like that is numerically degenerate (whole branches are exactly
    zero) and its timings are not representative. Here every BatchNorm gamma is 1 and the running
    statistics are estimated from 3 batches of Gaussian noise. Models without BatchNorm are unchanged.
    """
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(name)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if norms:
        for m in norms:
            m.momentum = None  # cumulative average
            m.reset_running_stats()
            if m.weight is not None:
                m.weight.fill_(1.0)
        model.train()
        for _ in range(3):
            model(torch.randn(8, 3, size, size))
    return model.eval()


def perturb(params: list[torch.Tensor], scale: float = 0.02, seed: int = 0) -> None:
    """Non-zero adapters, as after training (zero adapters would make the benchmark trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * scale)


def served_domains(model, domains: int, px: int):
    """`model` with `domains` frozen domains d0, d1, ... of random non-zero adapters (as a loaded family's),
    in eval mode, mixed batches gathered."""
    for i in range(domains):
        model.add_domain(f"d{i}", 10, data_config={"input_size": px})
        perturb(model.trainable_parameters(f"d{i}"), seed=i)
        model.set_trainable(f"d{i}", False)
    model.mixed_execution = "gathered"
    return model.eval()


def interleaved(
    fns: dict[str, Callable[[], object]], repeats: int, baseline: str, warmup: int = 1
) -> dict[str, dict[str, float]]:
    """Time each variant `repeats` times, interleaved in a rotated order.

    Returns per variant: `ms` (median time) and `ratio` (median over repeats of its time divided by
    the baseline's time in the same repeat), the ratio's min and max over repeats, and the raw
    `times_ms` (use `paired_ratio` to compare two non-baseline variants).
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    out = {}
    for name in names:
        ratios = [t / b for t, b in zip(times[name], times[baseline], strict=True)]
        out[name] = {
            "ms": 1e3 * statistics.median(times[name]),
            "ratio": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "times_ms": [1e3 * t for t in times[name]],
        }
    return out


def on_device(
    fn: Callable[[], object], device: torch.device, precision: str, calls: int
) -> Callable[[], None]:
    """`fn` run `calls` times under autocast in `precision` (`no`: none), then waited for on a GPU, as one
    timed call of `interleaved` (a GPU runs a call's kernels after it returns)."""
    from adapterkit.serve_domains import autocast

    def run() -> None:
        with autocast(precision, device.type):
            for _ in range(calls):
                fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return run


def paired_ratio(res: dict[str, dict], num: str, den: str) -> float:
    """Median over repeats of time(num) / time(den) in the same repeat."""
    return statistics.median(a / b for a, b in zip(res[num]["times_ms"], res[den]["times_ms"], strict=True))


def write_report(
    out: Path, benchmark: str, config: dict, results: object, start: float, **extra: object
) -> dict:
    """Write the JSON report of a benchmark (machine and library versions included); return it."""
    report = {
        "benchmark": benchmark,
        "machine": machine(),
        "config": config,
        "results": results,
        **extra,
        "total_wall_s": time.perf_counter() - start,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def module_at(revision: str, path: str, package: str) -> types.ModuleType:
    """The module at `path` in this repository as it was at git `revision`, loaded as a module of
    `package` beside the current one (for same-process A/Bs of old and new code)."""
    source = subprocess.run(
        ["git", "-C", str(Path(__file__).resolve().parents[1]), "show", f"{revision}:{path}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    module = types.ModuleType(f"{Path(path).stem}_at_base")
    module.__package__ = package
    sys.modules[module.__name__] = module  # (dataclasses look their module up there)
    exec(compile(source, f"{Path(path).name}@{revision}", "exec"), module.__dict__)  # noqa: S102  (our own file)
    return module
