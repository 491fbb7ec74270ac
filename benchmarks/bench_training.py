"""Training one domain: adapterkit vs its floor vs full fine-tuning vs PEFT LoRA on the same backbone (CPU).

One training step = forward, cross-entropy, backward, SGD step (momentum 0.9) over the trainable
tensors: `model.trainable_parameters(domain)` for adapterkit, every parameter for full fine-tuning,
the LoRA factors plus the classifier (`modules_to_save`) for PEFT. The LoRA rank (LoRA on every
Conv2d and Linear but the classifier) is chosen so that PEFT trains about as many parameters as
adapterkit; both counts are printed. Two references bound adapterkit's step from below:

- `floor`: the frozen backbone (norms in eval mode, no weight requires grad) forward + backward to the
  input (which requires grad): what any method that trains nothing inside the backbone's layers pays.
- `norms`: the floor plus what the paper's domain norms add: norms in train mode (batch statistics) with
  trainable affine parameters, and a trainable classifier, with their SGD step. adapterkit = norms + adapters.
- `ckpt` (on request): adapterkit with the backbone's gradient checkpointing, as
  `TrainConfig(grad_checkpointing=True)` trains: the domain held for the recomputation in backward, and the
  domain's BatchNorm statistics put back after it (the recomputed forward updates them again).

- Throughput: the variants in one process, one step each per repeat, interleaved in a rotated order;
  ratios paired per repeat, medians. Both clocks are recorded: wall time and the thread's CPU time
  (`time.thread_time`; with one torch thread every op, forward and backward, runs in the calling
  thread), whose ratios do not move when other jobs share the cores; the report's ratios use CPU time.
- Peak memory, in a fresh subprocess per (backbone, variant) that builds only that variant:
  1. tensor peak: the most bytes of live CPU tensor storages during a step taken once gradients and
     momentum exist (as in every step but the first), counted by a `TorchDispatchMode` that sees every
     op of forward, backward and optimiser step: weights, gradients, optimiser state, activations and
     temporaries (torch has no CPU allocator statistics, and tracemalloc does not see its
     allocations). Exact and repeatable. Also reported above the weights (what training adds).
  2. RSS: peak RSS (`VmHWM`) over the first two steps minus the RSS of the built model, after
     `malloc_trim` and a reset of the kernel's peak mark (`/proc/self/clear_refs` = 5), with glibc's
     mmap threshold fixed at 128 KiB (`MALLOC_MMAP_THRESHOLD_`; `--default-malloc` keeps glibc's
     adaptive one, whose heap fragmentation made this figure vary by +-15 % between processes).
     Includes allocator slack and oneDNN scratch space; the median of several processes.
- Memory format: every variant runs channels-last (`--memory-format`), as `train_domain` trains conv
  models on CPU (`TrainConfig.channels_last="auto"`); `contiguous` runs them all NCHW.
- Shared BatchNorm statistics: after the timed steps, how many of the backbone's BatchNorm buffers
  each method changed, and whether the untouched model (PEFT with its adapter disabled; adapterkit's
  other domain) still gives the same logits (PEFT issue #1732).

Run from the repository root (needs `pip install peft`, the `bench` extra):
    PYTHONPATH=. python benchmarks/bench_training.py            # ~15 min on one thread
    PYTHONPATH=. python benchmarks/bench_training.py --quick    # adapterkit, floor, norms, full; small batches
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import re
import statistics
import subprocess
import sys
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from _common import calibrated_backbone, perturb, write_report
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from adapterkit import AdapterModel

BACKBONES = {  # name: (input size, batch size, batch size in --quick)
    "resnet26_decathlon": (72, 32, 16),
    "resnet50": (224, 16, 4),
    "vit_small_patch16_224": (224, 16, 4),
}
VARIANTS = ["adapterkit", "floor", "norms", "full", "peft"]
NCHW = ["adapterkit_nchw", "floor_nchw"]  # on request: the same, NCHW whatever --memory-format says
EXTRA = [*NCHW, "ckpt"]  # on request (--variants)
QUICK_VARIANTS = ["adapterkit", "floor", "norms", "full"]
NUM_CLASSES = 10
FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


@dataclass
class Variant:
    """One way to train: `forward(x)` and the tensors its SGD step updates (none for the floor)."""

    model: nn.Module
    forward: object
    params: list[nn.Parameter]
    info: dict = field(default_factory=dict)
    input_grad: bool = False  # the input requires grad (the floor's backward reaches the image)
    backward: object = contextlib.nullcontext  # what `loss.backward()` runs under


def lora_targets(backbone: nn.Module) -> list[str]:
    head = backbone.pretrained_cfg.get("classifier") or "fc"
    return [n for n, m in backbone.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and n != head]


def lora_count(backbone: nn.Module, rank: int) -> int:
    """Parameters PEFT's LoRA adds to each target: A (r x in x k x k) and B (out x r)."""
    total, modules = 0, dict(backbone.named_modules())
    for name in lora_targets(backbone):
        m = modules[name]
        if isinstance(m, nn.Conv2d):
            kh, kw = m.kernel_size
            total += rank * (m.in_channels // m.groups * kh * kw + m.out_channels)
        else:
            total += rank * (m.in_features + m.out_features)
    return total


def frozen(name: str, size: int, norms: bool = False) -> Variant:
    """The floor (everything frozen, eval mode), or with `norms` the floor plus trainable norms in train
    mode and a trainable classifier (what adapterkit trains besides its adapters)."""
    backbone = calibrated_backbone(name, size)
    backbone.reset_classifier(NUM_CLASSES)
    backbone.requires_grad_(False)
    if not norms:
        return Variant(backbone.eval(), backbone, [], input_grad=True)
    norm_types = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
    for m in backbone.modules():
        if isinstance(m, norm_types):
            m.requires_grad_(True)
    backbone.get_classifier().requires_grad_(True)
    params = [p for p in backbone.parameters() if p.requires_grad]
    return Variant(backbone.train(), backbone, params, input_grad=True)


def build(name: str, variant: str, size: int, rank: int | None = None) -> Variant:
    """One variant, from the same weights."""
    variant = variant.removesuffix("_nchw")
    if variant in ("floor", "norms"):
        return frozen(name, size, norms=variant == "norms")
    backbone = calibrated_backbone(name, size)
    if variant in ("adapterkit", "ckpt"):
        model = AdapterModel(backbone)
        model.add_domain("old", num_classes=NUM_CLASSES)
        perturb(model.trainable_parameters("old"), seed=1)
        model.add_domain("new", num_classes=NUM_CLASSES)
        v = Variant(model.train(), lambda x: model(x, domain="new"), model.trainable_parameters("new"))
        if variant == "ckpt":
            model.backbone.set_grad_checkpointing(True)
            v.backward = lambda: recomputing(model, "new")
        return v
    backbone.reset_classifier(NUM_CLASSES)
    if variant == "full":
        return Variant(backbone.train(), backbone, list(backbone.parameters()))
    from peft import LoraConfig, get_peft_model

    head = backbone.pretrained_cfg.get("classifier") or "fc"
    targets = "|".join(re.escape(n) for n in lora_targets(backbone))
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=f"^({targets})$", modules_to_save=[head])
    model = get_peft_model(backbone, config).train()
    params = [p for p in model.parameters() if p.requires_grad]
    info = {
        "lora_rank": rank,
        "lora_targets": "every Conv2d and Linear but the classifier",
        "modules_to_save": [head],
    }
    return Variant(model, model, params, info)


