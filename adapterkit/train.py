"""Train one domain of an `AdapterModel` with Accelerate (the only module that imports accelerate).

A plain loop in the style of Accelerate's examples: `prepare`, `accumulate`, `backward`,
`gather_for_metrics`. The same code runs on CPU, one GPU and several processes (`torchrun`,
`accelerate launch`); `batch_size` is per process. Only the active domain's tensors are given to the
optimizer, so only they get gradients and weight decay; the shared backbone (its BatchNorm statistics
included) is never written. See docs/training.md.

Example:
    >>> model = AdapterModel.from_backbone("cifar_resnet56", pretrained="resnet56.safetensors")
    >>> train_domain(model, "gtsrb", train_ds, test_ds, TrainConfig(epochs=10, flip=False))
    {'accuracy': 0.97, 'train_loss': 0.08, ...}
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .config import check_domain_name
from .data import DomainDataset, Source, check_data, open_data
from .loop import AUTO_WEIGHT_DECAY, Job, auto_weight_decay, evaluate_dataset, fit, learning_rate
from .model import AdapterModel
from .transforms import Preprocess, resolve_data_config

__all__ = [
    "AUTO_WEIGHT_DECAY",
    "TrainConfig",
    "auto_weight_decay",
    "evaluate",
    "learning_rate",
    "make_accelerator",
    "train_domain",
    "train_model",
]

logger = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "constant")
PRECISIONS = ("no", "bf16", "fp16")
# Fields that do not change the trained numbers (a resumed run may change them).
_NOT_TRAJECTORY = {"eval_batch_size", "num_workers", "check_images", "checkpoint_every", "output_dir"}
_NOT_TRAJECTORY |= {"log_with", "log_every", "progress", "cpu", "image_column", "label_column"}


@dataclass
class TrainConfig:
    """How one domain is trained. Give `epochs` or `steps` (optimizer steps); default 1 epoch.

    `batch_size` is per process: one optimizer step sees `batch_size * processes * grad_accum` images.
    `weight_decay="auto"` picks the paper's value by training-set size (see `auto_weight_decay`).
    `crop_padding`/`crop_scale`/`flip` set the augmentation (the paper's random crop + flip; set
    `flip=False` for glyphs, signs and digits). `grayscale="convert"` turns grey images into RGB when
    the backbone takes 3 channels; `"error"` refuses them. `checkpoint_every` (optimizer steps) writes
    a resumable checkpoint to `output_dir/checkpoints/<domain>/`.
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
        positive = {k: getattr(self, k) for k in ("epochs", "steps", "batch_size", "grad_accum", "log_every")}
        positive |= {k: getattr(self, k) for k in ("eval_batch_size", "checkpoint_every") if getattr(self, k)}
        for name, value in positive.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}={value!r} must be a positive int")
        choices = {"optimizer": OPTIMIZERS, "schedule": SCHEDULES, "mixed_precision": PRECISIONS}
        choices["grayscale"] = ("convert", "error")
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}: use one of {allowed}")
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
        if self.checkpoint_every and not self.output_dir:
            raise ValueError(
                "checkpoint_every needs output_dir (checkpoints go to output_dir/checkpoints/<domain>)"
            )
        if self.log_with and not self.output_dir:
            raise ValueError(
                f"log_with={self.log_with!r} needs output_dir (where the tracker writes its logs)"
            )

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def trajectory(self) -> dict[str, Any]:
        """The fields that change the trained numbers (a resumed run must keep them)."""
        return {k: v for k, v in self.to_dict().items() if k not in _NOT_TRAJECTORY}


