"""`adapterkit train`'s flags checked against the family they train into (or create), before torch is
imported: wrong ones fail at once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .cli_errors import CliError


def check_family_flags(
    family: Path,
    existing: dict[str, Any] | None,
    domain: str,
    backbone: str | None,
    pretrained: str | None,
    random_init: bool,
    overwrite: bool,
    resume: bool,
    output_dir: Path | None,
) -> list[str] | None:
    """Refuse backbone and domain flags that do not fit `family` (`existing`: its config, None when the
    first domain creates it). Returns the domains of an existing family to load before training `domain`
    (None for a new family)."""
    if existing is None and not backbone:
        hint = "pass --backbone NAME (a timm model) to create it"
        if not family.parent.is_dir():  # `alice/fam`: perhaps a Hub repo id
            hint += f"; for the Hub family {family}, run `adapterkit pull {family} DIR` and train into DIR"
        raise CliError(f"{family} is not a family yet: {hint}")
    if resume and output_dir is None and (existing is None or domain not in existing["domains"]):
        raise CliError(
            f"{family} has no domain {domain!r} to resume, and no --output-dir holds its checkpoint: drop "
            "--resume to train it new, or pass the interrupted run's --output-dir"
        )
    if pretrained not in (None, "timm") and not random_init and not Path(pretrained).is_file():
        raise CliError(f"--pretrained {pretrained}: no such file; pass the backbone's .safetensors weights")
    if existing is None:
        return None
    _existing_flags(family, existing, backbone, pretrained, random_init)
    return _domains_to_open(family, existing, domain, overwrite, resume)


def _existing_flags(
    family: Path, existing: dict[str, Any], backbone: str | None, pretrained: str | None, random_init: bool
) -> None:
    recorded = existing["backbone"]["name"]
    if backbone is not None and backbone != recorded:
        raise CliError(
            f"{family} is built on {recorded!r}, not {backbone!r}; drop --backbone (it is recorded)"
        )
    if pretrained is not None or random_init:
        flag = "--pretrained" if pretrained is not None else "--random-init"
        raise CliError(
            f"{family} records its backbone weights; drop {flag} (pass --backbone-weights FILE if the weights "
            "file it was trained on moved)"
        )


def _domains_to_open(
    family: Path, existing: dict[str, Any], domain: str, overwrite: bool, resume: bool
) -> list[str]:
    """Which domains of an existing family to load before training `domain` (see `train`)."""
    if overwrite and resume:
        raise CliError(
            "--overwrite trains the domain from scratch and --resume continues it: pass one of them"
        )
    if domain not in existing["domains"]:
        return []
    if not (overwrite or resume):
        raise CliError(
            f"{family} already has domain {domain!r}: pass --overwrite to train it again from scratch, "
            "--resume to continue it (from its checkpoint, with --output-dir), or pick a new name"
        )
    return [domain]  # train_domain(overwrite=True) replaces it; resume=True continues it
