"""bf16 autocast on the CPU (`--mixed-precision bf16`, `create_app(mixed_precision="bf16")`): what it
costs in accuracy and what it buys in speed, each against float32 in the same run.

1. Accuracy, real weights and data: the CIFAR ResNet-56 of ../shared/data on the 10,000 CIFAR-10 test
   JPEGs, float32 and bf16 autocast: top-1 accuracy of each, the share of images whose top-1 class
   agrees, and the largest logit difference relative to the image's largest float32 logit.
2. Speed: forwards of a batch of 8 with one domain (fused weights) and spread over 4 domains (gathered),
   bf16 autocast against float32, interleaved; the CIFAR ResNet-56 at 32 px and ResNet-50 at 128 px
   (bench_serve.py's models, random adapters). One torch thread.

Whether bf16 is faster depends on the CPU: with AVX-512 BF16 or AMX, oneDNN runs bf16 convolutions
natively; without them it converts, and bf16 can be slower than float32. The report names the CPU.

    PYTHONPATH=. python benchmarks/bench_precision.py --out benchmarks/results/precision_cpu.json
"""

from __future__ import annotations

import argparse
import io
import time
import zipfile
from pathlib import Path

import torch
from _common import interleaved, on_device, write_report
from bench_serve import MODELS, R56_WEIGHTS, build
from PIL import Image

from adapterkit.inject import create_backbone
from adapterkit.transforms import Preprocess, resolve_data_config

HERE = Path(__file__).resolve().parent
CIFAR10_TEST = HERE.parent.parent / "shared" / "data" / "cifar10" / "test.zip"


def cpu_flags() -> list[str]:
    """The CPU's bf16 features (Linux)."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return []
    return sorted(f for f in flags if "bf16" in f or f.startswith("amx"))


def accuracy(batch: int = 250) -> dict:
    """float32 vs bf16 autocast on the CIFAR-10 test JPEGs, the real ResNet-56."""
    model = create_backbone("cifar_resnet56", R56_WEIGHTS).eval()
    preprocess = Preprocess(resolve_data_config(model.pretrained_cfg, {"input_size": 32}))
    with zipfile.ZipFile(CIFAR10_TEST) as z:
        names = sorted(n for n in z.namelist() if n.endswith(".jpg"))
        classes = sorted({n.split("/")[1] for n in names})
        images = [preprocess(Image.open(io.BytesIO(z.read(n))).convert("RGB")) for n in names]
    labels = torch.tensor([classes.index(n.split("/")[1]) for n in names])
    logits = {"fp32": [], "bf16": []}
    with torch.inference_mode():
        for i in range(0, len(images), batch):
            x = torch.stack(images[i : i + batch])
            logits["fp32"].append(model(x))
            with torch.autocast("cpu", torch.bfloat16):
                logits["bf16"].append(model(x).float())
    fp32, bf16 = torch.cat(logits["fp32"]), torch.cat(logits["bf16"])
    scale = fp32.abs().amax(1)
    return {
        "images": len(names),
        "top1_fp32": float((fp32.argmax(1) == labels).float().mean()),
        "top1_bf16": float((bf16.argmax(1) == labels).float().mean()),
        "top1_agreement": float((fp32.argmax(1) == bf16.argmax(1)).float().mean()),
        "max_relative_logit_difference": float(((bf16 - fp32).abs().amax(1) / scale).max()),
        "median_relative_logit_difference": float(((bf16 - fp32).abs().amax(1) / scale).median()),
    }


def speed(kind: str, repeats: int) -> dict:
    """A batch of 8, one domain and 4 domains, bf16 autocast vs float32 (time ratios)."""
    model, _ = build(kind, None)
    px = MODELS[kind][1]
    x = torch.randn(8, 3, px, px, generator=torch.Generator().manual_seed(0))
    spread = [f"d{i % 4}" for i in range(8)]
    cpu = torch.device("cpu")
    fns = {}
    for precision in ("no", "bf16"):
        fns[f"one_{precision}"] = on_device(lambda: model(x, domain="d0"), cpu, precision, 1)
        fns[f"four_{precision}"] = on_device(lambda: model(x, domain=spread), cpu, precision, 1)
    with torch.inference_mode():
        timed = interleaved(fns, repeats=repeats, baseline="one_no")
    ms = {name: t["ms"] for name, t in timed.items()}
    return {
        "ms": ms,
        "one_domain_bf16_throughput_vs_fp32": ms["one_no"] / ms["one_bf16"],
        "four_domains_bf16_throughput_vs_fp32": ms["four_no"] / ms["four_bf16"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "precision_cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    results = {"cpu_bf16_flags": cpu_flags()}
    if R56_WEIGHTS.is_file() and CIFAR10_TEST.is_file():
        results["accuracy"] = accuracy()
        print(results["accuracy"], flush=True)
    for kind in ("r56", "r50"):
        results[kind] = speed(kind, args.repeats)
        print(kind, results[kind], flush=True)
    write_report(args.out, "precision", {"repeats": args.repeats, "batch": 8, "threads": 1}, results, start)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
