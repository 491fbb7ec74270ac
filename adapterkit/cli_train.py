"""`adapterkit train`: one domain from an image folder into a family (created by its first domain).

A new family takes `--backbone NAME` and timm's pretrained weights, or `--pretrained FILE.safetensors`;
random weights only with `--random-init`, which warns. Training into an existing family rebuilds the
backbone it recorded, and training a domain it already has needs `--overwrite` (from scratch) or
`--resume` (continue its checkpoint), as `train_domain(..., overwrite=, resume=)` does in Python.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from .cli_basis import Budget, Factored, factored_options, flag_error
from .cli_errors import CliError, interrupted, train_config_from_flags
from .cli_model import (
    DEFAULT_THREADS,
    Grayscale,
    ImageColumn,
    LabelColumn,
    Optimizer,
    Precision,
    Progress,
    Schedule,
    Threads,
    Topology,
    data_split,
    family_config,
    new_model,
    open_family,
    plural,
    require_folder,
    torch_threads,
)
from .cli_output import print_table, status
from .cli_train_flags import check_family_flags
from .config import check_domain_name
from .train_config import HEAD_LR_SCALE


# ---------------------------------------------------------------------- train
def _adapter_options(
    topology: Topology | None, placement: str | None, dropout: float | None
) -> dict[str, Any]:
    """The adapter flags given: a new family's adapter config, which an existing family's must match."""
    return {
        k: v
        for k, v in (
            ("topology", topology and topology.value),
            ("placement", placement),
            ("dropout", dropout),
        )
        if v is not None
    }


def _adapter_config(family: Path, existing: dict[str, Any] | None, options: dict[str, Any]):
    from .config import AdapterConfig

    if existing is None:
        return AdapterConfig(**options)
    config = AdapterConfig.from_dict(existing["adapter_config"])
    clash = {k: v for k, v in options.items() if getattr(config, k) != v}
    if clash:
        raise CliError(f"{family} was built with other adapter options than {clash}; drop them")
    return config


# Long by declaration only: typer reads each option (type, help, default) from this signature; the body
# is about 35 lines.
def train(
    family: Annotated[Path, typer.Option(help="family folder (created by the first domain)")],
    domain: Annotated[str, typer.Option(help="name of the domain to train")],
    data: Annotated[Path, typer.Option(help="image folder: class subfolders, or train/ and test/ splits")],
    backbone: Annotated[
        str | None,
        typer.Option(
            help="timm model name (new family only)", rich_help_panel="Backbone", show_default=False
        ),
    ] = None,
    pretrained: Annotated[
        str | None,
        typer.Option(
            help="new family: its weights, a .safetensors file \\[default: timm's pretrained weights]",
            rich_help_panel="Backbone",
            show_default=False,
        ),
    ] = None,
    random_init: Annotated[
        bool,
        typer.Option(
            "--random-init",
            help="new family: random backbone weights (seed 0) instead of pretrained ones",
            rich_help_panel="Backbone",
        ),
    ] = False,
    backbone_weights: Annotated[
        Path | None,
        typer.Option(
            help="existing family: its weights file, if it moved",
            rich_help_panel="Backbone",
            show_default=False,
        ),
    ] = None,
    eval_data: Annotated[
        Path | None,
        typer.Option(help="evaluation folder \\[default: test/ or val/ of --data]", show_default=False),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="train a domain the family has again, from scratch")
    ] = False,
    resume: Annotated[
        bool, typer.Option("--resume", help="continue the domain's checkpoint in --output-dir")
    ] = False,
    topology: Annotated[
        Topology | None,
        typer.Option(help="new family \\[default: parallel]", rich_help_panel="Adapters", show_default=False),
    ] = None,
    placement: Annotated[
        str | None,
        typer.Option(
            help="new family: all, early, mid, late or half \\[default: all]",
            rich_help_panel="Adapters",
            show_default=False,
        ),
    ] = None,
    dropout: Annotated[
        float | None,
        typer.Option(
            help="new family: dropout before the adapters \\[default: 0]",
            rich_help_panel="Adapters",
            show_default=False,
        ),
    ] = None,
    epochs: Annotated[
        int | None,
        typer.Option(
            min=1, help="epochs \\[default: 1 unless --steps]", rich_help_panel="Training", show_default=False
        ),
    ] = None,
    steps: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="optimizer steps instead of epochs (a step: batch size x processes x grad-accum images)",
            rich_help_panel="Training",
            show_default=False,
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="per process", rich_help_panel="Training")] = 32,
    lr: Annotated[
        float, typer.Option(help="base learning rate (each group scales it)", rich_help_panel="Training")
    ] = 0.1,
    optimizer: Annotated[
        Optimizer, typer.Option(help="sgd: momentum 0.9", rich_help_panel="Training")
    ] = Optimizer.sgd,
    schedule: Annotated[
        Schedule, typer.Option(help="learning-rate schedule over the steps", rich_help_panel="Training")
    ] = Schedule.cosine,
    weight_decay: Annotated[
        str, typer.Option(help="a number, or auto (by training-set size)", rich_help_panel="Training")
    ] = "auto",
    adapter_lr_scale: Annotated[
        str,
        typer.Option(help="adapters' lr factor, or auto (by topology)", rich_help_panel="Training"),
    ] = "auto",
    head_lr_scale: Annotated[
        float, typer.Option(help="the new head's lr factor", rich_help_panel="Training")
    ] = HEAD_LR_SCALE,
    label_smoothing: Annotated[
        float, typer.Option(help="cross-entropy label smoothing in [0, 1)", rich_help_panel="Training")
    ] = 0.0,
    mixed_precision: Annotated[
        Precision,
        typer.Option(help="autocast dtype (bf16 on CPU and GPU, fp16 on GPU)", rich_help_panel="Training"),
    ] = Precision.no,
    grad_checkpointing: Annotated[
        bool,
        typer.Option(
            "--grad-checkpointing",
            help="recompute the backbone's activations in backward: less memory, slower steps, same numbers",
            rich_help_panel="Training",
        ),
    ] = False,
    grad_accum: Annotated[
        int, typer.Option(min=1, help="micro-batches per optimizer step", rich_help_panel="Training")
    ] = 1,
    seed: Annotated[
        int, typer.Option(help="initialisation, data order and augmentation", rich_help_panel="Training")
    ] = 0,
    workers: Annotated[
        int, typer.Option(min=0, help="DataLoader worker processes", rich_help_panel="Training")
    ] = 0,
    no_flip: Annotated[
        bool,
        typer.Option(
            "--no-flip", help="no horizontal flip (glyphs, signs, digits)", rich_help_panel="Training"
        ),
    ] = False,
    crop_padding: Annotated[
        int | None,
        typer.Option(
            help="random-crop padding in pixels \\[default: size / 8]",
            rich_help_panel="Training",
            show_default=False,
        ),
    ] = None,
    image_size: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="input size for this domain \\[default: the backbone's]",
            rich_help_panel="Training",
            show_default=False,
        ),
    ] = None,
    grayscale: Annotated[
        Grayscale, typer.Option(help="grey images: convert to RGB, or refuse", rich_help_panel="Training")
    ] = Grayscale.convert,
    image_column: ImageColumn = "image",
    label_column: LabelColumn = "label",
    output_dir: Annotated[
        Path | None,
        typer.Option(
            help="checkpoints (with --checkpoint-every) and tracker logs (with --log-with)",
            rich_help_panel="Training",
            show_default=False,
        ),
    ] = None,
    checkpoint_every: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="optimizer steps between checkpoints in --output-dir; --resume continues from the last",
            rich_help_panel="Training",
            show_default=False,
        ),
    ] = None,
    log_with: Annotated[
        str | None,
        typer.Option(
            help="tracker, e.g. tensorboard (needs --output-dir)",
            rich_help_panel="Training",
            show_default=False,
        ),
    ] = None,
    factored: Factored = False,
    new_columns: Budget = None,
    no_progress: Progress = False,
    threads: Threads = DEFAULT_THREADS,
) -> None:
    """Train one domain on an image folder and save it into a family (created by the first domain).

    Example: adapterkit train --family fam/ --backbone resnet50.a1_in1k --domain gtsrb --data gtsrb/ --no-flip
    """
    check_domain_name(domain)
    existing = family_config(family)  # flags are checked before torch is imported: wrong ones fail at once
    to_open = check_family_flags(
        family, existing, domain, backbone, pretrained, random_init, overwrite, resume, output_dir
    )
    basis = factored_options(factored, new_columns)
    require_folder(data, "--data")
    if eval_data is not None:
        require_folder(eval_data, "--eval-data")
    adapter_config = _adapter_config(family, existing, _adapter_options(topology, placement, dropout))
    config = train_config_from_flags(
        epochs=epochs, steps=steps, batch_size=batch_size, lr=lr, optimizer=optimizer.value,
        schedule=schedule.value, weight_decay=weight_decay, adapter_lr_scale=adapter_lr_scale,
        head_lr_scale=head_lr_scale, label_smoothing=label_smoothing,
        mixed_precision=mixed_precision.value, grad_accum=grad_accum, seed=seed, num_workers=workers,
        grad_checkpointing=grad_checkpointing,
        flip=not no_flip, crop_padding=crop_padding, grayscale=grayscale.value,
        output_dir=str(output_dir) if output_dir else None, checkpoint_every=checkpoint_every,
        log_with=log_with, progress=not no_progress, image_column=image_column, label_column=label_column,
    )  # fmt: skip
    train_set, eval_set = _data_sets(data, eval_data, (image_column, label_column))
    with torch_threads(threads) as n:
        if existing is None:
            model = new_model(backbone, adapter_config, pretrained, random_init)
        else:
            model = open_family(family, existing, to_open, backbone_weights)
        _fit_and_save(
            model,
            family,
            domain,
            train_set,
            eval_set,
            config,
            image_size=image_size,
            resume=resume,
            overwrite=overwrite,
            threads=n,
            basis=basis,
        )


def _data_sets(data: Path, eval_data: Path | None, columns: tuple[str, str]) -> tuple[Any, Any]:
    """The training data (`data`, or its train/ split) and the evaluation data (`eval_data`, else the test/
    or val/ split beside train/, if any)."""
    part, train_set = data_split(data, ("train",), columns)
    if train_set is None:
        raise CliError(f"{data} has no training images; give a folder with class subfolders, or train/")
    eval_set = eval_data or (data_split(data, ("test", "val"), columns)[1] if part else None)
    return train_set, eval_set


def _fit_and_save(
    model,
    family: Path,
    domain: str,
    train_set,
    eval_set,
    config,
    *,
    image_size: int | None,
    resume: bool,
    overwrite: bool,
    threads: int,
    basis: dict,
) -> None:
    from .family import save_family
    from .train import make_accelerator, train_domain

    acc = make_accelerator(config)
    if acc.is_main_process:
        status(
            f"training {domain!r} into {family} on {model.backbone_name} ({acc.device}, {plural(threads, 'thread')}"
            + (f", {acc.num_processes} processes)" if acc.num_processes > 1 else ")")
        )
    if config.output_dir and not (config.checkpoint_every or config.log_with) and acc.is_main_process:
        status("warning: --output-dir without --checkpoint-every or --log-with writes nothing there")
    start = time.perf_counter()
    try:
        metrics = train_domain(
            model,
            domain,
            train_set,
            eval_set,
            config,
            data_config={"input_size": image_size} if image_size else None,
            accelerator=acc,
            resume=resume,
            overwrite=overwrite,
            **basis,
        )
    except ValueError as e:  # its refusals name train_domain's arguments (new_columns=): here the flags
        raise flag_error(e, ("new_columns", "factored", "overwrite", "grad_checkpointing")) from e
    except KeyboardInterrupt:
        if acc.is_main_process:
            status(interrupted(domain, config))
        raise typer.Exit(130) from None
    if not acc.is_main_process:
        return
    save_family(model, family, domains=[domain], overwrite=overwrite or resume)
    cost = model.domain_cost(domain)
    row = [domain, model.domain_info(domain).num_classes, int(metrics["steps"]), metrics["train_loss"]]
    row += [
        metrics.get("accuracy", float("nan")),
        int(cost["parameters"]),
        f"{100 * cost['fraction_of_backbone']:.2f}%",
    ]
    print_table(["domain", "classes", "steps", "train loss", "accuracy", "parameters", "of backbone"], [row])
    seconds = time.perf_counter() - start
    status(
        f"saved {family / 'domains' / (domain + '.safetensors')} ({seconds:.1f} s, {plural(threads, 'thread')})"
    )
