"""GPU benchmark (bf16 autocast): training throughput with adapters vs the bare backbone, and inference.

1. Training, ResNet-26 (`resnet26_decathlon`) at 64 px by default. Variants, timed interleaved (each timed
   call runs `--steps` steps, then synchronises):
   - `bare_fwd_bwd`: the bare backbone (every weight trainable, 10-class head): forward, cross-entropy,
     backward. The baseline of the issue's target (adapters >= 70 % of its throughput);
   - `adapter_fwd_bwd`: `AdapterModel(x, domain="new")`, the same forward, loss and backward (only the
     domain's adapters, norms and head need gradients);
   - `adapter_step`, `full_step`, `peft_step`: a whole step with SGD (momentum 0.9) for adapterkit, full
     fine-tuning and PEFT LoRA on every Conv2d at the rank whose trainable count matches adapterkit's.
   Peak memory: `torch.cuda.max_memory_allocated` during one steady-state step of each variant built
   alone (weights, gradients, optimiser state, activations), exact.
2. Inference, the models and batch sizes of bench_inference.py: bare vs adapter (eval: fused) vs
   unfused vs export, and a batch spread over 4 domains vs a single-domain batch.

Run from the repository root on a machine with a CUDA GPU (PEFT needed for `peft_step`):
    PYTHONPATH=. python benchmarks/bench_gpu.py --out benchmarks/results/gpu.json
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import torch
from _common import interleaved, paired_ratio, write_report
from bench_inference import DOMAINS, MODELS
from bench_inference import build as build_inference
from bench_training import NUM_CLASSES, build, matched_rank
from torch import nn

from adapterkit.layers import configure_fusion


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, iters: int, device: torch.device):
    """`fn` run `iters` times, then a synchronisation: one timed call."""

    def run() -> None:
        for _ in range(iters):
            fn()
        sync(device)

    return run


def train_variants(name: str, size: int, device: torch.device, rank: int):
    """Per variant: (model, forward, trainable parameters); all from the same calibrated weights."""
    out = {}
    for variant in ("adapterkit", "full", "peft"):
        v = build(name, variant, size, rank)
        out[variant] = (v.model.to(device).train(), v.forward, v.params)
    return out


def make_step(model, forward, params, x, y, optimizer: bool):
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9) if optimizer else None

    def step() -> None:
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(forward(x), y)
        loss.backward()
        if opt is not None:
            opt.step()
        for p in params:
            p.grad = None

    return step


def training(
    name: str, size: int, batch: int, steps: int, repeats: int, device: torch.device, channels_last: bool
):
    rank, ak_count = matched_rank(name, size)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g).to(device)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=g).to(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = x.contiguous(memory_format=fmt)
    built = train_variants(name, size, device, rank)
    for model, _, _ in built.values():
        model.to(memory_format=fmt)
    full, ak, peft = built["full"], built["adapterkit"], built["peft"]
    fns = {
        "bare_fwd_bwd": make_step(*full, x, y, optimizer=False),
        "adapter_fwd_bwd": make_step(*ak, x, y, optimizer=False),
        "adapter_step": make_step(*ak, x, y, optimizer=True),
        "full_step": make_step(*full, x, y, optimizer=True),
        "peft_step": make_step(*peft, x, y, optimizer=True),
    }
    res = interleaved({k: timed(f, steps, device) for k, f in fns.items()}, repeats, "bare_fwd_bwd", warmup=2)
    ips = {k: batch * steps / (v["ms"] / 1e3) for k, v in res.items()}
    row = {
        "model": name,
        "input": size,
        "batch": batch,
        "channels_last": channels_last,
        "steps_per_timing": steps,
        "repeats": repeats,
        "lora_rank": rank,
        "trainable_parameters": {
            v: sum(p.numel() for p in built[v][2]) for v in ("adapterkit", "full", "peft")
        },
        "images_per_s": ips,
        # throughput ratios: time(baseline) / time(variant), paired per repeat
        "throughput_vs_bare_fwd_bwd": {k: paired_ratio(res, "bare_fwd_bwd", k) for k in res},
        "throughput_vs_peft_step": {k: paired_ratio(res, "peft_step", k) for k in res},
        "raw": res,
    }
    assert row["trainable_parameters"]["adapterkit"] == ak_count
    del built, fns, full, ak, peft
    row["peak_memory_mib"] = {
        v: peak_memory(name, size, v, rank, x, y, fmt, device) for v in ("adapterkit", "full", "peft")
    }
    return row


def peak_memory(name, size, variant, rank, x, y, fmt, device) -> float | None:
    if device.type != "cuda":
        return None  # exact allocator statistics on CUDA only; CPU memory: bench_training.py
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(device)
    v = build(name, variant, size, rank)
    model, forward, params = v.model, v.forward, v.params
    model.to(device).train().to(memory_format=fmt)
    step = make_step(model, forward, params, x, y, optimizer=True)
    step()
    step()
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del model, forward, params, step
    return peak / 2**20


def inference(name: str, size: int, batches: list[int], repeats: int, device: torch.device) -> list[dict]:
    bare, model, exported, unfused = (m.to(device) for m in build_inference(name, size))
    configure_fusion(unfused, enabled=False)  # .to() keeps the flag; explicit for the reader
    rows = []
    for batch in batches:
        x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch)).to(device)
        per_sample = [DOMAINS[i % len(DOMAINS)] for i in range(batch)]
        iters = 50 if batch <= 8 else 10

        def amp(module, domain=None, x=x, iters=iters):
            def run():
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    module(x) if domain is None else module(x, domain=domain)

            return timed(run, iters, device)

        fns = {
            "bare": amp(bare),
            "bare_again": amp(bare),
            "adapter": amp(model, "d0"),
            "unfused": amp(unfused, "d0"),
            "export": amp(exported),
        }
        if batch >= len(DOMAINS):
            fns["mixed"] = amp(model, per_sample)
        with torch.inference_mode():  # models built outside it: their fused weights are cached
            res = interleaved(fns, repeats, baseline="bare", warmup=2)
        row = {"model": name, "input": size, "batch": batch, "iters_per_timing": iters, "results": res}
        if "mixed" in res:
            row["mixed_over_single_throughput"] = paired_ratio(res, "adapter", "mixed")
        rows.append(row)
        cols = "  ".join(f"{k} {v['ratio']:.3f}x" for k, v in res.items() if k != "bare")
        extra = (
            f"  mixed/single throughput {row['mixed_over_single_throughput']:.3f}" if "mixed" in res else ""
        )
        print(
            f"{name:22s} {size}px b={batch:<3d} bare {res['bare']['ms'] / iters:8.2f} ms  {cols}{extra}",
            flush=True,
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-model", default="resnet26_decathlon")
    p.add_argument("--train-size", type=int, default=64)
    p.add_argument("--train-batches", type=int, nargs="+", default=[128, 256])
    p.add_argument("--steps", type=int, default=10, help="training steps per timed call")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--skip-inference", action="store_true")
    p.add_argument("--device", default="cuda", help="cpu: a smoke test of the script, not a benchmark")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu.json"))
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU (torch.cuda.is_available() is False); --device cpu runs a smoke test")
    torch.backends.cudnn.benchmark = True
    results: dict[str, list[dict]] = {"training": [], "inference": []}
    gpu = {
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
    }
    start = time.perf_counter()

    def write() -> dict:  # after every stage: a run stopped half-way keeps what it measured
        return write_report(
            args.out,
            "GPU, bf16 autocast: training throughput vs the bare backbone's forward+backward; inference",
            vars(args) | {"out": str(args.out)},
            results,
            start,
            accelerator=gpu,
        )

    for batch in args.train_batches:
        for channels_last in (False, True):
            row = training(
                args.train_model, args.train_size, batch, args.steps, args.repeats, device, channels_last
            )
            results["training"].append(row)
            write()
            r = row["throughput_vs_bare_fwd_bwd"]
            print(
                f"train {args.train_model} {args.train_size}px b={batch} channels_last={channels_last}: "
                f"bare fwd+bwd {row['images_per_s']['bare_fwd_bwd']:.0f} img/s; throughput vs it: "
                + "  ".join(f"{k} {v:.2f}" for k, v in r.items())
                + f"; adapter step vs PEFT step {row['throughput_vs_peft_step']['adapter_step']:.2f}; "
                f"peak MiB { ({k: v and round(v) for k, v in row['peak_memory_mib'].items()}) }",
                flush=True,
            )
    if not args.skip_inference:
        for name in args.models:
            results["inference"] += inference(name, MODELS[name], args.batches, args.repeats, device)
            write()
            gc.collect()
            torch.cuda.empty_cache()
    print(f"wrote {args.out} ({write()['total_wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
