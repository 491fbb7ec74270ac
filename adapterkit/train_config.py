"""`TrainConfig`, how one domain is trained, and the two rules computed from it: the learning-rate
schedule and the paper's weight decay by training-set size.

The first stage of the training data flow: `train_config` <- `loop` <- `train` (`adapterkit.train`
re-exports everything public here). Nothing here imports accelerate.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["AUTO_WEIGHT_DECAY", "TrainConfig", "auto_weight_decay", "learning_rate"]

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "constant")
PRECISIONS = ("no", "bf16", "fp16")
# Fields that do not change the trained numbers (a resumed run may change them).
_NOT_TRAJECTORY = {"eval_batch_size", "num_workers", "check_images", "checkpoint_every", "output_dir"}
_NOT_TRAJECTORY |= {"log_with", "log_every", "progress", "cpu", "image_column", "label_column", "threads"}

# The paper's weight decay by training-set size: (images below, decay); the last applies above all.
AUTO_WEIGHT_DECAY = ((10_000, 0.002), (100_000, 0.0005), (None, 0.0001))


@dataclass
class TrainConfig:
    """How one domain is trained. Give `epochs` or `steps` (optimizer steps); default 1 epoch.

    `batch_size` is per process: one optimizer step sees `batch_size * processes * grad_accum` images.
    `weight_decay="auto"` picks the paper's value by training-set size (see `auto_weight_decay`).
    `crop_padding`/`crop_scale`/`flip` set the augmentation (the paper's random crop + flip; set
    `flip=False` for glyphs, signs and digits). `grayscale="convert"` turns grey images into RGB when
    the backbone takes 3 channels; `"error"` refuses them. `checkpoint_every` (optimizer steps) writes
    a resumable checkpoint to `output_dir/checkpoints/<domain>/`. `threads` sets torch's CPU threads
    while training (`torch.set_num_threads`, restored afterwards; None keeps torch's setting).
    """

    epochs: int | None = None
    steps: int | None = None
    batch_size: int = 32
    eval_batch_size: int | None = None
    lr: float = 0.1
    optimizer: str = "sgd"
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: str = "cosine"
    warmup_steps: int = 0
    milestones: tuple[float, ...] = (0.5, 0.75)
    gamma: float = 0.1
    weight_decay: float | str = "auto"
    label_smoothing: float = 0.0
    max_grad_norm: float | None = None
    mixed_precision: str = "no"
    grad_accum: int = 1
    seed: int = 0
    num_workers: int = 0
    threads: int | None = None
    flip: bool = True
    crop_padding: int | None = None
    crop_scale: tuple[float, float] | None = None
    grayscale: str = "convert"
    image_column: str = "image"
    label_column: str = "label"
    check_images: int | None = 1000
    checkpoint_every: int | None = None
    output_dir: str | None = None
    log_with: str | list[str] | None = None
    log_every: int = 10
    progress: bool = True
    cpu: bool = False

    def __post_init__(self) -> None:
        if self.epochs is not None and self.steps is not None:
            raise ValueError("give epochs or steps, not both")
        if self.epochs is None and self.steps is None:
            self.epochs = 1
        names = ("epochs", "steps", "batch_size", "grad_accum", "log_every", "threads")  # None: skipped
        positive = {k: getattr(self, k) for k in names}
        positive |= {k: getattr(self, k) for k in ("eval_batch_size", "checkpoint_every") if getattr(self, k)}
        for name, value in positive.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}={value!r} must be a positive int")
        choices = {"optimizer": OPTIMIZERS, "schedule": SCHEDULES, "mixed_precision": PRECISIONS}
        choices["grayscale"] = ("convert", "error")
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}: use one of {allowed}")
        self._check_numbers()
        if self.checkpoint_every and not self.output_dir:
            raise ValueError(
                "checkpoint_every needs output_dir (checkpoints go to output_dir/checkpoints/<domain>)"
            )
        if self.log_with and not self.output_dir:
            raise ValueError(
                f"log_with={self.log_with!r} needs output_dir (where the tracker writes its logs)"
            )

    def _check_numbers(self) -> None:
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr={self.lr!r} must be a positive number")
        wd = self.weight_decay
        if wd != "auto" and not (isinstance(wd, (int, float)) and not isinstance(wd, bool) and wd >= 0):
            raise ValueError(f"weight_decay={wd!r}: use a number >= 0 or 'auto' (by training-set size)")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing={self.label_smoothing!r} must be in [0, 1)")
        if self.warmup_steps < 0 or self.num_workers < 0 or (self.crop_padding or 0) < 0:
            raise ValueError("warmup_steps, num_workers and crop_padding must be >= 0")
        if self.crop_scale is not None:
            self.crop_scale = tuple(self.crop_scale)
            if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
                raise ValueError(f"crop_scale={self.crop_scale!r}: use (min, max) area fractions in (0, 1]")
        self.milestones, self.betas = tuple(self.milestones), tuple(self.betas)
        if any(not 0 < m < 1 for m in self.milestones):
            raise ValueError(f"milestones={self.milestones!r} are fractions of training in (0, 1)")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def trajectory(self) -> dict[str, Any]:
        """The fields that change the trained numbers (a resumed run must keep them)."""
        return {k: v for k, v in self.to_dict().items() if k not in _NOT_TRAJECTORY}


def auto_weight_decay(num_images: int) -> float:
    """The paper's weight decay for a training set of `num_images`: 0.002 below 10,000 images,
    0.0005 below 100,000, else 0.0001.

    Example:
        >>> auto_weight_decay(5_000), auto_weight_decay(50_000), auto_weight_decay(500_000)
        (0.002, 0.0005, 0.0001)
    """
    return next(wd for limit, wd in AUTO_WEIGHT_DECAY if limit is None or num_images < limit)


def learning_rate(config: TrainConfig, step: int, total: int) -> float:
    """The learning rate of optimizer step `step` (0-based) of `total`: linear warmup, then the schedule."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, total - config.warmup_steps)
    if config.schedule == "cosine":
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    if config.schedule == "step":
        return config.lr * config.gamma ** sum(progress >= m for m in config.milestones)
    return config.lr