@contextlib.contextmanager
def recomputing(model: AdapterModel, domain: str):
    """A checkpointed backward as `train_domain` runs it: `domain` held for the recomputed forward, and
    the domain's norm buffers (running statistics) as the forward left them."""
    norms = [layer.adapters[domain] for layer in model.layers().values() if layer.rule == "norm"]
    saved = [(t, t.clone()) for m in norms for t in m.buffers()]
    with model.router.hold(domain):
        yield
    with torch.no_grad():
        for t, before in saved:
            t.copy_(before)


def matched_rank(name: str, size: int) -> tuple[int, int]:
    """The LoRA rank whose trainable count is closest to adapterkit's, and adapterkit's count."""
    target = sum(p.numel() for p in build(name, "adapterkit", size).params)
    backbone = calibrated_backbone(name, size)
    head = backbone.num_features * NUM_CLASSES + NUM_CLASSES
    rank = min(range(1, 257), key=lambda r: abs(lora_count(backbone, r) + head - target))
    return rank, target


def variant_format(variant: str, fmt: str) -> torch.memory_format:
    return torch.contiguous_format if variant.endswith("_nchw") else FORMATS[fmt]


def step_fn(v: Variant, x: torch.Tensor, y: torch.Tensor, fmt: torch.memory_format):
    v.model.to(memory_format=fmt)  # the 4-D weights; the values do not change
    x = x.contiguous(memory_format=fmt)
    opt = torch.optim.SGD(v.params, lr=0.01, momentum=0.9) if v.params else None
    xi = x.detach().requires_grad_(True) if v.input_grad else x

    def step() -> None:
        loss = nn.functional.cross_entropy(v.forward(xi), y)
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        with v.backward():
            loss.backward()
        xi.grad = None
        if opt is not None:
            opt.step()

    return step, opt


