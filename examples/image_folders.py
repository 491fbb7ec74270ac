"""Write the image folders the README and docs use: `gtsrb_images/` and `mnist_images/`, each with `train/`
and `test/` class folders (`class0/`, `class1/`, ...) of PNG files, from the real data in ../shared/data.

    python examples/image_folders.py                   # 4 classes, 16 train and 8 test images each
    python examples/image_folders.py --classes 10 --train 200 --test 50 --out data/

Any folder laid out this way (one subfolder per class) is what `adapterkit train --data`, `adapterkit eval
--data` and `train_domain(model, name, "folder/train", "folder/test")` take.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def write_split(folder: Path, images: np.ndarray, labels: np.ndarray, classes: int, per_class: int) -> int:
    """The first `per_class` images of each of the first `classes` classes, as folder/class<c>/<index>.png."""
    written = 0
    for c in range(classes):
        (folder / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in np.flatnonzero(labels == c)[:per_class]:
            Image.fromarray(images[i]).save(folder / f"class{c}" / f"{i}.png")
            written += 1
    return written


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=SHARED_DATA, help="the shared data folder")
    parser.add_argument("--out", type=Path, default=Path("."), help="where the two folders are written")
    parser.add_argument("--classes", type=int, default=4, help="classes per domain (GTSRB has 43, MNIST 10)")
    parser.add_argument("--train", type=int, default=16, help="training images per class")
    parser.add_argument("--test", type=int, default=8, help="test images per class")
    args = parser.parse_args()
    if not args.data.is_dir():
        parser.error(f"{args.data} does not exist: pass --data with the folder that holds gtsrb/ and mnist/")
    gtsrb = {
        s: np.load(args.data / "gtsrb" / f"gtsrb32_{f}.npz")
        for s, f in (("train", "train_every3rd"), ("test", "test"))
    }
    mnist = np.load(args.data / "mnist" / "mnist.npz")
    for split, per_class in (("train", args.train), ("test", args.test)):
        arrays = {
            "gtsrb_images": (gtsrb[split]["x"], gtsrb[split]["y"]),
            "mnist_images": (mnist[f"x_{split}"], mnist[f"y_{split}"]),
        }
        for name, (x, y) in arrays.items():
            n = write_split(args.out / name / split, x, y, args.classes, per_class)
            print(f"{args.out / name / split}: {n} images in {args.classes} class folders")


if __name__ == "__main__":
    main()
