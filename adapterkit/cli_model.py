"""`adapterkit export`, and what every command that runs a model shares (`train` is in
`cli_train.py`, `eval` in `cli_eval.py`): reading a family's config without torch, opening it on the
backbone it recorded, building a new family's model on pretrained, file or random weights, and
`--threads`.

Every command after `train` created a family rebuilds the backbone the family recorded, without
backbone flags (`--backbone-weights FILE` when a recorded weights file moved). torch, timm and the
training stack are imported inside the functions, after the arguments are parsed.
"""

from __future__ import annotations

from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from .backbone_weights import PickledWeightsError
from .cli_errors import CliError, require_endpoint, short_reason
from .cli_output import status

# Measured on the shared 2-core machine (README, "Command line"): training a domain (2 epochs, 64 px)
# took 1.9 s with one thread vs 13.5-14.6 s with torch's default of one per core (test_resnet), and
# 7.5-8.4 s vs 13.1-50.4 s (resnet18): threads that wait on cores other processes hold stall every
# parallel op. The count changes the trained bytes (sums in another order): a fixed default keeps
# re-runs bit-identical on any machine. On a machine of your own, pass --threads.
DEFAULT_THREADS = 1

Threads = Annotated[int, typer.Option(min=1, help="torch CPU threads (intra-op)")]
Progress = Annotated[bool, typer.Option("--no-progress", help="no progress bars")]
Family = Annotated[Path, typer.Option(help="family folder")]
ImageColumn = Annotated[str, typer.Option(help="image column of a saved datasets folder (--data)")]
LabelColumn = Annotated[str, typer.Option(help="class-index column of a saved datasets folder (--data)")]
BackboneWeights = Annotated[
    Path | None,
    typer.Option(
        help="the backbone weights file the family was trained on, if it moved since", show_default=False
    ),
]


# ---------------------------------------------------------------------- shared helpers
@contextmanager
def torch_threads(n: int):
    """torch's CPU threads set to `n` for the command (restored after, for callers of `main`)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


@contextmanager
def cache_if_unreachable(needs_hub: bool):
    """Backbone weights from the cache alone when the Hub cannot be reached (instead of five retries).

    huggingface_hub reads its offline flag at each request, so setting it for the command (and
    restoring it after) makes a download fail at once or come from the cache."""
    from huggingface_hub import constants

    from .cli_errors import endpoint, endpoint_problem, offline

    if not needs_hub or offline() or endpoint_problem() is None:
        yield
        return
    status(f"warning: cannot reach {endpoint()}: using cached weights only (is HF_ENDPOINT right?)")
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = False


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def family_config(family: Path) -> dict[str, Any] | None:
    """The family's config (torch-free), or None if `family` holds no adapterkit.json."""
    from .format import CONFIG_FILE, read_config
    from .sources import local_source

    if not (family / CONFIG_FILE).is_file():
        return None
    source = local_source(family)
    return read_config(source.fetch, source.files)


def require_family(family: Path) -> dict[str, Any]:
    config = family_config(family)
    if config is None:
        what = "does not exist" if not family.exists() else "has no adapterkit.json"
        raise CliError(
            f"{family} is not an adapterkit family ({what}); create one with `adapterkit train --family "
            f"{family} --backbone NAME ...`, or `adapterkit pull REPO_ID {family}`"
        )
    return config


def family_or_repo(family: str) -> tuple[Path | str, dict[str, Any], str | None]:
    """(family, its config, the commit it was read at): a family folder, or a Hub/registry repo id with an
    optional `@revision` (read with HF_TOKEN or the saved login), pinned to its commit."""
    from .format import read_config
    from .sources import check_repo_id, open_source, split_source

    repo, revision = split_source(family)
    if (
        Path(repo).exists() or "/" not in repo or Path(repo.split("/")[0]).is_dir()
    ):  # a folder (or a typo of one)
        return Path(family), require_family(Path(family)), None
    check_repo_id(repo)
    require_endpoint()
    source = open_source(repo, revision=revision)
    return repo, read_config(source.fetch, source.files, where=source.label), source.revision


def require_folder(path: Path, flag: str) -> Path:
    if not path.is_dir():
        what = "does not exist" if not path.exists() else "is not a folder"
        raise CliError(f"{flag} {path} {what}; give an image folder (class subfolders, or train/ and test/)")
    return path


def check_domains(family: Path, config: dict[str, Any], names: list[str]) -> None:
    known = list(config["domains"])
    unknown = [n for n in names if n not in known]
    if unknown:
        raise CliError(
            f"{family} has no domain {', '.join(map(repr, unknown))}; it has: {', '.join(known) or 'none'} "
            "(name one of them, or train it first with `adapterkit train`)"
        )


def open_family(
    family: Path | str,
    config: dict[str, Any],
    domains: list[str],
    weights: Path | None,
    revision: str | None = None,
):
    """The family's model (a folder, or a Hub repo at `revision`) with `domains` loaded, on the backbone
    it recorded."""
    from .model import AdapterModel

    kind = (config["backbone"].get("weights") or {}).get("kind", "timm")
    name = str(config["backbone"]["name"])
    needs_hub = weights is None and kind not in ("random", "file") and not name.startswith("local-dir:")
    with backbone_errors(family, name), cache_if_unreachable(needs_hub):
        return AdapterModel.from_pretrained(
            str(family), domains=domains, backbone_weights=weights, revision=revision
        )


