"""Training data for one domain: sources, checks before training, datasets and batches.

A *source* is what the user passes, normalised: a `datasets.Dataset` (image + label columns), an image
folder (`root/<class>/<image>`), a folder written by `Dataset.save_to_disk`, or a torch `Dataset`
yielding `(image, label)`. `DomainDataset` turns its items into tensors with `transforms.Preprocess`.

Augmentation is a pure function of `(seed, epoch, index)` (one numpy generator per sample), so the
same sample gets the same crop whatever the number of processes or DataLoader workers, and a run
resumed in the middle of an epoch reproduces the uninterrupted one. Nothing here imports accelerate.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Sampler

from .transforms import Preprocess

logger = logging.getLogger(__name__)

# Folder (and DatasetDict) names read as splits, ignoring case: name -> split
SPLITS = {"train": "train", "training": "train", "test": "test", "testing": "test"}
SPLITS |= {"val": "val", "valid": "val", "validation": "val"}
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")


# ---------------------------------------------------------------------- sources
class Source:
    """Indexable images and labels; `labels()` reads every label without decoding images if it can."""

    class_names: list[str] | None = None

    def __len__(self) -> int:
        raise NotImplementedError

    def labels(self) -> np.ndarray:
        return np.asarray([self.item(i)[1] for i in range(len(self))])

    def item(self, i: int) -> tuple[Any, Any]:
        raise NotImplementedError

    def describe(self, i: int) -> str:
        return f"item {i}"


class HFSource(Source):
    """A `datasets.Dataset`; `Image` columns are decoded here so that errors name the file."""

    def __init__(self, ds: Any, image_column: str = "image", label_column: str = "label") -> None:
        import datasets

        missing = [c for c in (image_column, label_column) if c not in ds.column_names]
        if missing:
            raise ValueError(
                f"the dataset has no column {missing[0]!r} (columns: {ds.column_names}); name its columns "
                "with TrainConfig(image_column=..., label_column=...), or --image-column/--label-column"
            )
        ds = ds.select_columns([image_column, label_column])
        feature = ds.features[image_column]
        if isinstance(feature, datasets.Image):
            ds = ds.cast_column(image_column, datasets.Image(decode=False))
        label = ds.features[label_column]
        self.class_names = list(label.names) if isinstance(label, datasets.ClassLabel) else None
        self.ds, self.image_column, self.label_column = ds, image_column, label_column

    def __len__(self) -> int:
        return len(self.ds)

    def labels(self) -> np.ndarray:
        return np.asarray(list(self.ds[self.label_column]))

    def item(self, i: int) -> tuple[Any, Any]:
        row = self.ds[int(i)]
        image = row[self.image_column]
        if isinstance(image, dict) and ("bytes" in image or "path" in image):
            data = image.get("bytes")
            image = _open_image(io.BytesIO(data) if data is not None else image["path"])
        return image, row[self.label_column]

    def describe(self, i: int) -> str:
        image = self.ds[int(i)][self.image_column]
        path = image.get("path") if isinstance(image, dict) else None
        return f"row {i}" + (f" ({path})" if path else "")


class FolderSource(Source):
    """An image folder: `root/<class>/.../<image>`, classes in sorted order of their folder names."""

    def __init__(self, root: str | Path) -> None:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"{root} is not a folder; pass an image folder (root/<class>/<image>)")
        classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if (
            classes
            and all(c.lower() in SPLITS for c in classes)
            and any(p.is_dir() for c in classes for p in (root / c).iterdir())
        ):
            split = root / next((c for c in classes if SPLITS[c.lower()] == "train"), classes[0])
            raise ValueError(
                f"{root} holds the splits {', '.join(f'{c}/' for c in classes)}, not classes: pass one split "
                f"(train_domain(model, name, '{split}', eval_data=...)); adapterkit.data.open_splits reads them all"
            )
        self.paths: list[Path] = []
        targets: list[int] = []
        for label, name in enumerate(classes):
            files = sorted(
                p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
            )
            self.paths += files
            targets += [label] * len(files)
        self.root, self.class_names, self.targets = root, classes, np.asarray(targets, dtype=np.int64)
        loose = sorted(p.name for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if loose and not self.paths:
            raise ValueError(
                f"{root} holds {len(loose)} images but no class subfolders: the class of an image is the "
                f"name of its subfolder. Move the images into one subfolder per class:\n"
                f"    {root}/<first class>/{loose[0]}\n    {root}/<second class>/..."
            )
        if loose:
            logger.warning("%s: %d images outside the class subfolders are ignored", root, len(loose))

    def __len__(self) -> int:
        return len(self.paths)

    def labels(self) -> np.ndarray:
        return self.targets

    def item(self, i: int) -> tuple[Any, Any]:
        return _open_image(self.paths[i]), int(self.targets[i])

    def describe(self, i: int) -> str:
        return f"image {i} ({self.paths[i]})"


class TorchSource(Source):
    """A torch `Dataset` yielding `(image, label)`; labels come from `.targets` if it has them, else
    from reading every item once (which decodes every image)."""

    def __init__(self, ds: Dataset) -> None:
        self.ds = ds
        self.class_names = list(ds.classes) if isinstance(getattr(ds, "classes", None), Sequence) else None

    def __len__(self) -> int:
        return len(self.ds)  # type: ignore[arg-type]

    def labels(self) -> np.ndarray:
        targets = getattr(self.ds, "targets", None)
        if targets is not None and len(targets) == len(self):
            return np.asarray(targets)
        return super().labels()

    def item(self, i: int) -> tuple[Any, Any]:
        item = self.ds[i]
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise ValueError(
                f"item {i} of the torch dataset is not an (image, label) pair; return (image, label)"
            )
        return item[0], item[1]


class Relabeled(Source):
    """`source` with label `i` read as `mapping[i]`: its classes matched by name to a domain's."""

    def __init__(self, source: Source, mapping: list[int], class_names: list[str]) -> None:
        self.source, self.mapping, self.class_names = source, np.asarray(mapping), class_names

    def __len__(self) -> int:
        return len(self.source)

    def labels(self) -> np.ndarray:
        labels = np.asarray(self.source.labels(), dtype=np.int64)
        bad = labels[(labels < 0) | (labels >= len(self.mapping))]
        if bad.size:  # (numpy would read -1 as the last class)
            raise ValueError(
                f"label {int(bad[0])} is not one of the data's {len(self.mapping)} named classes (0..."
                f"{len(self.mapping) - 1}): fix the labels, or drop unlabelled (-1) items"
            )
        return self.mapping[labels]

    def item(self, i: int) -> tuple[Any, Any]:
        image, label = self.source.item(i)
        if not 0 <= int(label) < len(self.mapping):
            raise ValueError(f"{self.describe(i)} has label {label}, not one of the data's named classes")
        return image, int(self.mapping[int(label)])

    def describe(self, i: int) -> str:
        return self.source.describe(i)


