"""Sequential real-data run: one frozen CIFAR-10 ResNet-56, five domains trained one after another.

Omniglot -> GTSRB -> MNIST -> DTD-10 -> Flowers-90 on the real CIFAR-10 ResNet-56 (He et al. 2016,
``<data-root>/resnet_cifar10/resnet56.safetensors``), with parallel (or series) residual adapters. After
each domain every earlier domain is evaluated again (the accuracy matrix R); then two baselines run on
the same data: full fine-tuning of a separate ResNet-56 per domain (whose errors define the Visual
Decathlon score) and a linear probe on the frozen features.

Images are resized to the backbone's 32 px (its pretraining resolution; the paper used 72 px for its
ImageNet ResNet-26): 32 px keeps a CPU run short, and `--image-size 64` is there for a GPU.

    python examples/sequential.py --quick                  # < 10 minutes on 2 CPU cores
    python examples/sequential.py --topology series --quick
    python examples/sequential.py --epochs 30              # full data: meant for a GPU
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch
from data import DEFAULT_DATA_ROOT, DOMAINS

from adapterkit import AdapterConfig, AdapterModel
from adapterkit.continual import (
    DomainSpec,
    comparison_table,
    finetune_baseline,
    linear_probe_baseline,
    train_sequence,
)
from adapterkit.family import save_family
from adapterkit.metrics import format_table
from adapterkit.train import TrainConfig, make_accelerator

ORDER = ("omniglot", "gtsrb", "mnist", "dtd10", "flowers90")
NO_FLIP = {"omniglot", "gtsrb", "mnist"}  # glyphs, signs and digits change meaning when mirrored
QUICK = dict(train_limit=1000, test_limit=500, epochs=3, omniglot_classes=100)
FULL = dict(train_limit=None, test_limit=None, epochs=30, omniglot_classes=None)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT, help="folder of the shared data")
    p.add_argument("--quick", action="store_true", help=f"small class-balanced subsets: {QUICK}")
    p.add_argument("--topology", choices=("parallel", "series"), default="parallel")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--epochs", type=int, help="epochs per domain (quick: 3, full: 30)")
    p.add_argument("--train-limit", type=int, help="training images per domain (class-balanced subset)")
    p.add_argument("--test-limit", type=int, help="test images per domain")
    p.add_argument("--omniglot-classes", type=int, help="first N Omniglot characters (default: all 1,623)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.1, help="adapters and linear probe (SGD, cosine)")
    p.add_argument("--finetune-lr", type=float, default=0.05)
    p.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument("--save", type=Path, help="save the adapter family to this folder")
    p.add_argument("--json", type=Path, help="write all results to this JSON file")
    args = p.parse_args()
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def load_domains(args: argparse.Namespace) -> list[DomainSpec]:
    domains = []
    for name in ORDER:
        kw = {"num_classes": args.omniglot_classes} if name == "omniglot" else {}
        train = DOMAINS[name](args.data_root, "train", limit=args.train_limit, **kw)
        test = DOMAINS[name](args.data_root, "test", limit=args.test_limit, **kw)
        labels = train.features["label"].names
        config = TrainConfig(
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            flip=name not in NO_FLIP,
            mixed_precision=args.mixed_precision,
            num_workers=args.workers,
            eval_batch_size=250,
        )
        domains.append(
            DomainSpec(name, train, test, len(labels), labels, config, {"input_size": args.image_size})
        )
        print(f"{name}: {len(train)} train / {len(test)} test images, {len(labels)} classes")
    return domains


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("adapterkit.continual").setLevel(logging.INFO)
    if args.threads:
        torch.set_num_threads(args.threads)
    weights = args.data_root / "resnet_cifar10" / "resnet56.safetensors"
    if not weights.is_file():
        raise SystemExit(f"No weights at {weights}: pass --data-root pointing at the shared data.")
    start = time.perf_counter()
    domains = load_domains(args)
    acc = make_accelerator(domains[0].config)
    timings = {"data": time.perf_counter() - start}

    t = time.perf_counter()
    model = AdapterModel.from_backbone(
        "cifar_resnet56", AdapterConfig(topology=args.topology), pretrained=weights
    )
    adapters = train_sequence(model, domains, accelerator=acc)
    timings["adapters"] = time.perf_counter() - t
    print(f"\n== adapters ({args.topology}), accuracy matrix R[after i, on j]\n{adapters.report}")
    print(f"\n== what each domain adds (backbone: {adapters.backbone_parameters:,} parameters)")
    print(adapters.cost_table())
    if args.save:
        save_family(model, args.save)
        print(f"saved the family to {args.save}")

    results = {"adapters": adapters}
    if not args.no_baselines:
        t = time.perf_counter()
        overrides = {"lr": args.finetune_lr, "weight_decay": 0.0005}
        results["fine-tuning"] = finetune_baseline(
            "cifar_resnet56", domains, pretrained=weights, overrides=overrides, accelerator=acc
        )
        timings["fine-tuning"] = time.perf_counter() - t
        t = time.perf_counter()
        results["linear probe"] = linear_probe_baseline(
            "cifar_resnet56", domains, pretrained=weights, overrides={"weight_decay": 0.0}, accelerator=acc
        )
        timings["linear probe"] = time.perf_counter() - t
        rows = [[name] + [r.accuracies[name] for r in results.values()] for name in ORDER]
        print("\n== test accuracy per domain\n" + format_table(rows, ["domain", *results]))
        # a perfect baseline has error 0, where the Decathlon score is undefined: floor it at half an image
        floor = 0.5 / min(len(spec.test) for spec in domains)
        table = comparison_table(list(results.values()), results["fine-tuning"], floor=floor)
        print(
            f"\n== comparison (Decathlon score against fine-tuning's errors, max {250 * len(domains)} at par)"
        )
        print(table)
    timings["total"] = time.perf_counter() - start
    print("\n" + format_table([[k, round(v)] for k, v in timings.items()], ["stage", "seconds"]))
    if args.json:
        out = {
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "timings": timings,
            "results": {
                k: {**asdict(r), "report": None, "matrix": r.report.matrix.tolist()}
                for k, r in results.items()
            },
        }
        args.json.write_text(json.dumps(out, indent=1, default=float))


if __name__ == "__main__":
    main()
