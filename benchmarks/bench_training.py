"""Training one domain: adapterkit vs full fine-tuning vs PEFT LoRA on the same backbone (CPU).

One training step = forward, cross-entropy, backward, SGD step (momentum 0.9) over the trainable
tensors: `model.trainable_parameters(domain)` for adapterkit, every parameter for full fine-tuning,
the LoRA factors plus the classifier (`modules_to_save`) for PEFT. The LoRA rank (LoRA on every
Conv2d) is chosen so that PEFT trains about as many parameters as adapterkit; both counts are printed.

- Throughput: the three variants in one process, one step each per repeat, interleaved in a rotated
  order; images/s from the median step time, ratios paired per repeat.
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
- Shared BatchNorm statistics: after the timed steps, how many of the backbone's BatchNorm buffers
  each method changed, and whether the untouched model (PEFT with its adapter disabled; adapterkit's
  other domain) still gives the same logits (PEFT issue #1732).

Run from the repository root (needs `pip install peft`, the `bench` extra):
    PYTHONPATH=. python benchmarks/bench_training.py
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import statistics
import subprocess
import sys
import time
import weakref
from pathlib import Path

import torch
from _common import calibrated_backbone, interleaved, paired_ratio, perturb, write_report
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from adapterkit import AdapterModel

BACKBONES = {  # name: (input size, batch size)
    "resnet26_decathlon": (72, 32),
    "resnet50": (224, 16),
}
VARIANTS = ["adapterkit", "full", "peft"]
NUM_CLASSES = 10


def conv_names(backbone: nn.Module) -> list[str]:
    return [n for n, m in backbone.named_modules() if isinstance(m, nn.Conv2d)]


def lora_count(backbone: nn.Module, rank: int) -> int:
    """Parameters PEFT's LoRA adds to every Conv2d: A (r x in x k x k) and B (out x r)."""
    total = 0
    for m in backbone.modules():
        if isinstance(m, nn.Conv2d):
            kh, kw = m.kernel_size
            total += rank * (m.in_channels // m.groups * kh * kw + m.out_channels)
    return total


def build(name: str, variant: str, size: int, rank: int | None = None):
    """(model, forward(x), trainable parameters, info) for one variant, from the same weights."""
    backbone = calibrated_backbone(name, size)
    if variant == "adapterkit":
        model = AdapterModel(backbone)
        model.add_domain("old", num_classes=NUM_CLASSES)
        perturb(model.trainable_parameters("old"), seed=1)
        model.add_domain("new", num_classes=NUM_CLASSES)
        params = model.trainable_parameters("new")
        return model, lambda x: model(x, domain="new"), params, {}
    backbone.reset_classifier(NUM_CLASSES)
    if variant == "full":
        return backbone, backbone, list(backbone.parameters()), {}
    from peft import LoraConfig, get_peft_model

    head = backbone.pretrained_cfg.get("classifier") or "fc"
    targets = "|".join(re.escape(n) for n in conv_names(backbone))
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=f"^({targets})$", modules_to_save=[head])
    model = get_peft_model(backbone, config)
    params = [p for p in model.parameters() if p.requires_grad]
    return (
        model,
        model,
        params,
        {"lora_rank": rank, "lora_targets": "every Conv2d", "modules_to_save": [head]},
    )


def matched_rank(name: str, size: int) -> tuple[int, int]:
    """The LoRA rank whose trainable count is closest to adapterkit's, and adapterkit's count."""
    _, _, params, _ = build(name, "adapterkit", size)
    target = sum(p.numel() for p in params)
    backbone = calibrated_backbone(name, size)
    head = backbone.num_features * NUM_CLASSES + NUM_CLASSES
    rank = min(range(1, 257), key=lambda r: abs(lora_count(backbone, r) + head - target))
    return rank, target


def step_fn(
    model: nn.Module, forward, params: list[nn.Parameter], x: torch.Tensor, y: torch.Tensor, opt=None
):
    opt = opt or torch.optim.SGD(params, lr=0.01, momentum=0.9)
    model.train()

    def step() -> None:
        loss = nn.functional.cross_entropy(forward(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


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


def throughput(name: str, size: int, batch: int, repeats: int) -> dict:
    rank, ak_count = matched_rank(name, size)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=g)
    built = {v: build(name, v, size, rank) for v in VARIANTS}
    counts = {v: sum(p.numel() for p in b[2]) for v, b in built.items()}
    assert counts["adapterkit"] == ak_count
    # BatchNorm demonstration: state before any step
    ak_model, peft_model = built["adapterkit"][0], built["peft"][0]
    pristine = calibrated_backbone(name, size)
    pristine.reset_classifier(NUM_CLASSES)
    bn_before = {v: bn_buffers(built[v][0]) for v in ("adapterkit", "peft")}
    probe = torch.randn(4, 3, size, size, generator=g)
    with torch.no_grad():
        old_logits = ak_model.eval()(probe, domain="old")
        pristine_features = pristine.eval().forward_features(probe)
    steps = {v: step_fn(b[0], b[1], b[2], x, y) for v, b in built.items()}
    res = interleaved(steps, repeats, baseline="peft")
    # after the timed (and warm-up) steps
    ak_model.eval()
    peft_model.eval()
    with torch.no_grad():
        old_after = ak_model(probe, domain="old")
        with peft_model.disable_adapter():
            base_features = peft_model.base_model.model.forward_features(probe)
    changed = {
        v: sum(not torch.equal(t, bn_buffers(built[v][0])[k]) for k, t in bn_before[v].items())
        for v in bn_before
    }
    n_bn = {v: len(bn_before[v]) for v in bn_before}
    row = {
        "model": name,
        "input": size,
        "batch": batch,
        "repeats": repeats,
        "trainable_parameters": counts,
        "backbone_parameters": sum(p.numel() for p in pristine.parameters()),
        "lora_rank": rank,
        "images_per_s": {v: batch / (res[v]["ms"] / 1e3) for v in VARIANTS},
        "step_ms": {v: res[v]["ms"] for v in VARIANTS},
        "ratio_vs_peft_throughput": {v: paired_ratio(res, "peft", v) for v in VARIANTS},
        "ratio_vs_full_throughput": {v: paired_ratio(res, "full", v) for v in VARIANTS},
        "batchnorm": {
            "backbone_bn_buffers": n_bn,
            "changed_by_training": changed,
            "adapterkit_old_domain_bit_identical": bool(torch.equal(old_logits, old_after)),
            "peft_disabled_adapter_max_abs_feature_change": float(
                (base_features - pristine_features).abs().max()
            ),
        },
    }
    return row


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


def peak_memory_child(name: str, variant: str, size: int, batch: int, rank: int) -> dict:
    """Run in a fresh process: peak RSS of two training steps above the RSS of the built model, then
    the peak of live tensor bytes during a third step (gradients and momentum exist by then)."""
    model, forward, params, _ = build(name, variant, size, rank)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=g)
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    step = step_fn(model, forward, params, x, y, opt)
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    rss_model = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (the peak RSS) to the current RSS
    step()  # allocates gradients and momentum: part of what training costs
    step()
    rss_peak = _status("VmHWM")
    existing = [*model.parameters(), *model.buffers(), x, y, *(p.grad for p in params if p.grad is not None)]
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