def _open_image(fp: Any) -> Image.Image:
    image = Image.open(fp)
    image.load()  # decode now: a truncated file must fail here, not later in a transform
    return image


def open_data(data: Any, image_column: str = "image", label_column: str = "label") -> Source:
    """Normalise training or evaluation data to a `Source`.

    Args:
        data: a `datasets.Dataset`, an image folder or `save_to_disk` folder (str or Path), a torch
            `Dataset` of `(image, label)`, or a `Source`.
        image_column: image column of a `datasets.Dataset`.
        label_column: integer label column of a `datasets.Dataset`.
    """
    import datasets

    if isinstance(data, Source):
        return data
    if isinstance(data, datasets.DatasetDict):
        raise ValueError(f"got a DatasetDict with splits {list(data)}; pass one split, e.g. data['train']")
    if isinstance(data, datasets.Dataset):
        return HFSource(data, image_column, label_column)
    if isinstance(data, (str, Path)):
        path = Path(data)
        if (path / "dataset_dict.json").is_file():
            splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
            raise ValueError(
                f"{path} holds the splits {splits} of a DatasetDict: pass one split's folder, e.g. "
                f"{path / (splits[0] if splits else 'train')}"
            )
        if (path / "dataset_info.json").is_file():
            return open_data(datasets.load_from_disk(str(path)), image_column, label_column)
        return FolderSource(path)
    if isinstance(data, Dataset):
        return TorchSource(data)
    hint = ""
    if isinstance(data, torch.utils.data.DataLoader):
        hint = " (for a DataLoader, pass loader.dataset: batching and augmentation are adapterkit's)"
    elif isinstance(data, (list, tuple)):
        hint = " (for a list of (image, label) pairs, torch.utils.data.TensorDataset(images, labels))"
    raise TypeError(
        f"cannot read training data of type {type(data).__name__}: pass a datasets.Dataset, an image folder "
        f"path, or a torch Dataset yielding (image, label){hint}"
    )


