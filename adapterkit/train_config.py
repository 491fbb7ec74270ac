"""`TrainConfig`, how one domain is trained, and the two rules computed from it: the learning-rate
schedule and the paper's weight decay by training-set size.

The first stage of the training data flow: `train_config` <- `loop` <- `train` (`adapterkit.train`
re-exports everything public here). Nothing here imports accelerate.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "AUTO_WEIGHT_DECAY",
    "GROUPS",
    "HEAD_LR_SCALE",
    "PARALLEL_LR_SCALE",
    "TrainConfig",
    "auto_weight_decay",
    "learning_rate",
]

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "constant")
PRECISIONS = ("no", "bf16", "fp16")
# Fields that do not change the trained numbers (a resumed run may change them).
_NOT_TRAJECTORY = {"eval_batch_size", "num_workers", "check_images", "checkpoint_every", "output_dir"}
_NOT_TRAJECTORY |= {"log_with", "log_every", "progress", "cpu", "image_column", "label_column", "threads"}
_NOT_TRAJECTORY |= {"channels_last", "grad_checkpointing"}  # like `threads`: float rounding at most

# The paper's weight decay by training-set size: (images below, decay); the last applies above all.
AUTO_WEIGHT_DECAY = ((10_000, 0.002), (100_000, 0.0005), (None, 0.0001))

# The parameter groups a training step optimises, each with its own lr scale and weight decay:
# `adapter` (a parallel-form adapter: parallel, low-rank, grouped), `series` (a series adapter),
# `norm` (the domain's or a fine-tuned model's norms), `head` (the classifier), `backbone` (every other
# weight of a fine-tuned model).
GROUPS = ("adapter", "series", "norm", "head", "backbone")
# `adapter_lr_scale="auto"`: a parallel adapter's input (the block input) carries ~0.28x the energy,
# relative to what the following BatchNorm divides by, of a series adapter's input, so at one lr it
# moves the normalised activations ~3.5x less (issue 12). Measured on GTSRB with the CIFAR ResNet-56
# (benchmarks/bench_recipe.py, docs/benchmarks.md): parallel x1 56.0 %, x2 61.2, x3.5 68.8, x5 69.2;
# series x1 67.8.
PARALLEL_LR_SCALE = 3.5
# A new domain's head starts from scratch: at 2x the lr, on the same GTSRB runs, parallel adapters reach
# 74.4 % (68.8 at 1x), series 74.4 (67.8), fine-tuning (backbone at 0.05) 81.6 (69.8).
HEAD_LR_SCALE = 2.0


@dataclass
class TrainConfig:
    """How one domain is trained. Give `epochs` or `steps` (optimizer steps); default 1 epoch.

    `batch_size` is per process: one optimizer step sees `batch_size * processes * grad_accum` images.
    `weight_decay="auto"` picks the paper's value by training-set size (see `auto_weight_decay`).
    Each parameter group (`GROUPS`) trains at `lr` times its scale, and the schedule scales every group:
    `adapter_lr_scale` for adapters (`"auto"`: `PARALLEL_LR_SCALE` for parallel-form adapters, 1 for
    series ones), `head_lr_scale` for the classifier (default 2), `backbone_lr_scale` for a fine-tuned model's
    other weights (the paper's fine-tuning baseline trains its backbone slower than its head).
    `weight_decay` (`"auto"`: the paper's value by training-set size) decays the adapters and a
    fine-tuned backbone; the norms and the head have their own, `norm_weight_decay` and
    `head_weight_decay`.
    `crop_padding`/`crop_scale`/`flip` set the augmentation (the paper's random crop + flip; set
    `flip=False` for glyphs, signs and digits). `grayscale="convert"` turns grey images into RGB when
    the backbone takes 3 channels; `"error"` refuses them. `checkpoint_every` (optimizer steps) writes
    a resumable checkpoint to `output_dir/checkpoints/<domain>/`. `threads` sets torch's CPU threads
    while training (`torch.set_num_threads`, restored afterwards; None keeps torch's setting).
    `channels_last` trains with the backbone's 4-D weights and the batches in channels-last memory
    (the same values; restored afterwards): `"auto"` does so for conv models on CPU, where oneDNN's convs
    and train-mode BatchNorm run faster on NHWC maps (1.19x a ResNet-26 step, docs/benchmarks.md).
    `grad_checkpointing` trains with the backbone's gradient checkpointing (timm's
    `set_grad_checkpointing`, restored afterwards): activations are recomputed in backward instead of
    kept, for less memory and a slower step; the trained numbers are the same (docs/training.md).
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
    adapter_lr_scale: float | str = "auto"
    head_lr_scale: float = HEAD_LR_SCALE
    backbone_lr_scale: float = 1.0
    norm_weight_decay: float = 0.0
    head_weight_decay: float = 0.0
    label_smoothing: float = 0.0
    max_grad_norm: float | None = None
    mixed_precision: str = "no"
    grad_accum: int = 1
    seed: int = 0
    num_workers: int = 0
    threads: int | None = None
    channels_last: bool | str = "auto"
    grad_checkpointing: bool = False
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
        choices["grayscale"], choices["channels_last"] = ("convert", "error"), ("auto", True, False)
        choices["grad_checkpointing"] = (True, False)
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
        scales = {k: getattr(self, k) for k in ("head_lr_scale", "backbone_lr_scale")}
        if self.adapter_lr_scale != "auto":
            scales["adapter_lr_scale"] = self.adapter_lr_scale
        for name, value in scales.items():
            if not (_number(value) and value > 0 and math.isfinite(value)):
                raise ValueError(f"{name}={value!r} must be a positive number" + _AUTO.get(name, ""))
        for name in ("norm_weight_decay", "head_weight_decay"):
            if not (_number(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name}={getattr(self, name)!r} must be a number >= 0")
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

    def group_lr_scale(self, group: str) -> float:
        """The factor on `lr` of parameter group `group` (one of `GROUPS`)."""
        if group == "adapter":
            return PARALLEL_LR_SCALE if self.adapter_lr_scale == "auto" else float(self.adapter_lr_scale)
        if group == "series":
            return 1.0 if self.adapter_lr_scale == "auto" else float(self.adapter_lr_scale)
        scales = {"norm": 1.0, "head": self.head_lr_scale, "backbone": self.backbone_lr_scale}
        return float(scales[group])

    def group_weight_decay(self, group: str, num_images: int) -> float:
        """The weight decay of parameter group `group` for a training set of `num_images`."""
        if group == "norm":
            return float(self.norm_weight_decay)
        if group == "head":
            return float(self.head_weight_decay)
        wd = self.weight_decay
        return auto_weight_decay(num_images) if wd == "auto" else float(wd)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def trajectory(self) -> dict[str, Any]:
        """The fields that change the trained numbers (a resumed run must keep them)."""
        return {k: v for k, v in self.to_dict().items() if k not in _NOT_TRAJECTORY}

    def record(self, metrics: dict[str, float], data: str, images: int, eval_images: int) -> dict[str, Any]:
        """How a domain was trained with this config, kept in its metadata (`"training"`) and so in its
        files: the settings that change its numbers, the data's name (not its path) and size, and where
        training ended."""
        from . import __version__

        loss = metrics.get("train_loss")
        return {
            "adapterkit": __version__,
            "config": self.trajectory(),
            "data": data,
            "train_images": images,
            "eval_images": eval_images,
            "steps": int(metrics["steps"]),
            "train_loss": loss if isinstance(loss, float) and math.isfinite(loss) else None,
        }


_AUTO = {"adapter_lr_scale": ", or 'auto' (by topology)"}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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


# What to install for a tracker accelerate cannot find (others: the tracker's own package).
TRACKER_INSTALL = {"tensorboard": 'pip install "adapterkit[track]"'}


def check_trackers(log_with: str | list[str] | None) -> None:
    """Refuse trackers whose package is missing before training (accelerate would log nothing)."""
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    names = [log_with] if isinstance(log_with, str) else [n for n in log_with or [] if isinstance(n, str)]
    available = {str(t) for t in get_available_trackers()}
    if "all" in names:
        names = [] if available else ["tensorboard"]
    unknown = [n for n in names if n not in LoggerType.list()]
    if unknown:
        raise ValueError(
            f"log_with={log_with!r}: {unknown[0]!r} is not a tracker; use one of {LoggerType.list()}"
        )
    missing = [n for n in names if n not in available]
    if missing:
        install = "; ".join(TRACKER_INSTALL.get(n, f"pip install {n}") for n in missing)
        raise ValueError(
            f"log_with={log_with!r} needs {', '.join(missing)}, which is not installed, so nothing would be "
            f"logged: {install} (or drop it from log_with)"
        )
