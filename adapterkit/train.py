"""Train one domain of an `AdapterModel` with Accelerate (the only module that builds an Accelerator).

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, Subset

from .config import check_domain_name
from .data import DomainDataset, Source, data_name, open_data
from .data_checks import align_labels, check_data, checked_datasets, training_source
from .loop import Job, checkpoint_folder, evaluate_dataset, fit
from .model import AdapterModel
from .signature import MAX_IMAGES
from .train_config import AUTO_WEIGHT_DECAY, TrainConfig, auto_weight_decay, check_trackers, learning_rate
from .train_env import check_grad_checkpointing, seeded, threads
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


# ---------------------------------------------------------------------- public entry points
# Over 60 lines with its docstring (the full public contract); the steps it runs are named functions.
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
    overwrite: bool = False,
    callback: Callable[[dict[str, Any]], None] | None = None,
    factored: bool = False,
    new_columns: int | float | None = None,
) -> dict[str, float]:
    """Train one domain (adding it first if the model does not have it) and evaluate it.

    The data are checked before anything is trained, added or written (labels, at least 2 classes,
    a sample of images; see `check_data`). The domain's data config (the backbone's timm config with
    `data_config` overrides) is stored with the domain; its accuracy goes into `domain_info().metrics`.
    A new domain's head is initialised from `config.seed`; the caller's RNG state is never changed.
    The trained domain is returned frozen, as a loaded one (its tensors, norm statistics included, never
    change until `model.set_trainable(domain)`); if training fails, the domain is left as it was before
    (absent if it was new), so a retry starts clean.

    Args:
        train_data: a `datasets.Dataset`, an image folder, a `save_to_disk` folder or a torch Dataset
            of (image, label).
        eval_data: the same kinds; evaluated once at the end, and the domain's unknown decision (routing)
            is calibrated on it.
        num_classes: for a new domain (default: the data's class names, else the largest label + 1).
        labels: class names for a new domain (default: the data's, if any).
        data_config: per-domain overrides of timm's data config (`input_size`, `mean`, `std`, ...).
        accelerator: an existing `Accelerator` (its mixed precision must match the config's). Training
            calls its `free_memory()` before and after, as accelerate advises between trainings: it
            then no longer tracks what you prepared on it yourself.
        resume: continue from the checkpoint in `output_dir/checkpoints/<domain>` if there is one
            (True) or in this folder; when the model already has `domain`, resuming is required to
            train it again: it continues from its current tensors unless a checkpoint is found.
        overwrite: when the model already has `domain`, replace it with a fresh one (new head, new
            adapters; the classes come from the data or `num_classes`).
        callback: called after every optimizer step with {"step", "epoch", "loss", "lr"}.
        factored: train a new domain in factored form: every dense adapter reads the shared basis
            (frozen) through its own trained `gamma`, plus `new_columns` trained columns of its own per
            layer (see `AdapterModel.add_domain`); old domains are untouched. Share its columns
            afterwards with `adapterkit.compress.append_domain(model, domain)` (exact).
        new_columns: own columns per layer of a factored domain: an int or a share of C (default: the
            config's rank), capped by the rank the layer can take.

    Returns:
        `steps`, `epochs`, `train_loss` (mean over the last epoch), `weight_decay`, `seconds`, and
        `accuracy` when `eval_data` is given.

    Raises:
        ValueError: the model has `domain` and neither `resume` nor `overwrite` is given, the data
            fail their checks, or the checkpoint was written with other settings.
    """
    config = config or TrainConfig()
    if not isinstance(config, TrainConfig):
        raise TypeError(
            f"config is a {type(config).__name__}: pass TrainConfig(...) (TrainConfig(**d) from a dict)"
        )
    if resume is not False and overwrite:
        raise ValueError("overwrite=True trains the domain afresh and resume= continues it: pass one of them")
    if new_columns is not None and not factored:
        raise ValueError("new_columns= sizes a factored domain's own columns: pass factored=True with it")
    continuing = domain in model.domains and not overwrite
    if (factored or new_columns is not None) and continuing:
        raise ValueError(
            f"factored=/new_columns= shape a new domain, and the model already has {domain!r}: pass "
            "overwrite=True to train a fresh factored one in its place, or drop them to continue training it"
        )
    acc = make_accelerator(config, accelerator)
    check_grad_checkpointing(model.backbone, config.grad_checkpointing)  # before the data are read
    if continuing and resume is False:
        raise ValueError(
            f"the model already has domain {domain!r}: pass resume=True to continue training it, "
            "overwrite=True to train a fresh one in its place, or pick another name"
        )
    stored: dict[str, Any] = {}
    if continuing:
        num_classes, stored, resume = _continued_domain(model, domain, num_classes, config, resume)
    else:
        check_domain_name(domain)
        checkpoint_folder(config, domain, resume)  # resume=True without output_dir fails before any change
    labels_to_match = model.domain_info(domain).labels if continuing else None
    source, num_classes = training_source(train_data, config, num_classes, labels_to_match)
    dcfg = resolve_data_config(model.pretrained_cfg, {**stored, **(data_config or {})})
    train_set, eval_set = checked_datasets(source, eval_data, num_classes, dcfg, config, acc.num_processes)
    with model.rollback(domain):  # an error from here on leaves the domain as it was (or absent)
        if not continuing:
            names = labels or (source.class_names if len(source.class_names or ()) == num_classes else None)
            _add_fresh(model, domain, num_classes, names, dcfg, config.seed, factored, new_columns)
        model.domain_info(domain).data_config = dcfg
        model.set_trainable(domain)  # learns only while it is being trained
        metrics = fit(_domain_job(model, domain), train_set, eval_set, config, acc, resume, callback)
        model.set_trainable(domain, False)
        _fit_signature(model, domain, source, dcfg, config, acc, eval_set)
        info = model.domain_info(domain)
        info.metrics.pop("accuracy", None)  # an accuracy of earlier training no longer holds
        if "accuracy" in metrics:
            info.metrics["accuracy"] = metrics["accuracy"]
        eval_images = len(eval_set) if eval_set is not None else 0
        info.metadata["training"] = config.record(metrics, data_name(train_data), len(train_set), eval_images)
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
    The data config it trained with and the data's class names become the model's `pretrained_cfg` (timm's
    fields: `input_size`, `mean`, ..., `label_names`), which `evaluate` (and timm) read later.
    """
    config = config or TrainConfig()
    acc = make_accelerator(config, accelerator)
    check_grad_checkpointing(model, config.grad_checkpointing)  # before the data are read
    num_classes = _num_classes(model)
    source = open_data(train_data, config.image_column, config.label_column)
    dcfg = resolve_data_config(getattr(model, "pretrained_cfg", {}), data_config)
    train_set, eval_set = checked_datasets(source, eval_data, num_classes, dcfg, config, acc.num_processes)
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    stateful = [m for m in model.modules() if next(m.buffers(recurse=False), None) is not None]
    params = list(model.parameters())
    job = Job(name, model, params, lambda m, x: m(x), model.state_dict, norms, stateful=stateful)
    metrics = fit(job, train_set, eval_set, config, acc, resume, callback)
    _remember_training(model, dcfg, source.class_names)
    return metrics


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
    Classes are matched by name to the domain's labels (a plain model's `pretrained_cfg["label_names"]`).
    Uses `config`'s `eval_batch_size`, `num_workers`, column names and `grayscale` policy.
    """
    config = config or TrainConfig(progress=False)
    acc = accelerator or make_accelerator(config, None, eval_only=True)
    if isinstance(model, AdapterModel):
        domain = domain or model.default_domain or (model.domains[0] if len(model.domains) == 1 else None)
        if domain is None:
            raise ValueError(f"the model has domains {model.domains}; pass domain=")
        info = model.domain_info(domain)
        num_classes, stored, labels = info.num_classes, info.data_config or {}, info.labels

        def forward(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
            return m(x, domain=domain)
    else:
        num_classes, stored, labels = _num_classes(model), {}, _label_names(model)

        def forward(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
            return m(x)

    dcfg = resolve_data_config(model.pretrained_cfg, {**stored, **(data_config or {})})
    source = align_labels(
        open_data(data, config.image_column, config.label_column), labels, "evaluation data"
    )
    pre = Preprocess(dcfg, grayscale=config.grayscale)
    check_data(source, num_classes, pre, check_images=0, what="evaluation data")
    return evaluate_dataset(model, forward, DomainDataset(source, pre), config, acc, desc or domain)


def make_accelerator(
    config: TrainConfig, accelerator: Accelerator | None = None, eval_only: bool = False
) -> Accelerator:
    """`accelerator` checked against `config`, or a new `Accelerator` for it (CPU when no GPU exists,
    so that `torchrun` on CPU machines uses gloo)."""
    if not eval_only:
        check_trackers(config.log_with)
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
def _continued_domain(
    model: AdapterModel, domain: str, num_classes: int | None, config: TrainConfig, resume: bool | str | Path
) -> tuple[int, dict[str, Any], bool | str | Path]:
    """The continued domain's classes and stored data config, and `resume` (False: no checkpoint to look for)."""
    info = model.domain_info(domain)
    if num_classes not in (None, info.num_classes):
        raise ValueError(
            f"domain {domain!r} has {info.num_classes} classes, not num_classes={num_classes}: "
            "pass overwrite=True to replace it with a fresh domain of that size"
        )
    num_classes, stored = info.num_classes, info.data_config or {}
    if resume is True and not config.output_dir:
        resume = False  # no checkpoint to look for: continue from the domain's tensors
    return num_classes, stored, resume


def _fit_signature(
    model: AdapterModel,
    domain: str,
    source: Source,
    dcfg: dict,
    config: TrainConfig,
    acc: Accelerator,
    eval_set: DomainDataset | None,
) -> None:
    """The domain's routing signature from its training images, preprocessed as for evaluation, its unknown
    decision calibrated on the evaluation images when there are some (see signature.py); every process
    computes the same one."""
    dataset = DomainDataset(source, Preprocess(dcfg, grayscale=config.grayscale))
    batch = config.eval_batch_size or 2 * config.batch_size

    def images(data: DomainDataset):  # a seeded sample when there are more (not the first classes only)
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(config.seed))
        subset = Subset(
            data, sorted(order[:MAX_IMAGES].tolist()) if len(data) > MAX_IMAGES else range(len(data))
        )
        loader = DataLoader(
            subset, batch_size=batch, num_workers=config.num_workers, generator=torch.Generator()
        )
        return (x.to(acc.device) for x, _ in loader)

    with threads(config.threads):
        held = None if eval_set is None else images(eval_set)
        model.fit_signature(domain, images(dataset), calibration=held)


def _add_fresh(
    model: AdapterModel,
    domain: str,
    num_classes: int,
    labels: list[str] | None,
    dcfg: dict,
    seed: int,
    factored: bool = False,
    new_columns: int | float | None = None,
) -> None:
    """Add `domain` (replacing one of that name), its head and factors initialised from `seed` on a
    private RNG."""
    was_default = model.default_domain == domain
    if domain in model.domains:
        model.remove_domain(domain)
    device = next(model.parameters()).device
    with seeded(seed, device):
        model.add_domain(
            domain, num_classes, labels=labels, data_config=dcfg, factored=factored, new_columns=new_columns
        )
    if was_default:
        model.set_domain(domain)


def _domain_job(model: AdapterModel, domain: str) -> Job:
    norms = [layer.adapters[domain] for layer in model.layers().values() if layer.rule == "norm"]
    params = model.trainable_parameters(domain)
    return Job(
        domain,
        model,
        params,
        lambda m, x: m(x, domain=domain),
        lambda: model.domain_state_dict(domain),
        [m for m in norms if isinstance(m, _BatchNorm)],
        _domain_groups(model, domain, params),
        backbone=model.backbone,
        backward=lambda: model.router.hold(domain),  # a recomputed forward runs the domain too
        stateful=norms,
    )


def _domain_groups(model: AdapterModel, domain: str, params: list[nn.Parameter]) -> dict[str, list]:
    """`params` by parameter group: the head, the domain's norms, series adapters, and every other
    trained tensor as a parallel-form adapter (parallel, low-rank, grouped)."""
    group_of = {id(p): "head" for p in model.heads[domain].parameters()}
    for layer in model.layers().values():
        group = {"norm": "norm", "series": "series"}.get(layer.rule, "adapter")
        group_of |= {id(p): group for p in layer.adapters[domain].parameters()}
    groups: dict[str, list] = {}
    for p in params:
        groups.setdefault(group_of.get(id(p), "adapter"), []).append(p)
    return groups


def _remember_training(model: nn.Module, dcfg: dict[str, Any], class_names: list[str] | None) -> None:
    """A fine-tuned plain model's preprocessing and classes, in timm's fields of its `pretrained_cfg` (in
    place: timm's `default_cfg` is the same dict), replacing the pretrained ones."""
    if not isinstance(getattr(model, "pretrained_cfg", None), dict):
        model.pretrained_cfg = {}
    model.pretrained_cfg.update({k: tuple(v) if isinstance(v, list) else v for k, v in dcfg.items()})
    model.pretrained_cfg.pop("label_names", None)
    if class_names:
        model.pretrained_cfg["label_names"] = list(class_names)


def _label_names(model: nn.Module) -> list[str] | None:
    """A plain classifier's class names (`pretrained_cfg["label_names"]`) if one per output."""
    names = (getattr(model, "pretrained_cfg", None) or {}).get("label_names")
    return list(names) if isinstance(names, (list, tuple)) and len(names) == _num_classes(model) else None


def _num_classes(model: nn.Module) -> int:
    n = getattr(model, "num_classes", None)
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"{type(model).__name__} has no classifier: reset_classifier(num_classes) first")
    return n