def peak_memory(name: str, size: int, batch: int, rank: int, repeats: int, malloc_env: dict) -> dict:
    out = {}
    env = {**os.environ, **malloc_env}
    for variant in VARIANTS:
        runs = []
        for _ in range(repeats):
            cmd = [
                sys.executable,
                __file__,
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


def report(out: Path, rows: list[dict], malloc_env: dict, start: float) -> None:
    """Write the JSON report (after every backbone: a run stopped half-way keeps what it measured)."""
    write_report(
        out,
        "one training step: adapterkit vs full fine-tuning vs PEFT LoRA (matched trainable count)",
        {
            "models": BACKBONES,
            "optimizer": "SGD lr 0.01 momentum 0.9",
            "statistic": "median over interleaved repeats; memory: median over fresh processes",
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(BACKBONES), choices=list(BACKBONES))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--memory-repeats", type=int, default=3, help="fresh processes per variant (median)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/training.json"))
    p.add_argument("--default-malloc", action="store_true", help="RSS with glibc's adaptive mmap threshold")
    p.add_argument("--memory-child", nargs=5, metavar=("MODEL", "VARIANT", "SIZE", "BATCH", "RANK"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        name, variant, size, batch, rank = args.memory_child
        print(json.dumps(peak_memory_child(name, variant, int(size), int(batch), int(rank))))
        return
    # A fixed mmap threshold returns every freed tensor of 128 KiB or more to the OS, so RSS follows the
    # live memory; with glibc's adaptive threshold freed tensors stay in its heap, and the peak RSS of
    # one and the same configuration varied by +-15 % between processes.
    malloc_env = {} if args.default_malloc else {"MALLOC_MMAP_THRESHOLD_": "131072"}
    start = time.perf_counter()
    rows = []
    for name in args.models:
        size, batch = BACKBONES[name]
        row = throughput(name, size, batch, args.repeats)
        row["memory"] = peak_memory(name, size, batch, row["lora_rank"], args.memory_repeats, malloc_env)
        mem = row["memory"]
        row["memory_ratio_vs_full"] = {
            key: {v: mem[v][key] / mem["full"][key] for v in VARIANTS}
            for key in ("tensor_peak_mib", "tensor_peak_above_weights_mib", "rss_peak_above_model_mib")
        }
        rows.append(row)
        report(args.out, rows, malloc_env, start)
        c, ips, bn = row["trainable_parameters"], row["images_per_s"], row["batchnorm"]
        print(f"{name} {size}px batch {batch}: trainable {c} (LoRA rank {row['lora_rank']})")
        for v in VARIANTS:
            ratio = row["memory_ratio_vs_full"]
            print(
                f"  {v:10s} {ips[v]:7.2f} img/s  x{row['ratio_vs_peft_throughput'][v]:.3f} vs PEFT  "
                f"x{row['ratio_vs_full_throughput'][v]:.3f} vs full  tensor peak {mem[v]['tensor_peak_mib']:.0f} MiB "
                f"(x{ratio['tensor_peak_mib'][v]:.3f} of full; above weights "
                f"x{ratio['tensor_peak_above_weights_mib'][v]:.3f})  "
                f"RSS peak +{mem[v]['rss_peak_above_model_mib']:.0f} MiB (x{ratio['rss_peak_above_model_mib'][v]:.3f})"
            )
        print(
            f"  shared BN buffers changed by training: adapterkit {bn['changed_by_training']['adapterkit']}"
            f"/{bn['backbone_bn_buffers']['adapterkit']}, PEFT {bn['changed_by_training']['peft']}"
            f"/{bn['backbone_bn_buffers']['peft']}; adapterkit old domain bit-identical: "
            f"{bn['adapterkit_old_domain_bit_identical']}; PEFT base model (adapter disabled) features moved by "
            f"{bn['peft_disabled_adapter_max_abs_feature_change']:.3g}",
            flush=True,
        )
    print(f"wrote {args.out} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
