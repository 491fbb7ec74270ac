"""Checks of training and evaluation data before anything is trained or written: every label, a sample of
the images (decoded as training will), and enough images for one optimizer step. Each failure names the
item and the fix (docs/training.md, "Checks before training")."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
from PIL import UnidentifiedImageError

from .data import DomainDataset, Relabeled, Source, open_data
from .train_config import TrainConfig
from .transforms import GRAYSCALE_MODES, ImageFormatError, Preprocess, to_pil

logger = logging.getLogger(__name__)

SHOW_FAILURES = 20  # undecodable images named in one error (all are counted)


def align_labels(source: Source, labels: Sequence[str] | None, what: str = "data") -> Source:
    """`source` with its classes matched by name to a domain's `labels`, when both have names: a test
    folder without one class, or with its classes in another order, keeps every image's true class (by
    position, each label after a missing class would shift). Classes the domain does not have are refused.
    """
    names = source.class_names
    if not labels or not names or list(names) == list(labels):
        return source
    if len(names) == len(labels) and not set(names) & set(labels):  # labels= named the data's classes
        logger.info("%s: classes %s read as the domain's %s, by position", what, names[:3], list(labels)[:3])
        return source
    unknown = [c for c in names if c not in labels]
    if unknown:
        fix = (  # the training data of a resumed domain, or evaluation data
            "name the class folders as the domain's classes, or train a fresh domain in its place "
            "(overwrite=True; CLI: --overwrite) or under another name"
            if what == "training data"
            else "name the class folders as the training data did, or evaluate the domain its data belongs to"
        )
        raise ValueError(
            f"{what}: classes {unknown[:10]} are not classes of the domain ({list(labels)[:10]}"
            f"{' ...' if len(labels) > 10 else ''}): {fix}"
        )
    missing = [c for c in labels if c not in names]
    if missing:
        logger.info("%s has no images of %d of the domain's classes (%s ...)", what, len(missing), missing[0])
    return Relabeled(source, [list(labels).index(c) for c in names], list(labels))


def training_source(
    train_data: Any, config: TrainConfig, num_classes: int | None, labels: Sequence[str] | None = None
) -> tuple[Source, int]:
    """The training data, its classes matched by name to `labels` (those of the domain training continues;
    none for a new domain, see `align_labels`), and its number of classes: `num_classes` if given, else
    its class names', else its largest label + 1."""
    source = open_data(train_data, config.image_column, config.label_column)
    source = align_labels(source, labels, "training data")
    if num_classes is None:
        num_classes = (
            len(source.class_names)
            if source.class_names
            else int(read_labels(source, "training data").max(initial=-1)) + 1
        )
    return source, num_classes


def check_data(
    source: Source,
    num_classes: int,
    preprocess: Preprocess,
    *,
    check_images: int | None = 1000,
    what: str = "data",
    min_classes: int = 1,
) -> np.ndarray:
    """Check every label and (a sample of) the images before anything is trained or written.

    Args:
        check_images: decode all images when there are at most this many, else a fixed random sample of
            this many (None: all). An image outside the sample that fails later stops training with
            the same error.
        min_classes: how many distinct labels the data must have (2 for training data: one class
            trains nothing).

    Returns:
        The labels.

    Raises:
        ValueError: an empty dataset, a label outside `0..num_classes-1` or not an integer, fewer than
            `min_classes` classes, images that cannot be decoded (up to `SHOW_FAILURES` of them named,
            and their count), or a grey image where RGB is required; the message says how to fix it.
    """
    n = len(source)
    if n == 0:
        raise ValueError(f"the {what} is empty: point it at a folder or dataset with images")
    labels = read_labels(source, what)
    if labels.min(initial=0) < 0:
        i = int(np.argmin(labels))
        raise ValueError(
            f"{source.describe(i)} of the {what} has label {int(labels[i])}: class indices start at 0; "
            "fix the labels (or drop the unlabelled images)"
        )
    bad = np.flatnonzero(labels >= num_classes)
    if len(bad):
        i = int(bad[0])
        raise ValueError(
            f"{len(bad)} label(s) of the {what} are outside 0..{num_classes - 1}: {source.describe(i)} has label "
            f"{int(labels[i])}. Fix the labels, or add the domain with num_classes={int(labels.max()) + 1}"
        )
    _check_classes(source, labels, min_classes, what, num_classes)
    if check_images is None or n <= check_images:
        sample = range(n)
    else:
        sample = np.sort(np.random.default_rng(0).choice(n, size=check_images, replace=False))
    converted, failed = 0, []
    for i in map(int, sample):
        try:
            image = to_pil(source.item(i)[0])
        except (OSError, UnidentifiedImageError, ValueError, TypeError) as e:
            failed.append((i, e))
            continue
        converted += image.mode in GRAYSCALE_MODES
        preprocess.mode(image, f"{source.describe(i)} of the {what}")
    if failed and isinstance(failed[0][1], ImageFormatError):  # one form for all: the first one says it
        i, e = failed[0]
        raise ImageFormatError(f"{source.describe(i)} of the {what}: {e}") from None
    if failed:
        raise ValueError(_undecodable(source, failed, what, len(sample), n)) from failed[0][1]
    if converted and preprocess.data_config["input_size"][0] == 3:
        logger.info("%s: %d checked grey images are converted to RGB (3 equal channels)", what, converted)
    return labels