def split_folders(path: Path) -> dict[str, Path]:
    """The split subfolders of `path` by split (`train`, `test`, `val`), their names matched ignoring case
    (`Train/`, `training/`, `valid/`, ...); none unless every subfolder is a split (a class folder may be
    named `Train`)."""
    found: dict[str, Path] = {}
    folders = (
        sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
        if path.is_dir()
        else []
    )
    if not all(p.name.lower() in SPLITS for p in folders):
        return found
    for p in folders:
        split = SPLITS[p.name.lower()]
        if split in found:
            raise ValueError(f"{path} has two {split} splits, {found[split].name}/ and {p.name}/: keep one")
        found[split] = p
    return found


def open_splits(
    path: str | Path, image_column: str = "image", label_column: str = "label"
) -> dict[str, Source]:
    """Splits of a folder by split (`train`, `test`, `val`): split image folders (`split_folders`), a
    saved `DatasetDict`, or, for a folder with neither, the whole folder as `train`. Two names of one
    split (`valid/` and `validation/`, as folders or DatasetDict splits) are refused, naming both."""
    import datasets

    path, columns = Path(path), (image_column, label_column)
    if (path / "dataset_dict.json").is_file():
        found: dict[str, str] = {}
        splits = datasets.load_from_disk(str(path))
        for name in splits:
            split = SPLITS.get(name.lower(), name)
            if split in found:  # `valid` and `validation`: neither is the obvious one
                raise ValueError(
                    f"{path} is a DatasetDict with two {split} splits, {found[split]!r} and {name!r}: pass the "
                    f"one you mean as its own folder (e.g. --eval-data {path / name}, or eval_data="
                    f"'{path / name}' in Python), or save the DatasetDict without the other"
                )
            found[split] = name
        return {split: open_data(splits[name], *columns) for split, name in found.items()}
    folders = split_folders(path)
    if folders:
        return {s: open_data(p, *columns) for s, p in folders.items()}
    return {"train": open_data(path, *columns)}


def data_name(data: Any) -> str:
    """A folder's name (with its parent's when it is a split: `gtsrb/train`), never its whole path; else
    the data's type (what a domain's training record says of its data)."""
    root = Path(data).resolve() if isinstance(data, (str, Path)) else getattr(data, "root", None)
    if not isinstance(root, Path):
        return type(data).__name__
    return "/".join(root.parts[-2:]) if root.name.lower() in SPLITS else root.name


class DomainDataset(Dataset):
    """`(tensor, label)` pairs of a source. Keys are indices, or `(epoch, index)` for training, whose
    augmentation draws from `np.random.default_rng([seed, epoch, index])`."""

    def __init__(self, source: Source, preprocess: Preprocess, seed: int = 0) -> None:
        self.source, self.preprocess, self.seed = source, preprocess, seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        epoch, i = key if isinstance(key, tuple) else (None, key)
        rng = None if epoch is None else np.random.default_rng([self.seed, epoch, i])
        try:
            image, label = self.source.item(i)
            x = self.preprocess(image, rng)
        except (OSError, UnidentifiedImageError, ValueError, TypeError) as e:
            raise ValueError(
                f"{self.source.describe(i)} cannot be used: {e}. Remove or replace it; training stopped "
                "before saving anything of this run (a checkpoint written earlier can be resumed)"
            ) from e
        return x, int(label)


class EpochBatches(Sampler[list[tuple[int, int]]]):
    """This process's training batches of one epoch, as `(epoch, index)` keys.

    The epoch's order is `np.random.default_rng([seed, epoch]).permutation(n)`; global batch `b` of
    `batch_size * world_size` samples is split into one contiguous slice per rank, so the union over
    the ranks is the single-process batch of that size. Incomplete global batches are dropped.
    `start`/`stop` select micro-batches (used to resume in the middle of an epoch).
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        *,
        seed: int,
        epoch: int,
        rank: int = 0,
        world_size: int = 1,
        start: int = 0,
        stop: int | None = None,
    ) -> None:
        self.n, self.batch_size, self.seed, self.epoch = n, batch_size, seed, epoch
        self.rank, self.world_size = rank, world_size
        full = n // (batch_size * world_size)
        self.start, self.stop = start, full if stop is None else min(stop, full)

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        size = self.batch_size * self.world_size
        for b in range(self.start, self.stop):
            chunk = order[b * size : (b + 1) * size][
                self.rank * self.batch_size : (self.rank + 1) * self.batch_size
            ]
            yield [(self.epoch, int(i)) for i in chunk]
