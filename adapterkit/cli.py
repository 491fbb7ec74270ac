"""The `adapterkit` command line.

    adapterkit train  --family DIR --backbone NAME [--pretrained FILE] --domain NAME --data DIR [options]
    adapterkit eval   --family DIR --data [DOMAIN=]DIR ... [--pretrained FILE]
    adapterkit export --family DIR --domain NAME --output DIR [--pretrained FILE]

Each subcommand is a `Command` (help, add_arguments, run) in `COMMANDS`; other modules add theirs
with `register` (`hub_cli.py`: push, pull, list, info) and are imported by `build_parser` when listed
in `COMMAND_MODULES`, so they join the same argparse tree. A `run` function
returns the exit code; user errors (ValueError, KeyError, FileNotFoundError) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Command:
    """One subcommand: its help line, a function adding its arguments, and the function running it."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}
# Modules whose import registers more subcommands (they call `register` from this module).
COMMAND_MODULES = ("adapterkit.hub_cli",)


def register(
    name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None], run: Callable[..., int]
) -> None:
    """Add a subcommand (`adapterkit <name> ...`)."""
    if name in COMMANDS:
        raise ValueError(f"command {name!r} is already registered")
    COMMANDS[name] = Command(help, add_arguments, run)


# ---------------------------------------------------------------------- shared helpers
def _backbone_arguments(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--backbone", required=required, help="timm model name (default: the family's backbone)")
    p.add_argument(
        "--pretrained",
        help="backbone weights: a .safetensors file, or 'timm' for timm's own pretrained weights (default: "
        "none, i.e. timm's initialisation with seed 0); give the same weights to every command of a family",
    )


def _backbone(name: str, pretrained: str | None):
    """The backbone module; without weights, seeded so that every command rebuilds the same one."""
    import torch

    from .inject import create_backbone

    if pretrained is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return create_backbone(name, False)
    return create_backbone(name, True if pretrained == "timm" else pretrained)


def _family_config(family: Path) -> dict[str, Any] | None:
    from .family import CONFIG_FILE
    from .load import local_fetch, read_config

    return read_config(local_fetch(family)) if (family / CONFIG_FILE).is_file() else None


def _load(args: argparse.Namespace, domains: list[str]):
    """The family's model with `domains`, on the backbone given by --backbone/--pretrained."""
    from .model import AdapterModel

    config = _family_config(Path(args.family))
    if config is None:
        raise FileNotFoundError(f"{args.family} is not an adapterkit family (no adapterkit.json)")
    backbone = _backbone(args.backbone or config["backbone"]["name"], args.pretrained)
    return AdapterModel.from_pretrained(args.family, domains=domains, backbone=backbone)


def _split(path: str, preferred: Sequence[str]):
    from .data import open_splits

    splits = open_splits(path)
    name = next((s for s in preferred if s in splits), None)
    return (name, splits[name]) if name else (None, None)


# ---------------------------------------------------------------------- train
def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--family", required=True, help="family folder (created if missing)")
    _backbone_arguments(p)
    p.add_argument("--domain", required=True, help="name of the domain to train")
    p.add_argument(
        "--data", required=True, help="image folder (class subfolders, or train/ and test/ splits)"
    )
    p.add_argument("--eval-data", help="evaluation folder (default: test/ or val/ of --data)")
    p.add_argument("--overwrite", action="store_true", help="replace the domain if the family has it")
    g = p.add_argument_group("adapters (new family only)")
    g.add_argument("--topology", choices=("parallel", "series"), default=None)
    g.add_argument("--placement", default=None, help="all, early, mid, late or half")
    g.add_argument("--dropout", type=float, default=None, help="dropout before the adapters")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int)
    g.add_argument("--steps", type=int, help="optimizer steps instead of epochs")
    g.add_argument("--batch-size", type=int, default=32, help="per process")
    g.add_argument("--lr", type=float, default=0.1)
    g.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    g.add_argument("--schedule", choices=("cosine", "step", "constant"), default="cosine")
    g.add_argument("--weight-decay", default="auto", help="a number, or 'auto' (by training-set size)")
    g.add_argument("--label-smoothing", type=float, default=0.0)
    g.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no")
    g.add_argument("--grad-accum", type=int, default=1)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    g.add_argument("--no-flip", action="store_true", help="no horizontal flip (glyphs, signs, digits)")
    g.add_argument("--crop-padding", type=int, help="random-crop padding in pixels (default: size / 8)")
    g.add_argument("--image-size", type=int, help="input size for this domain (default: the backbone's)")
    g.add_argument("--grayscale", choices=("convert", "error"), default="convert")
    g.add_argument("--output-dir", help="checkpoints and tracker logs")
    g.add_argument("--checkpoint-every", type=int, help="optimizer steps between checkpoints")
    g.add_argument("--resume", action="store_true", help="continue from the checkpoint in --output-dir")
    g.add_argument("--log-with", help="tracker, e.g. tensorboard (needs --output-dir)")
    g.add_argument("--no-progress", action="store_true")


def run_train(args: argparse.Namespace) -> int:
    from .config import AdapterConfig
    from .family import save_family
    from .load import check_backbone, install_basis, local_fetch, read_basis
    from .metrics import format_table
    from .model import AdapterModel
    from .train import TrainConfig, make_accelerator, train_domain

    family = Path(args.family)
    existing = _family_config(family)
    options = {
        k: getattr(args, k) for k in ("topology", "placement", "dropout") if getattr(args, k) is not None
    }
    if existing is not None:
        if args.domain in existing["domains"] and not args.overwrite:
            raise ValueError(
                f"{family} already has domain {args.domain!r}; pass --overwrite or pick a new name"
            )
        adapter_config = AdapterConfig.from_dict(existing["adapter_config"])
        clash = {k: v for k, v in options.items() if getattr(adapter_config, k) != v}
        if clash:
            raise ValueError(f"{family} was built with other adapter options than {clash}; drop them")
        name = args.backbone or existing["backbone"]["name"]
    else:
        if not args.backbone:
            raise ValueError(f"{family} is not a family yet: pass --backbone to create it")
        adapter_config, name = AdapterConfig(**options), args.backbone
    config = TrainConfig(
        epochs=args.epochs,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        optimizer=args.optimizer,
        schedule=args.schedule,
        weight_decay=args.weight_decay if args.weight_decay == "auto" else float(args.weight_decay),
        label_smoothing=args.label_smoothing,
        mixed_precision=args.mixed_precision,
        grad_accum=args.grad_accum,
        seed=args.seed,
        num_workers=args.workers,
        flip=not args.no_flip,
        crop_padding=args.crop_padding,
        grayscale=args.grayscale,
        output_dir=args.output_dir,
        checkpoint_every=args.checkpoint_every,
        log_with=args.log_with,
        progress=not args.no_progress,
    )
    split, train = _split(args.data, ("train",))
    if train is None:
        raise ValueError(f"{args.data} has no training images (train/ or class folders)")
    eval_data = args.eval_data or (_split(args.data, ("test", "val", "validation"))[1] if split else None)
    model = AdapterModel(_backbone(name, args.pretrained), adapter_config, backbone_name=name)
    if existing is not None:
        check_backbone(model, existing, str(family), force=False)
        install_basis(model, read_basis(model, local_fetch(family), existing))  # keeps the family's basis
    acc = make_accelerator(config)
    data_config = {"input_size": args.image_size} if args.image_size else None
    metrics = train_domain(
        model,
        args.domain,
        train,
        eval_data,
        config,
        data_config=data_config,
        accelerator=acc,
        resume=args.resume,
    )
    if acc.is_main_process:
        save_family(model, family, domains=[args.domain])
        cost = model.domain_cost(args.domain)
        row = [
            args.domain,
            model.domain_info(args.domain).num_classes,
            int(metrics["steps"]),
            metrics["train_loss"],
        ]
        row += [
            metrics.get("accuracy", float("nan")),
            cost["parameters"],
            f"{100 * cost['fraction_of_backbone']:.2f}%",
        ]
        headers = ["domain", "classes", "steps", "train loss", "accuracy", "parameters", "of backbone"]
        print(format_table([row], headers))
        print(f"saved {family / 'domains' / (args.domain + '.safetensors')}")
    return 0


# ---------------------------------------------------------------------- eval
def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--family", required=True, help="family folder")
    _backbone_arguments(p)
    p.add_argument(
        "--data",
        required=True,
        action="append",
        help="[DOMAIN=]DIR, repeatable; DIR's test/ or val/ split if any",
    )
    p.add_argument("--domain", help="domain for a --data without DOMAIN= (default: the family's only domain)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")


def run_eval(args: argparse.Namespace) -> int:
    from .metrics import format_table
    from .train import TrainConfig, evaluate

    config = _family_config(Path(args.family))
    if config is None:
        raise FileNotFoundError(f"{args.family} is not an adapterkit family (no adapterkit.json)")
    known = list(config["domains"])
    jobs = []
    for item in args.data:
        domain, sep, path = item.partition("=")
        if not sep:
            domain, path = args.domain or (known[0] if len(known) == 1 else None), item
            if domain is None:
                raise ValueError(f"{args.family} has domains {known}: pass --domain or --data DOMAIN=DIR")
        jobs.append((domain, path))
    model = _load(args, list(dict.fromkeys(d for d, _ in jobs)))
    cfg = TrainConfig(
        eval_batch_size=args.batch_size, num_workers=args.workers, progress=not args.no_progress
    )
    rows = []
    for domain, path in jobs:
        split, data = _split(path, ("test", "val", "validation", "train"))
        accuracy = evaluate(model, data, domain, config=cfg)
        stored = model.domain_info(domain).metrics.get("accuracy", float("nan"))
        rows.append(
            [
                domain,
                f"{path}" + (f" ({split})" if split != "train" else ""),
                len(data),
                accuracy,
                1 - accuracy,
                stored,
            ]
        )
    print(format_table(rows, ["domain", "data", "images", "accuracy", "error", "at training"]))
    return 0


# ---------------------------------------------------------------------- export
def add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--family", required=True, help="family folder")
    _backbone_arguments(p)
    p.add_argument("--domain", required=True)
    p.add_argument("--output", required=True, help="folder for model.safetensors + config.json (timm format)")


def run_export(args: argparse.Namespace) -> int:
    from timm.models import save_for_hf

    model = _load(args, [args.domain])
    info = model.domain_info(args.domain)
    exported = model.export_domain(args.domain)
    keys = ("input_size", "mean", "std", "crop_pct", "interpolation")
    data_config = {
        k: tuple(v) if isinstance(v, list) else v for k, v in (info.data_config or {}).items() if k in keys
    }
    model_config = {"label_names": list(info.labels)} if info.labels else None
    save_for_hf(
        exported, args.output, model_config=model_config, safe_serialization=True, data_config=data_config
    )
    print(
        f"exported {args.domain!r} to {args.output}: timm.create_model('local-dir:{args.output}', pretrained=True)"
    )
    return 0


register(
    "train", "train one domain on an image folder and save it into a family", add_train_arguments, run_train
)
register("eval", "evaluate domains of a family on image folders", add_eval_arguments, run_eval)
register(
    "export", "export one domain as a plain timm model (adapters folded)", add_export_arguments, run_export
)


def build_parser() -> argparse.ArgumentParser:
    for module in COMMAND_MODULES:
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module)
    parser = argparse.ArgumentParser(prog="adapterkit", description="Residual adapters on timm backbones.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help)
        command.add_arguments(p)
        p.set_defaults(_run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `adapterkit` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    try:
        return int(args._run(args) or 0)
    except (ValueError, KeyError, FileNotFoundError, TypeError) as e:
        if args.verbose:
            raise
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"adapterkit {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    from adapterkit.cli import main as module_main  # the imported module is where plugins register

    sys.exit(module_main())
