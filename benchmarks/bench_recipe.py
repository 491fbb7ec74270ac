"""The training recipe per topology on real data: parallel vs series adapters vs fine-tuning (issue 12.1).

Backbone: the real CIFAR ResNet-56 at 32 px; each domain (examples/data.py loaders, `--data-root`)
on the sequential example's quick subsets (1,000 training images, class-balanced; 500 test images),
SGD 0.9, cosine, batch 32, a fixed number of steps. Every variant starts from the same pretrained
weights and the same seed; each row is one training and one evaluation on the domain's test subset.

Variants (`--variants`, default all):

- parallel adapters at adapter lr scales 1 (the old recipe), 2, 3.5 and 5 (`adapter_lr_scale`);
- parallel adapters with the old weight decay on the domain's BatchNorm and head too;
- series adapters at scale 1;
- fine-tuning of every weight: the old recipe (lr 0.05 everywhere) and a backbone 10x, 2x or 4x slower
  than the head.

    OMP_NUM_THREADS=1 python benchmarks/bench_recipe.py --domains gtsrb --out benchmarks/results/recipe.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from _common import machine  # noqa: E402
from data import DEFAULT_DATA_ROOT, DOMAINS  # noqa: E402

from adapterkit import AdapterConfig, AdapterModel  # noqa: E402
from adapterkit.inject import create_backbone  # noqa: E402
from adapterkit.train import TrainConfig, auto_weight_decay, train_domain, train_model  # noqa: E402

NO_FLIP = {"omniglot", "gtsrb", "mnist"}
# name: (method, TrainConfig fields); "wd" stands for the paper's decay by training-set size
VARIANTS = {
    "parallel x1": ("parallel", {"adapter_lr_scale": 1.0}),
    "parallel x2": ("parallel", {"adapter_lr_scale": 2.0}),
    "parallel x3.5": ("parallel", {"adapter_lr_scale": 3.5}),
    "parallel x5": ("parallel", {"adapter_lr_scale": 5.0}),
    "parallel x3.5, bn+head wd": (
        "parallel",
        {"adapter_lr_scale": 3.5, "norm_weight_decay": "wd", "head_weight_decay": "wd"},
    ),
    "series x1": ("series", {"adapter_lr_scale": 1.0}),
    "parallel x3.5, head x2": ("parallel", {"adapter_lr_scale": 3.5, "head_lr_scale": 2.0}),
    "series x1, head x2": ("series", {"adapter_lr_scale": 1.0, "head_lr_scale": 2.0}),
    "fine-tuning lr .05": ("fine-tuning", {"lr": 0.05, "weight_decay": 0.0005}),
    "fine-tuning lr .1, backbone x.1": (
        "fine-tuning",
        {"lr": 0.1, "backbone_lr_scale": 0.1, "weight_decay": 0.0005},
    ),
    "fine-tuning lr .1, backbone x.5": (
        "fine-tuning",
        {"lr": 0.1, "backbone_lr_scale": 0.5, "weight_decay": 0.0005},
    ),
    "fine-tuning lr .2, backbone x.25": (
        "fine-tuning",
        {"lr": 0.2, "backbone_lr_scale": 0.25, "weight_decay": 0.0005},
    ),
}


def run_variant(name: str, domain: str, data: tuple, args: argparse.Namespace) -> dict[str, float]:
    method, fields = VARIANTS[name]
    train, test = data
    wd = auto_weight_decay(len(train))
    fields = {k: wd if v == "wd" else v for k, v in fields.items()}
    base = dict(steps=args.steps, batch_size=32, lr=0.1, flip=domain not in NO_FLIP, eval_batch_size=250)
    config = TrainConfig(**(base | fields | {"threads": 1, "progress": False, "seed": args.seed}))
    weights = args.data_root / "resnet_cifar10" / "resnet56.safetensors"
    classes = len(train.features["label"].names)
    dcfg = {"input_size": 32}
    if method == "fine-tuning":
        net = create_backbone("cifar_resnet56", weights)
        net.reset_classifier(classes)
        return train_model(net, train, test, config, name=domain, data_config=dcfg)
    model = AdapterModel.from_backbone("cifar_resnet56", AdapterConfig(topology=method), pretrained=weights)
    return train_domain(model, domain, train, test, config, num_classes=classes, data_config=dcfg)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    p.add_argument("--domains", nargs="+", default=["gtsrb"], choices=sorted(DOMAINS))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--steps", type=int, default=93, help="optimizer steps (93: the quick mode's 3 epochs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    torch.set_num_threads(1)
    report = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}, "results": {}}
    if args.out and args.out.is_file():  # append to an earlier run's results (other domains)
        report["results"] = json.loads(args.out.read_text())["results"]
    for domain in args.domains:
        kw = {"num_classes": 100} if domain == "omniglot" else {}
        data = tuple(
            DOMAINS[domain](args.data_root, s, limit=n, **kw) for s, n in (("train", 1000), ("test", 500))
        )
        rows = report["results"].setdefault(domain, {})
        for name in args.variants:
            start = time.perf_counter()
            metrics = run_variant(name, domain, data, args)
            rows[name] = {"accuracy": metrics["accuracy"], "train_loss": metrics["train_loss"]}
            print(
                f"{domain:10s} {name:34s} acc {metrics['accuracy']:.4f}  ({time.perf_counter() - start:.0f} s)"
            )
            if args.out:
                args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