@contextmanager
def backbone_errors(family: object, name: str | None):
    """The library's backbone errors in the command line's terms: its advice names Python arguments
    (force=, backbone=). `name`: the family's backbone, if known."""
    backbone = f" ({name})" if name else ""
    try:
        yield
    except PickledWeightsError:
        raise  # its message says how to convert the weights
    except ValueError as e:
        if "fingerprint" in str(e):
            raise CliError(
                f"the backbone rebuilt for {family}{backbone} has other weights than the ones it was trained "
                "on; pass --backbone-weights FILE with the weights file the family was trained on"
            ) from e
        if "pretrained weights" in str(e):
            raise CliError(
                f"could not load the pretrained weights of the backbone {family} was trained on{backbone} "
                f"({short_reason(e.__cause__ or e)}); go online once so they are cached, or pass "
                "--backbone-weights FILE"
            ) from e
        raise


def new_model(name: str, adapter_config: Any, pretrained: str | None, random_init: bool):
    """A new family's model: timm's pretrained weights, a weights file, or (explicitly) random ones."""
    from .model import AdapterModel

    if random_init and pretrained is not None:
        raise CliError("--random-init and --pretrained contradict each other; pass one of them")
    if random_init:  # seed 0, recorded: every later command rebuilds the same weights
        status(f"warning: {name} starts from random weights (--random-init), not pretrained ones")
        return AdapterModel.from_backbone(name, adapter_config, pretrained=False)
    weights: bool | Path = True if pretrained in (None, "timm") else Path(pretrained)
    if weights is not True:
        return AdapterModel.from_backbone(name, adapter_config, pretrained=weights)
    if not _downloadable(name):
        raise CliError(
            f"backbone {name!r} has no weights timm can download (its pretrained config names no URL, Hub "
            "repo or file); pass --pretrained FILE.safetensors, or --random-init"
        )
    try:
        with cache_if_unreachable(not name.startswith("local-dir:")):
            return AdapterModel.from_backbone(name, adapter_config, pretrained=True)
    except PickledWeightsError:
        raise  # the source has only pickled weights: its message says how to convert them
    except Exception as e:
        if not _known_architecture(name):
            raise
        raise CliError(
            f"no pretrained weights for backbone {name!r} ({short_reason(e)}); go online (or set "
            "HF_ENDPOINT) so timm can download them, pass --pretrained FILE.safetensors, or --random-init"
        ) from e


def _downloadable(name: str) -> bool:
    """False only for a known timm name whose pretrained config has no source (the CIFAR ResNets)."""
    import timm

    if name.startswith(("hf-hub:", "local-dir:")):
        return True
    cfg = timm.models.get_pretrained_cfg(name, allow_unregistered=True)
    return cfg is None or bool(cfg.url or cfg.hf_hub_id or cfg.file)


def _known_architecture(name: str) -> bool:
    import timm

    return name.startswith(("hf-hub:", "local-dir:")) or timm.is_model(name)


def data_split(path: Path, preferred: tuple[str, ...], columns: tuple[str, str] = ("image", "label")):
    from .data import open_splits

    splits = open_splits(path, *columns)
    name = next((s for s in preferred if s in splits), None)
    return (name, splits[name]) if name else (None, None)


# ---------------------------------------------------------------------- export
def export(
    family: Annotated[
        str, typer.Option(help="family folder, or Hub/registry repo id with an optional @revision")
    ],
    domain: Annotated[str, typer.Option(help="the domain to export")],
    output: Annotated[Path, typer.Option(help="folder for model.safetensors + config.json (timm format)")],
    backbone_weights: BackboneWeights = None,
    threads: Threads = DEFAULT_THREADS,
) -> None:
    """Export one domain as a plain timm model, its adapters folded into the backbone's weights.

    Example: adapterkit export --family fam/ --domain gtsrb --output gtsrb-timm/
    """
    family, config, revision = family_or_repo(family)
    check_domains(family, config, [domain])
    from .export import check_output, save_export

    try:
        check_output(output)
    except ValueError as e:
        raise CliError(f"--output {e}") from None
    with torch_threads(threads) as n:
        model = open_family(family, config, [domain], backbone_weights, revision)
        status(f"exporting {domain!r} of {family} ({plural(n, 'thread')})")
        exported = save_export(model, domain, output)
        ours = type(exported).__module__.startswith(__package__)  # the paper's ResNets, registered by us
    load = f"timm.create_model('local-dir:{output}', pretrained=True)"
    print(f"exported {domain!r} to {output}: {'import adapterkit.backbones; ' if ours else ''}{load}")


# ---------------------------------------------------------------------- the choices of train's options
class Topology(str, Enum):
    parallel = "parallel"
    series = "series"


class Optimizer(str, Enum):
    sgd = "sgd"
    adamw = "adamw"


class Schedule(str, Enum):
    cosine = "cosine"
    step = "step"
    constant = "constant"


class Precision(str, Enum):
    no = "no"
    bf16 = "bf16"
    fp16 = "fp16"


class Grayscale(str, Enum):
    convert = "convert"
    error = "error"
