"""Evaluate a real CIFAR-10 ResNet (He et al. 2016, akamaster weights) as a timm model.

The weights in ``<data-root>/resnet_cifar10/`` load through timm's own pretrained path with strict key
matching (``pretrained_cfg_overlay=dict(file=...)``); preprocessing comes from the model's pretrained
config (``resolve_data_config`` + ``create_transform``).

    python examples/cifar10_eval.py --model cifar_resnet56
    python examples/cifar10_eval.py --model cifar_resnet20 --limit 1000 --data-root ../shared/data
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import timm
import torch
from data import DEFAULT_DATA_ROOT, load_cifar10
from timm.data import create_transform, resolve_data_config

import adapterkit.backbones  # noqa: F401  (registers cifar_resnet20/32/44/56 with timm)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT, help="folder of the shared data")
    parser.add_argument("--model", default="cifar_resnet56", choices=timm.list_models("cifar_resnet*"))
    parser.add_argument(
        "--weights", type=Path, help="default: <data-root>/resnet_cifar10/resnetNN.safetensors"
    )
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--limit", type=int, help="class-balanced subset of the 10,000 test images")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    return parser.parse_args()


@torch.no_grad()
def main() -> None:
    args = parse_args()
    weights = (
        args.weights or args.data_root / "resnet_cifar10" / f"{args.model.removeprefix('cifar_')}.safetensors"
    )
    if not weights.is_file():
        raise SystemExit(
            f"No weights at {weights}: pass --data-root (or --weights) pointing at the shared data."
        )
    # pretrained=True + a `file` overlay goes through timm.models.load_pretrained, strict=True by default.
    model = timm.create_model(args.model, pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)))
    model.eval()

    transform = create_transform(**resolve_data_config(model=model))
    dataset = load_cifar10(args.data_root, "test", limit=args.limit)
    dataset.set_transform(
        lambda batch: {
            "pixels": [transform(im.convert("RGB")) for im in batch["image"]],
            "label": batch["label"],
        }
    )
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers)

    start, correct, seen = time.perf_counter(), 0, 0
    for batch in loader:
        correct += (model(batch["pixels"]).argmax(-1) == batch["label"]).sum().item()
        seen += len(batch["label"])
    print(
        f"{args.model}: top-1 {100 * correct / seen:.2f} % on {seen} CIFAR-10 test JPEGs "
        f"({time.perf_counter() - start:.1f} s, {torch.get_num_threads()} threads, timm {timm.__version__}, "
        f"torch {torch.__version__})"
    )


if __name__ == "__main__":
    main()