# ---------------------------------------------------------------------- public entry points
def train_domain(
    model: AdapterModel,
    domain: str,
    train_data: Any,
    eval_data: Any = None,
    config: TrainConfig | None = None,
    *,
    num_classes: int | None = None,
    labels: list[str] | None = None,
    data_config: dict[str, Any] | None = None,
    accelerator: Accelerator | None = None,
    resume: bool | str | Path = False,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, float]:
    """Train one domain (adding it first if the model does not have it) and evaluate it.

    The data are checked before anything is trained, added or written (labels, emptiness, a sample of
    images; see `check_data`). The domain's data config (the backbone's timm config with
    `data_config` overrides) is stored with the domain; its accuracy goes into `domain_info().metrics`.

    Args:
        train_data: a `datasets.Dataset`, an image folder, a `save_to_disk` folder or a torch Dataset
            of (image, label).
        eval_data: the same kinds; evaluated once at the end.
        num_classes: for a new domain (default: the data's class names, else the largest label + 1).
        labels: class names for a new domain (default: the data's, if any).
        data_config: per-domain overrides of timm's data config (`input_size`, `mean`, `std`, ...).
        accelerator: an existing `Accelerator` (its mixed precision must match the config's).
        resume: continue from `output_dir/checkpoints/<domain>` if it exists (True) or from this folder.
        callback: called after every optimizer step with {"step", "epoch", "loss", "lr"}.

    Returns:
        `steps`, `epochs`, `train_loss` (mean over the last epoch), `weight_decay`, `seconds`, and
        `accuracy` when `eval_data` is given.
    """
    config = config or TrainConfig()
    acc = make_accelerator(config, accelerator)
    exists = domain in model.domains
    stored: dict[str, Any] = {}
    if exists:
        info = model.domain_info(domain)
        if num_classes not in (None, info.num_classes):
            raise ValueError(
                f"domain {domain!r} has {info.num_classes} classes, not num_classes={num_classes}"
            )
        num_classes, stored = info.num_classes, info.data_config or {}
    else:
        check_domain_name(domain)
    source = open_data(train_data, config.image_column, config.label_column)
    if num_classes is None:
        num_classes = (
            len(source.class_names) if source.class_names else int(source.labels().max(initial=-1)) + 1
        )
    dcfg = resolve_data_config(model.pretrained_cfg, {**stored, **(data_config or {})})
    train_set, eval_set = _datasets(source, eval_data, num_classes, dcfg, config, acc.num_processes)
    torch.manual_seed(config.seed)  # the new head's initialisation
    if not exists:
        names = labels or (source.class_names if len(source.class_names or ()) == num_classes else None)
        model.add_domain(domain, num_classes, labels=names, data_config=dcfg)
    model.domain_info(domain).data_config = dcfg
    norms = [layer.adapters[domain] for layer in model.layers().values() if layer.rule == "norm"]
    job = Job(
        domain,
        model,
        model.trainable_parameters(domain),
        lambda m, x: m(x, domain=domain),
        lambda: model.domain_state_dict(domain),
        [m for m in norms if isinstance(m, _BatchNorm)],
    )
    metrics = fit(job, train_set, eval_set, config, acc, resume, callback)
    if "accuracy" in metrics:
        model.domain_info(domain).metrics["accuracy"] = metrics["accuracy"]
    return metrics