def read_labels(source: Source, what: str = "data") -> np.ndarray:
    """Every label of `source`, checked to be one integer class index per item."""
    labels = source.labels()
    if labels.ndim != 1:
        raise ValueError(
            f"the {what}'s labels have shape {tuple(labels.shape[1:])} per item, not one class index: pass "
            "class indices 0..C-1 (for one-hot labels, label.argmax())"
        )
    if labels.dtype.kind in "USO":
        raise ValueError(
            f"the {what}'s labels are {labels[:1].tolist()[0]!r}-like names, not class indices: map them to "
            "0..C-1 and pass the names as labels= (an image folder's subfolders do this; for a "
            "datasets.Dataset, ds.class_encode_column('label'))"
        )
    if labels.dtype.kind not in "iu":
        raise ValueError(f"the {what}'s labels are {labels.dtype}, not integers: map class names to 0..C-1")
    return labels


def _check_classes(source: Source, labels: np.ndarray, min_classes: int, what: str, num_classes: int) -> None:
    present = np.unique(labels)
    if len(present) >= min_classes:
        absent = sorted(set(range(num_classes)) - set(present.tolist()))
        if absent and min_classes > 1:  # training data
            logger.warning(
                "%s: class(es) %s of 0..%d have no images%s",
                what,
                absent[:5] + (["..."] if len(absent) > 5 else []),
                num_classes - 1,
                " (labels counted from 1? class indices start at 0)" if absent[0] == 0 else "",
            )
        return
    names = source.class_names
    found = ", ".join(repr(names[c]) if names and c < len(names) else str(c) for c in present)
    raise ValueError(
        f"the {what} has images of {len(present)} class ({found}); a classifier needs at least "
        f"{min_classes}: add images of the other classes (an image folder needs one subfolder per class, "
        "root/<class>/<image>)"
    )


def _undecodable(source: Source, failed: list[tuple[int, Exception]], what: str, checked: int, n: int) -> str:
    """One line per image that cannot be decoded, the first `SHOW_FAILURES` of them, and their count."""
    if len(failed) == 1:
        i, e = failed[0]
        return f"{source.describe(i)} of the {what} cannot be decoded ({e}); remove or replace it"
    scope = f"of the {checked} checked (check_images=None checks all {n}) " if checked < n else ""
    lines = [f"    {source.describe(i)}: {e}" for i, e in failed[:SHOW_FAILURES]]
    if len(failed) > SHOW_FAILURES:
        lines.append(f"    ... and {len(failed) - SHOW_FAILURES} more")
    head = f"{len(failed)} images {scope}of the {what} cannot be decoded; remove or replace them:"
    return "\n".join([head, *lines])


def checked_datasets(
    source: Source, eval_data: Any, num_classes: int, dcfg: dict, config: TrainConfig, world: int
) -> tuple[DomainDataset, DomainDataset | None]:
    """The training data (and evaluation data, if any) checked (`check_data`, and one optimizer step's
    worth of images for `world` processes) and wrapped; raises before anything is trained or written."""
    pre = Preprocess(dcfg, True, config.flip, config.crop_padding, config.crop_scale, config.grayscale)
    check_data(
        source, num_classes, pre, check_images=config.check_images, what="training data", min_classes=2
    )
    per_step = config.batch_size * world * config.grad_accum
    if len(source) < per_step:
        raise ValueError(
            f"the training data has {len(source)} images, fewer than one optimizer step needs "
            f"({config.batch_size} per batch x {world} processes x {config.grad_accum} accumulation): "
            "lower batch_size or grad_accum"
        )
    eval_set = None
    if eval_data is not None:
        eval_source = open_data(eval_data, config.image_column, config.label_column)
        eval_source = align_labels(eval_source, source.class_names, "evaluation data")
        eval_pre = replace(pre, train=False)
        check_data(
            eval_source, num_classes, eval_pre, check_images=config.check_images, what="evaluation data"
        )
        eval_set = DomainDataset(eval_source, eval_pre)
    return DomainDataset(source, pre, seed=config.seed), eval_set
