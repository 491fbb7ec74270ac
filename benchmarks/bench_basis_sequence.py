"""Shared basis on the real sequence: full parallel adapters vs joint SVD (K = C/2) vs the incremental basis.

Backbone: the real CIFAR ResNet-56; domains Omniglot -> GTSRB -> MNIST -> DTD-10 -> Flowers-90
(examples/data.py loaders, `--data-root`). Three families are trained domain after domain:

- full:        the paper's parallel adapters, one full alpha per 3x3 conv and domain;
- joint-svd:   the full family compressed jointly with K = C/2 (paper §3.4), then each gamma fine-tuned
               with beta frozen (`--finetune-epochs`);
- incremental: each domain trained in factored form on the current append-only basis plus
               `--new-columns` columns per layer, shared after training (`append_domain`); the old
               domains' logits are checked bit-identical after every addition.

Prints a table (accuracy per domain, mean, total parameters relative to the backbone) and writes JSON.
`--quick` uses the sequential example's quick subsets and 3 epochs (CPU); the full mode is meant for a GPU.

    python benchmarks/bench_basis_sequence.py --quick --out benchmarks/results/basis_sequence.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from data import DEFAULT_DATA_ROOT, DOMAINS  # noqa: E402

from adapterkit import AdapterModel, __version__  # noqa: E402
from adapterkit.compress import append_domain, compress, parameter_report  # noqa: E402
from adapterkit.inject import create_backbone  # noqa: E402
from adapterkit.train import TrainConfig, evaluate, train_domain  # noqa: E402

SEQUENCE = ["omniglot", "gtsrb", "mnist", "dtd10", "flowers90"]
NO_FLIP = {"omniglot", "gtsrb", "mnist"}


def load(root: Path, quick: bool) -> dict[str, tuple]:
    limits = {"train": 1000, "test": 500} if quick else {"train": None, "test": None}
    data = {}
    for name in SEQUENCE:
        kwargs = {"num_classes": 100} if name == "omniglot" and quick else {}
        data[name] = tuple(
            DOMAINS[name](root, split, limit=limits[split], **kwargs) for split in ("train", "test")
        )
    return data


def train_config(name: str, epochs: int) -> TrainConfig:
    return TrainConfig(epochs=epochs, batch_size=32, lr=0.1, flip=name not in NO_FLIP, progress=False)


def accuracies(model: AdapterModel, data: dict, names: list[str]) -> dict[str, float]:
    return {
        n: evaluate(model, data[n][1], n, config=TrainConfig(progress=False, eval_batch_size=256))
        for n in names
    }


def run_full(backbone, data, epochs):
    model = AdapterModel(copy.deepcopy(backbone))
    for name in SEQUENCE:
        train_domain(model, name, data[name][0], config=train_config(name, epochs))
    return model, accuracies(model, data, SEQUENCE)


def run_joint(full: AdapterModel, data, epochs, finetune_epochs):
    model = copy.deepcopy(full)
    report = compress(model, basis_rank=0.5)
    before_finetune = accuracies(model, data, SEQUENCE)
    for name in SEQUENCE if finetune_epochs else []:
        train_domain(model, name, data[name][0], config=train_config(name, finetune_epochs), resume=True)
    return model, before_finetune, accuracies(model, data, SEQUENCE), report


def run_incremental(backbone, data, epochs, new_columns):
    model = AdapterModel(copy.deepcopy(backbone))
    probe = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    frozen, identical = {}, True
    for name in SEQUENCE:
        model.add_domain(
            name,
            num_classes=len(data[name][0].features["label"].names),
            factored=True,
            new_columns=new_columns,
        )
        train_domain(model, name, data[name][0], config=train_config(name, epochs), resume=True)
        append_domain(model, name)
        model.eval()
        with torch.no_grad():
            for old, logits in frozen.items():
                identical &= torch.equal(model(probe, domain=old), logits)
            frozen[name] = model(probe, domain=name)
    return model, accuracies(model, data, SEQUENCE), identical


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    parser.add_argument("--quick", action="store_true", help="1000/500 images per domain, 3 epochs (CPU)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument(
        "--new-columns", type=int, default=16, help="own basis columns per layer, incremental"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/basis_sequence.json"))
    args = parser.parse_args()
    epochs = args.epochs or (3 if args.quick else 30)
    torch.manual_seed(0)
    weights = args.data_root / "resnet_cifar10" / "resnet56.safetensors"
    data = load(args.data_root, args.quick)
    t0 = time.time()
    plain = create_backbone("cifar_resnet56", pretrained=weights)
    full, acc_full = run_full(plain, data, epochs)
    joint, acc_joint_raw, acc_joint, report = run_joint(full, data, epochs, args.finetune_epochs)
    inc, acc_inc, identical = run_incremental(plain, data, epochs, args.new_columns)
    rows = {
        "full": (acc_full, parameter_report(full)),
        "joint-svd K=C/2": (acc_joint_raw, parameter_report(joint)),
        f"joint-svd K=C/2 + gamma fine-tune ({args.finetune_epochs} ep)": (
            acc_joint,
            parameter_report(joint),
        ),
        f"incremental (+{args.new_columns} cols/domain)": (acc_inc, parameter_report(inc)),
    }
    print(f"\n| family | {' | '.join(SEQUENCE)} | mean | params (x backbone) |")
    print("|---|" + "---|" * (len(SEQUENCE) + 2))
    for label, (acc, params) in rows.items():
        mean = sum(acc.values()) / len(acc)
        cells = " | ".join(f"{100 * acc[n]:.1f}" for n in SEQUENCE)
        print(f"| {label} | {cells} | {100 * mean:.1f} | {params['relative']:.3f}x |")
    print(f"\nincremental: old domains bit-identical after every addition: {identical}")
    print(f"joint SVD mean reconstruction error per domain: {report.domain_errors}")
    result = {
        "command": " ".join(sys.argv),
        "machine": platform.platform(),
        "processor": platform.processor(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "adapterkit": __version__,
        "epochs": epochs,
        "quick": args.quick,
        "seconds": time.time() - t0,
        "rows": {k: {"accuracy": a, "parameters": p} for k, (a, p) in rows.items()},
        "incremental_old_domains_bit_identical": identical,
        "joint_svd_domain_errors": report.domain_errors,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