def train_model(
    model: nn.Module,
    train_data: Any,
    eval_data: Any = None,
    config: TrainConfig | None = None,
    *,
    name: str = "model",
    data_config: dict[str, Any] | None = None,
    accelerator: Accelerator | None = None,
    resume: bool | str | Path = False,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, float]:
    """Fine-tune every parameter of a plain timm classifier (the paper's full fine-tuning baseline).

    Same loop, data checks and checkpoints as `train_domain`; the model's head must already have the
    domain's number of classes (`model.reset_classifier(n)`); its BatchNorm statistics are trained.
    """
    config = config or TrainConfig()
    acc = make_accelerator(config, accelerator)
    num_classes = _num_classes(model)
    source = open_data(train_data, config.image_column, config.label_column)
    dcfg = resolve_data_config(getattr(model, "pretrained_cfg", {}), data_config)
    train_set, eval_set = _datasets(source, eval_data, num_classes, dcfg, config, acc.num_processes)
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    params = [p for p in model.parameters()]
    job = Job(name, model, params, lambda m, x: m(x), model.state_dict, norms)
    return fit(job, train_set, eval_set, config, acc, resume, callback)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: Any,
    domain: str | None = None,
    *,
    config: TrainConfig | None = None,
    data_config: dict[str, Any] | None = None,
    accelerator: Accelerator | None = None,
    desc: str | None = None,
) -> float:
    """Top-1 accuracy of an `AdapterModel` domain (or a plain classifier) on `data`, over all processes.

    Preprocessing is the domain's stored data config (eval transform: resize, centre crop, normalise).
    Uses `config`'s `eval_batch_size`, `num_workers`, column names and `grayscale` policy.
    """
    config = config or TrainConfig(progress=False)
    acc = accelerator or make_accelerator(config, None, eval_only=True)
    if isinstance(model, AdapterModel):
        domain = domain or model.default_domain or (model.domains[0] if len(model.domains) == 1 else None)
        if domain is None:
            raise ValueError(f"the model has domains {model.domains}; pass domain=")
        info = model.domain_info(domain)
        num_classes, stored = info.num_classes, info.data_config or {}

        def forward(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
            return m(x, domain=domain)
    else:
        num_classes, stored = _num_classes(model), {}

        def forward(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
            return m(x)

    dcfg = resolve_data_config(model.pretrained_cfg, {**stored, **(data_config or {})})
    source = open_data(data, config.image_column, config.label_column)
    pre = Preprocess(dcfg, grayscale=config.grayscale)
    check_data(source, num_classes, pre, check_images=0, what="evaluation data")
    return evaluate_dataset(model, forward, DomainDataset(source, pre), config, acc, desc or domain)


def make_accelerator(
    config: TrainConfig, accelerator: Accelerator | None = None, eval_only: bool = False
) -> Accelerator:
    """`accelerator` checked against `config`, or a new `Accelerator` for it (CPU when no GPU exists,
    so that `torchrun` on CPU machines uses gloo)."""
    if accelerator is not None:
        if accelerator.mixed_precision != config.mixed_precision:
            raise ValueError(
                f"TrainConfig(mixed_precision={config.mixed_precision!r}) but the accelerator uses "
                f"{accelerator.mixed_precision!r}: create the Accelerator with the same mixed_precision"
            )
        accelerator.gradient_accumulation_steps = config.grad_accum
        return accelerator
    has_device = getattr(torch, "accelerator", None) is not None and torch.accelerator.is_available()
    kwargs: dict[str, Any] = {"cpu": config.cpu or not has_device}
    if not eval_only:
        kwargs |= dict(mixed_precision=config.mixed_precision, gradient_accumulation_steps=config.grad_accum)
        kwargs |= dict(log_with=config.log_with, project_dir=config.output_dir)
    try:
        accelerator = Accelerator(**kwargs)
    except ValueError as e:
        if "already been initialized" not in str(e):
            raise
        raise ValueError(
            "accelerate allows one mixed-precision setting per process and another one is already in use: "
            "create one Accelerator and pass it as accelerator= to every call (with matching mixed_precision)"
        ) from e
    if config.mixed_precision == "fp16" and accelerator.device.type == "cpu" and not eval_only:
        logger.warning(
            "mixed_precision='fp16' has no effect on CPU (accelerate runs float32 there); use 'bf16'"
        )
    return accelerator


# ---------------------------------------------------------------------- helpers
def _num_classes(model: nn.Module) -> int:
    n = getattr(model, "num_classes", None)
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"{type(model).__name__} has no classifier: reset_classifier(num_classes) first")
    return n


def _datasets(
    source: Source, eval_data: Any, num_classes: int, dcfg: dict, config: TrainConfig, world: int
) -> tuple[DomainDataset, DomainDataset | None]:
    """Check both splits and wrap them; raises before anything is trained or written."""
    pre = Preprocess(dcfg, True, config.flip, config.crop_padding, config.crop_scale, config.grayscale)
    check_data(source, num_classes, pre, check_images=config.check_images, what="training data")
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
        eval_pre = replace(pre, train=False)
        check_data(
            eval_source, num_classes, eval_pre, check_images=config.check_images, what="evaluation data"
        )
        eval_set = DomainDataset(eval_source, eval_pre)
    return DomainDataset(source, pre, seed=config.seed), eval_set