def timed(fns: dict, repeats: int, warmup: int = 1) -> dict[str, dict[str, list[float]]]:
    """Each variant `repeats` times, interleaved in a rotated order: wall and thread CPU seconds."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times = {n: {"wall": [], "cpu": []} for n in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            wall, cpu = time.perf_counter(), time.thread_time()
            fns[name]()
            times[name]["cpu"].append(time.thread_time() - cpu)
            times[name]["wall"].append(time.perf_counter() - wall)
    return times


def throughput_ratio(times: dict, num: str, den: str, clock: str = "cpu") -> float:
    """Throughput of `num` relative to `den`: median over repeats of time(den) / time(num), same repeat."""
    return statistics.median(b / a for a, b in zip(times[num][clock], times[den][clock], strict=True))


def bn_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    """Running statistics of the backbone's own BatchNorms (not adapter or per-domain copies)."""
    out = {}
    for name, m in module.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and ".adapters." not in f".{name}.":
            if "modules_to_save" in name or "original_module" in name:
                continue
            out[f"{name}.running_mean"] = m.running_mean.clone()
            out[f"{name}.running_var"] = m.running_var.clone()
    return out


def batchnorm_check(name: str, size: int, built: dict[str, Variant], run) -> dict:
    """Run `run()` (the timed steps) and report what they did to shared BatchNorm statistics."""
    g = torch.Generator().manual_seed(1)
    probe = torch.randn(4, 3, size, size, generator=g)
    ak, peft = built["adapterkit"].model, built.get("peft")
    pristine = calibrated_backbone(name, size).eval()
    watched = {v: built[v].model for v in ("adapterkit", "peft") if v in built}
    before = {v: bn_buffers(m) for v, m in watched.items()}
    with torch.no_grad():
        old_logits = ak.eval()(probe, domain="old")
    ak.train()
    result = run()
    with torch.no_grad():
        out = {
            "backbone_bn_buffers": {v: len(b) for v, b in before.items()},
            "changed_by_training": {
                v: sum(not torch.equal(t, bn_buffers(watched[v])[k]) for k, t in b.items())
                for v, b in before.items()
            },
            "adapterkit_old_domain_bit_identical": bool(
                torch.equal(old_logits, ak.eval()(probe, domain="old"))
            ),
        }
        if peft is not None:
            peft.model.eval()
            with peft.model.disable_adapter():
                moved = peft.model.base_model.model.forward_features(probe) - pristine.forward_features(probe)
            out["peft_disabled_adapter_max_abs_feature_change"] = float(moved.abs().max())
    return result, out


