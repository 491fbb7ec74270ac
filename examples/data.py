"""Loaders for the real image domains in ``../shared/data`` (see its README.md), as ``datasets.Dataset``.

Every loader returns a dataset with two columns, ``image`` (``datasets.Image()``, decoded lazily to a
PIL image in the mode it is stored in) and ``label`` (``datasets.ClassLabel`` with the class names), and
takes ``limit`` for quick runs: a deterministic, class-balanced subset (round robin over the classes,
in a fixed-seed order inside each class, returned in the original order).

Compressed files (JPEG in zips) are passed through as bytes; numpy arrays are encoded once as PNG
(lossless, fast compression). Nothing is written to disk.

Example:
    >>> from data import DOMAINS, DEFAULT_DATA_ROOT
    >>> ds = DOMAINS["gtsrb"](DEFAULT_DATA_ROOT, "test", limit=430)
    >>> ds[0]["image"].size, ds.features["label"].names[ds[0]["label"]]
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from collections.abc import Callable, Sequence
from itertools import pairwise
from pathlib import Path

import datasets
import numpy as np
from PIL import Image

__all__ = [
    "DEFAULT_DATA_ROOT",
    "DOMAINS",
    "load_cifar10",
    "load_dtd10",
    "load_flowers90",
    "load_gtsrb",
    "load_mnist",
    "load_omniglot",
]

DEFAULT_DATA_ROOT = Path(
    os.environ.get("ADAPTERKIT_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data")
)

GTSRB_CLASSES = (
    "speed limit 20", "speed limit 30", "speed limit 50", "speed limit 60", "speed limit 70",
    "speed limit 80", "end speed limit 80", "speed limit 100", "speed limit 120", "no overtaking",
    "no overtaking trucks", "priority at next intersection", "priority road", "yield", "stop",
    "no vehicles", "no trucks", "no entry", "general caution", "curve left", "curve right",
    "double curve", "bumpy road", "slippery road", "road narrows right", "road work",
    "traffic signals", "pedestrians", "children crossing", "bicycles crossing", "ice/snow",
    "wild animals", "end of all limits", "turn right ahead", "turn left ahead", "ahead only",
    "straight or right", "straight or left", "keep right", "keep left", "roundabout",
    "end no overtaking", "end no overtaking trucks",
)  # fmt: skip

# (first Omniglot character id, alphabet); ids are 1-based, background 1..964, evaluation 965..1623.
OMNIGLOT_ALPHABETS = (
    (1, "Arcadian"), (27, "Armenian"), (68, "Asomtavruli"), (108, "Balinese"), (132, "Bengali"),
    (178, "Blackfoot"), (192, "Braille"), (218, "Cyrillic"), (251, "Early_Aramaic"),
    (273, "Syriac_(Estrangelo)"), (296, "Anglo-Saxon_Futhorc"), (325, "Futurama"), (351, "Grantha"),
    (394, "Greek"), (418, "Gujarati"), (466, "Hebrew"), (488, "Hiragana"), (540, "Inuktitut"),
    (556, "Malay_(Jawi)"), (596, "Katakana"), (643, "Korean"), (683, "Latin"),
    (709, "Alphabet_of_the_Magi"), (729, "Mkhedruli"), (770, "Burmese"), (804, "N_Ko"), (837, "Ojibwe"),
    (851, "Sanskrit"), (893, "Tagalog"), (910, "Tifinagh"), (965, "Angelic"),
    (985, "Atemayar_Qelisayer"), (1011, "Atlantean"), (1037, "Aurek-Besh"), (1063, "Avesta"),
    (1089, "Ge_ez"), (1115, "Glagolitic"), (1160, "Gurmukhi"), (1205, "Kannada"), (1246, "Keble"),
    (1272, "Malayalam"), (1319, "Manipuri"), (1359, "Mongolian"), (1389, "Old_Church_Slavonic"),
    (1434, "Oriya"), (1480, "Syriac_(Serto)"), (1503, "Sylheti"), (1531, "Tengwar"), (1556, "Tibetan"),
    (1598, "ULOG"), (1624, ""),
)  # fmt: skip


def _check_split(split: str, splits: Sequence[str] = ("train", "test")) -> None:
    if split not in splits:
        raise ValueError(f"Unknown split {split!r}: use one of {', '.join(map(repr, splits))}.")


def _balanced(labels: np.ndarray, limit: int | None, seed: int = 0) -> np.ndarray:
    """Indices of a deterministic class-balanced subset of ``limit`` samples, in the original order."""
    n = len(labels)
    if limit is None or limit >= n:
        return np.arange(n)
    if limit <= 0:
        raise ValueError(f"limit must be a positive number of images or None, got {limit}.")
    perm = np.random.default_rng(seed).permutation(n)
    order = perm[np.argsort(labels[perm], kind="stable")]  # grouped by class, shuffled inside
    grouped = labels[order]
    rank = np.arange(n) - np.searchsorted(grouped, grouped, side="left")  # position inside its class
    return np.sort(order[np.lexsort((grouped, rank))[:limit]])


def _png(array: np.ndarray) -> dict[str, bytes | None]:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return {"bytes": buf.getvalue(), "path": None}


def _dataset(images: list[dict], labels: Sequence[int], names: Sequence[str]) -> datasets.Dataset:
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(names))})
    return datasets.Dataset.from_dict({"image": images, "label": [int(y) for y in labels]}, features=features)


def _from_arrays(x: np.ndarray, y: np.ndarray, names: Sequence[str], limit: int | None) -> datasets.Dataset:
    keep = _balanced(y, limit)
    return _dataset([_png(x[i]) for i in keep], y[keep], names)


def _from_zip(
    path: Path, members: Sequence[str], labels: Sequence[int], names: Sequence[str], limit: int | None
) -> datasets.Dataset:
    keep = _balanced(np.asarray(labels), limit)
    with zipfile.ZipFile(path) as zf:
        images = [{"bytes": zf.read(members[i]), "path": members[i]} for i in keep]
    return _dataset(images, [labels[i] for i in keep], names)


def load_cifar10(root: str | Path, split: str, limit: int | None = None) -> datasets.Dataset:
    """CIFAR-10 from ``cifar10/{split}.zip``: 50,000 train / 10,000 test 32x32 RGB JPEGs (q75).

    Classes in the standard order (airplane ... truck); images in sorted member-name order.
    """
    _check_split(split)
    with zipfile.ZipFile(Path(root) / "cifar10" / f"{split}.zip") as zf:
        members = sorted(n for n in zf.namelist() if n.endswith(".jpg"))
    names = sorted({m.split("/")[1] for m in members})
    labels = [names.index(m.split("/")[1]) for m in members]
    return _from_zip(Path(root) / "cifar10" / f"{split}.zip", members, labels, names, limit)


def load_mnist(root: str | Path, split: str, limit: int | None = None) -> datasets.Dataset:
    """MNIST from ``mnist/mnist.npz``: the official 60,000 train / 10,000 test 28x28 L images, in order."""
    _check_split(split)
    with np.load(Path(root) / "mnist" / "mnist.npz", allow_pickle=False) as d:
        x, y = d[f"x_{split}"], d[f"y_{split}"]
    return _from_arrays(x, y, [str(i) for i in range(10)], limit)


def load_gtsrb(root: str | Path, split: str, limit: int | None = None) -> datasets.Dataset:
    """GTSRB, 43 classes, 32x32 RGB (full frame resized, aspect not kept).

    ``train``: ``gtsrb32_train_every3rd.npz``, 13,070 images (frames 0, 3, ..., 27 of each of the 1,307
    tracks of the official training set); ``test``: ``gtsrb32_test.npz``, the full official test set
    of 12,630 images.
    """
    _check_split(split)
    name = "gtsrb32_train_every3rd.npz" if split == "train" else "gtsrb32_test.npz"
    with np.load(Path(root) / "gtsrb" / name, allow_pickle=False) as d:
        x, y = d["x"], d["y"]
    return _from_arrays(x, y, GTSRB_CLASSES, limit)


def load_omniglot(
    root: str | Path, split: str, limit: int | None = None, num_classes: int | None = None
) -> datasets.Dataset:
    """Omniglot as in the Visual Decathlon: all 1,623 characters, white strokes on black, 105x105 L.

    Labels 0..963 are the ``images_background`` characters and 964..1622 the ``images_evaluation`` ones
    (Omniglot character id - 1); names are ``<alphabet>/characterNN``. Split by drawer, the same for
    every class: ``train`` = drawers 1-15 (24,345 images), ``test`` = drawers 16-20 (8,115 images).

    Args:
        root: Data root (the folder holding ``omniglot/``).
        split: ``"train"`` or ``"test"``.
        limit: Class-balanced subset size.
        num_classes: Keep only the first ``num_classes`` characters (labels stay ``0..num_classes-1``).
    """
    _check_split(split)
    drawers = range(0, 15) if split == "train" else range(15, 20)
    names = [
        f"{alphabet}/character{i + 1:02d}"
        for (first, alphabet), (end, _) in pairwise(OMNIGLOT_ALPHABETS)
        for i in range(end - first)
    ][:num_classes]
    labels = np.repeat(np.arange(len(names)), len(drawers))
    keep = _balanced(labels, limit)
    images, offset = [], 0  # one file at a time: each decompresses to ~200 MB of bools
    for name in ("images_background.npz", "images_evaluation.npz"):
        if offset >= len(names):
            break
        with np.load(Path(root) / "omniglot" / name, allow_pickle=False) as d:
            glyphs = d["images"]
        for i in keep[(keep >= offset * len(drawers)) & (keep < (offset + len(glyphs)) * len(drawers))]:
            c, k = divmod(int(i), len(drawers))
            images.append(_png(np.where(glyphs[c - offset, drawers[k]], 0, 255).astype(np.uint8)))
        offset += len(glyphs)
    return _dataset(images, labels[keep], names)


def _split_file_domain(
    folder: Path, zip_name: str, split: str, limit: int | None, names_fn: Callable
) -> datasets.Dataset:
    _check_split(split)
    members = sorted((folder / f"split_{split}.txt").read_text().split())
    # Classes from both split files, so that labels agree across splits even if one lacks a class.
    every = (folder / "split_train.txt").read_text().split() + (folder / "split_test.txt").read_text().split()
    class_ids = sorted({m.split("/")[0] for m in every}, key=lambda c: (len(c), c))  # numeric ids in order
    labels = [class_ids.index(m.split("/")[0]) for m in members]
    return _from_zip(folder / zip_name, members, labels, names_fn(class_ids), limit)


def load_dtd10(root: str | Path, split: str, limit: int | None = None) -> datasets.Dataset:
    """DTD-10: the first 10 DTD classes (banded ... crystalline), RGB JPEGs with shorter side 72 px.

    Splits from ``split_{train,test}.txt``: per class sorted by name, every third image (index % 3 == 2)
    is ``test``: 800 train / 400 test.
    """
    return _split_file_domain(Path(root) / "dtd10", "dtd10_short72.zip", split, limit, list)


def load_flowers90(root: str | Path, split: str, limit: int | None = None) -> datasets.Dataset:
    """Flowers-90: 90 of the 102 Oxford Flowers classes, RGB JPEGs with shorter side 72 px.

    Splits from ``split_{train,test}.txt``: per class sorted by name, index % 5 == 4 is ``test``:
    4,473 train / 1,071 test. Labels follow the Oxford class ids in increasing order; names come from
    ``cat_to_name.json``. Class 1 ("pink primrose") has a single image, in ``train``, so ``test`` covers
    89 classes.
    """
    folder = Path(root) / "flowers90"
    to_name = json.loads((folder / "cat_to_name.json").read_text())
    return _split_file_domain(
        folder, "flowers90_short72.zip", split, limit, lambda ids: [to_name[i] for i in ids]
    )


DOMAINS: dict[str, Callable[..., datasets.Dataset]] = {
    "cifar10": load_cifar10,
    "omniglot": load_omniglot,
    "gtsrb": load_gtsrb,
    "mnist": load_mnist,
    "dtd10": load_dtd10,
    "flowers90": load_flowers90,
}


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(
        description="List the real domains these loaders read (a module the examples import; this prints "
        "what it finds)",
    )
    parser.add_argument(
        "--root", default=str(DEFAULT_DATA_ROOT), help="the data folder (default: %(default)s)"
    )
    parser.add_argument("--limit", type=int, default=8, help="images per split to load as a check")
    args = parser.parse_args()
    for name, load in DOMAINS.items():
        try:
            sizes = {split: len(load(args.root, split, limit=args.limit)) for split in ("train", "test")}
            classes = load(args.root, "test", limit=args.limit).features["label"].num_classes
            print(f"{name:10s} {classes:4d} classes  loaded {sizes}")
        except (OSError, ValueError) as e:
            print(f"{name:10s} not readable: {e}")
