"""A smaller copy of the shared data root for machines it must be shipped to (the GPU run's 64 MiB limit).

The numpy domains (MNIST, GTSRB) keep exactly the class-balanced subsets that `examples/data.py`
selects for `limit=--train-limit` / `--test-limit`, in the same file format, so
`examples/sequential.py --data-root OUT --train-limit N --test-limit M` trains and tests on the same
images from the copy as from the original. Omniglot, DTD-10, Flowers-90 and the ResNet-56 weights are
copied whole (they are small, or within the limits anyway).

    python benchmarks/subset_data.py OUT --train-limit 5000 --test-limit 2000
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from data import DEFAULT_DATA_ROOT, _balanced  # noqa: E402

WHOLE = ["omniglot", "dtd10", "flowers90", "decathlon_meta"]


def subset_mnist(src: Path, dst: Path, train: int, test: int) -> None:
    with np.load(src / "mnist" / "mnist.npz", allow_pickle=False) as d:
        out = {}
        for split, limit in (("train", train), ("test", test)):
            x, y = d[f"x_{split}"], d[f"y_{split}"]
            keep = _balanced(y, limit)
            out[f"x_{split}"], out[f"y_{split}"] = x[keep], y[keep]
    np.savez_compressed(dst / "mnist" / "mnist.npz", **out)


def subset_gtsrb(src: Path, dst: Path, train: int, test: int) -> None:
    for name, limit in (("gtsrb32_train_every3rd.npz", train), ("gtsrb32_test.npz", test)):
        with np.load(src / "gtsrb" / name, allow_pickle=False) as d:
            keep = _balanced(d["y"], limit)
            np.savez_compressed(dst / "gtsrb" / name, **{k: d[k][keep] for k in d.files})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    p.add_argument("--train-limit", type=int, required=True)
    p.add_argument("--test-limit", type=int, required=True)
    args = p.parse_args()
    src, dst = args.data_root, args.out
    for name in WHOLE:
        shutil.copytree(src / name, dst / name, dirs_exist_ok=True)
    (dst / "resnet_cifar10").mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "resnet_cifar10" / "resnet56.safetensors", dst / "resnet_cifar10")
    for name in ("mnist", "gtsrb"):
        (dst / name).mkdir(parents=True, exist_ok=True)
    subset_mnist(src, dst, args.train_limit, args.test_limit)
    subset_gtsrb(src, dst, args.train_limit, args.test_limit)
    size = sum(f.stat().st_size for f in dst.rglob("*") if f.is_file())
    print(f"wrote {dst} ({size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