def throughput(name: str, size: int, batch: int, repeats: int, variants: list[str], fmt: str) -> dict:
    rank, ak_count = matched_rank(name, size)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=g)
    built = {v: build(name, v, size, rank) for v in variants}
    counts = {v: sum(p.numel() for p in b.params) for v, b in built.items()}
    assert counts["adapterkit"] == ak_count
    steps = {v: step_fn(b, x, y, variant_format(v, fmt))[0] for v, b in built.items()}
    times, bn = batchnorm_check(name, size, built, lambda: timed(steps, repeats))
    ratios = {
        f"throughput_vs_{base}_{clock}": {v: throughput_ratio(times, v, base, clock) for v in variants}
        for base in ("floor", "full", "adapterkit")
        for clock in ("cpu", "wall")
    }
    return {
        "model": name,
        "input": size,
        "batch": batch,
        "memory_format": fmt,
        "repeats": repeats,
        "trainable_parameters": counts,
        "backbone_parameters": sum(p.numel() for p in calibrated_backbone(name, size).parameters()),
        "lora_rank": rank if "peft" in variants else None,
        "images_per_s_cpu": {v: batch / statistics.median(times[v]["cpu"]) for v in variants},
        "step_ms_cpu": {v: 1e3 * statistics.median(times[v]["cpu"]) for v in variants},
        "step_ms_wall": {v: 1e3 * statistics.median(times[v]["wall"]) for v in variants},
        **ratios,
        "times_s": times,
        "batchnorm": bn,
    }


class TensorMemory(TorchDispatchMode):
    """Live bytes of CPU tensor storages, and their peak, while the mode is active.

    Starts from the storages of `existing` (weights, gradients, optimiser state), adds every storage an
    op creates (forward, backward and optimiser ops all pass through the dispatcher) and subtracts a
    storage when it is freed (a weakref finalizer). Views share a storage and count once.
    """

    def __init__(self, existing: list[torch.Tensor]) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = self.peak = 0
        for t in existing:
            self._track(t)
        self.start = self.current

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes == 0 or key in self.live:
            return
        self.live[key] = nbytes
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                self._track(t)
        return out


def peak_memory_child(name: str, variant: str, size: int, batch: int, rank: int, fmt: str) -> dict:
    """Run in a fresh process: peak RSS of two training steps above the RSS of the built model, then
    the peak of live tensor bytes during a third step (gradients and momentum exist by then)."""
    v = build(name, variant, size, rank)
    model, params = v.model, v.params
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=g)
    step, opt = step_fn(v, x, y, variant_format(variant, fmt))
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    rss_model = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (the peak RSS) to the current RSS
    step()  # allocates gradients and momentum: part of what training costs
    step()
    rss_peak = _status("VmHWM")
    existing = [*model.parameters(), *model.buffers(), x, y, *(p.grad for p in params if p.grad is not None)]
    if opt is not None:
        existing += [t for state in opt.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
    tracker = TensorMemory(existing)
    del existing  # the tracker must not keep old gradients alive
    with tracker:
        step()
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    mib = 2**20
    return {
        "tensor_peak_mib": tracker.peak / mib,
        "tensor_peak_above_weights_mib": (tracker.peak - weights) / mib,
        "weights_mib": weights / mib,
        "rss_model_mib": rss_model / 1024,
        "rss_peak_above_model_mib": (rss_peak - rss_model) / 1024,
    }


def _status(field: str) -> int:
    """A field of /proc/self/status, in kB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory(
    name: str, size: int, batch: int, rank: int, repeats: int, malloc_env: dict, variants: list[str], fmt: str
) -> dict:
    out = {}
    env = {**os.environ, **malloc_env}
    for variant in variants:
        runs = []
        for _ in range(repeats):
            cmd = [
                sys.executable,
                __file__,
                "--memory-format",
                fmt,
                "--memory-child",
                name,
                variant,
                str(size),
                str(batch),
                str(rank),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        out[variant] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        rss = [r["rss_peak_above_model_mib"] for r in runs]
        out[variant]["rss_peak_above_model_mib_range"] = [min(rss), max(rss)]
    return out


def report(out: Path, rows: list[dict], malloc_env: dict, start: float, quick: bool) -> None:
    """Write the JSON report (after every backbone: a run stopped half-way keeps what it measured)."""
    write_report(
        out,
        "one training step: adapterkit vs its floor (frozen backbone forward + input gradient) vs full "
        "fine-tuning vs PEFT LoRA (matched trainable count)",
        {
            "models": BACKBONES,
            "quick": quick,
            "optimizer": "SGD lr 0.01 momentum 0.9",
            "statistic": "ratios: median over interleaved repeats of paired per-repeat ratios, thread CPU time "
            "(wall-time ratios alongside); memory: median over fresh processes",
            "memory_child_env": malloc_env,
            "memory_method": (
                "fresh process per variant: peak live tensor bytes of the third step (TorchDispatchMode + "
                "storage finalizers; weights, gradients and optimiser state included), and VmHWM over the "
                "first two steps minus VmRSS of the built model (malloc_trim, clear_refs=5)"
            ),
        },
        rows,
        start,
    )


def print_row(row: dict) -> None:
    mem, ratio = row["memory"], row["memory_ratio_vs_full"]
    print(f"{row['model']} {row['input']}px batch {row['batch']}: trainable {row['trainable_parameters']}")
    for v in row["step_ms_cpu"]:
        print(
            f"  {v:10s} {row['images_per_s_cpu'][v]:7.2f} img/s  x{row['throughput_vs_floor_cpu'][v]:.3f} of the "
            f"floor (wall x{row['throughput_vs_floor_wall'][v]:.3f})  x{row['throughput_vs_full_cpu'][v]:.3f} of "
            f"full FT  tensor peak {mem[v]['tensor_peak_mib']:.0f} MiB (x{ratio['tensor_peak_mib'][v]:.3f} of "
            f"full)  RSS peak +{mem[v]['rss_peak_above_model_mib']:.0f} MiB (x{ratio['rss_peak_above_model_mib'][v]:.3f})"
        )
    bn = row["batchnorm"]
    print(f"  shared BN buffers changed: {bn['changed_by_training']}; adapterkit old domain bit-identical: "
          f"{bn['adapterkit_old_domain_bit_identical']}", flush=True)  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(BACKBONES), choices=list(BACKBONES))
    p.add_argument("--quick", action="store_true", help="no PEFT, small batches, 3 repeats, 1 memory process")
    p.add_argument(
        "--variants", nargs="+", choices=VARIANTS + EXTRA, help="a subset (floor and full are always run)"
    )
    p.add_argument("--repeats", type=int, default=None, help="timed steps per variant (default 5, quick 3)")
    p.add_argument("--memory-repeats", type=int, default=None, help="fresh processes per variant (median)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="default benchmarks/results/training[_quick].json")
    p.add_argument("--default-malloc", action="store_true", help="RSS with glibc's adaptive mmap threshold")
    p.add_argument("--memory-format", choices=list(FORMATS), default="channels_last")
    p.add_argument("--memory-child", nargs=5, metavar=("MODEL", "VARIANT", "SIZE", "BATCH", "RANK"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        name, variant, size, batch, rank = args.memory_child
        child = peak_memory_child(name, variant, int(size), int(batch), int(rank), args.memory_format)
        print(json.dumps(child))
        return
    repeats = args.repeats or (3 if args.quick else 5)
    memory_repeats = args.memory_repeats or (1 if args.quick else 3)
    variants = QUICK_VARIANTS if args.quick else VARIANTS
    if args.variants:
        variants = [v for v in VARIANTS + EXTRA if v in {*args.variants, "adapterkit", "floor", "full"}]
    out = args.out or Path(f"benchmarks/results/training{'_quick' if args.quick else ''}.json")
    # A fixed mmap threshold returns every freed tensor of 128 KiB or more to the OS, so RSS follows the
    # live memory; with glibc's adaptive threshold freed tensors stay in its heap, and the peak RSS of
    # one and the same configuration varied by +-15 % between processes.
    malloc_env = {} if args.default_malloc else {"MALLOC_MMAP_THRESHOLD_": "131072"}
    start = time.perf_counter()
    rows = []
    for name in args.models:
        size, batch, quick_batch = BACKBONES[name]
        batch = quick_batch if args.quick else batch
        row = throughput(name, size, batch, repeats, variants, args.memory_format)
        rank = row["lora_rank"] or 1
        row["memory"] = peak_memory(
            name, size, batch, rank, memory_repeats, malloc_env, variants, args.memory_format
        )
        mem = row["memory"]
        row["memory_ratio_vs_full"] = {
            key: {v: mem[v][key] / mem["full"][key] for v in variants}
            for key in ("tensor_peak_mib", "tensor_peak_above_weights_mib", "rss_peak_above_model_mib")
        }
        rows.append(row)
        report(out, rows, malloc_env, start, args.quick)
        print_row(row)
    print(f"wrote {out} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
