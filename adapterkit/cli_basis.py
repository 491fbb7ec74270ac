"""`adapterkit compress` and `adapterkit append`: the shared basis of docs/basis.md from the command line.

    adapterkit compress --family DIR (--basis-rank K | --energy E) (--output NEW_DIR | --dry-run)
    adapterkit append   --family DIR --domain NAME [--new-columns N | --energy E]

`compress` is the paper's joint compression (`compress.refactorize`): every domain is re-expressed on a
new shared basis, so it writes a new family folder and leaves the old one as it was (`--dry-run` only
reports each domain's error). `append` shares one trained domain's adapters through the basis
(`compress.append_domain`), in place: the other domains' files stay byte-identical. A domain trained
in factored form comes from `adapterkit train --factored [--new-columns N]` (the options below are
shared with it). Refusals of the library name its arguments (`new_columns=`); here they name the flags.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer

from .cli_errors import CliError
from .cli_model import (
    DEFAULT_THREADS,
    BackboneWeights,
    Threads,
    check_domains,
    open_family,
    plural,
    require_family,
    torch_threads,
)
from .cli_output import print_table, status

Budget = Annotated[
    str | None,
    typer.Option(
        help="an int (columns per layer) or a share of C in (0, 1], e.g. 8 or 0.5",
        rich_help_panel="Basis",
        show_default=False,
    ),
]
Energy = Annotated[
    float | None,
    typer.Option(
        help="keep this share in (0, 1] of the squared singular values instead",
        rich_help_panel="Basis",
        show_default=False,
    ),
]
Factored = Annotated[
    bool,
    typer.Option(
        "--factored",
        help="train the domain in factored form on the family's shared basis (then `adapterkit append`)",
        rich_help_panel="Basis",
    ),
]
_FLAGS = {"basis_rank": "--basis-rank", "new_columns": "--new-columns", "energy": "--energy"}
_FLAGS |= {"factored": "--factored", "overwrite": "--overwrite", "rank": "--basis-rank"}
_FLAGS |= {"grad_checkpointing": "--grad-checkpointing"}
_ARGUMENT = re.compile(rf"\b({'|'.join(_FLAGS)})(=True|=)?")  # a Python argument the flags above name


def parse_budget(value: str | None, flag: str) -> int | float | None:
    """`--basis-rank`/`--new-columns`: an int (absolute) or a float share; range checks are the library's."""
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        pass
    try:
        return float(value)
    except ValueError:
        raise CliError(
            f"{flag} {value!r} is not a number; pass an int (e.g. 8) or a share (e.g. 0.5)"
        ) from None


def factored_options(factored: bool, new_columns: str | None) -> dict:
    """`train_domain`'s `factored=`/`new_columns=` from `adapterkit train --factored --new-columns N`."""
    if new_columns is not None and not factored:
        raise CliError("--new-columns sizes a factored domain's own columns: pass --factored with it")
    return {"factored": factored, "new_columns": parse_budget(new_columns, "--new-columns")}


def flag_error(error: ValueError, names: tuple[str, ...]) -> CliError:
    """The library's refusal with the argument names of `names` (`new_columns=`, `energy`), those the command
    has flags for, replaced by the flags."""

    def flag(m: re.Match) -> str:
        if m[1] not in names or (m[2] is None and "_" not in m[1]):
            return m[0]  # another command's argument, or a plain word ("energy" of a residual)
        return _FLAGS[m[1]] + (" " if m[2] == "=" else "")

    return CliError(_ARGUMENT.sub(flag, str(error)).replace("  ", " ").rstrip())


def _error_rows(report) -> list[list]:
    return [[d, report.domain_errors.get(d, 0.0)] for d in sorted(report.domain_errors)]


# ---------------------------------------------------------------------- compress
def compress(
    family: Annotated[Path, typer.Option(help="family folder whose domains are compressed")],
    output: Annotated[
        Path | None,
        typer.Option(help="new folder for the compressed family (the old one is left as it was)"),
    ] = None,
    basis_rank: Budget = None,
    energy: Energy = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="report each domain's error; write nothing")
    ] = False,
    backbone_weights: BackboneWeights = None,
    threads: Threads = DEFAULT_THREADS,
) -> None:
    """Compress every domain onto one shared basis per layer (joint SVD, the paper's §3.4).

    Every domain changes by its reported error, so the result goes to a new folder: check it with
    `adapterkit eval`, then use it in place of the old family.

    Example: adapterkit compress --family fam/ --basis-rank 0.5 --output fam-compressed/
    """
    config = require_family(family)
    rank = parse_budget(basis_rank, "--basis-rank")
    if (rank is None) == (energy is None):
        raise CliError(
            "pass one budget: --basis-rank K (e.g. 0.5 for the paper's C/2) or --energy E (e.g. 0.99)"
        )
    if dry_run == (output is not None):
        raise CliError("pass --output NEW_FOLDER to write the compressed family, or --dry-run to only report")
    if output is not None:
        _check_output(family, output)
    if not config["domains"]:
        raise CliError(f"{family} has no domains to compress; train some first with `adapterkit train`")
    with torch_threads(threads) as n:
        from .compress import parameter_report, refactorize
        from .family import save_family

        model = open_family(family, config, list(config["domains"]), backbone_weights)
        status(f"compressing {plural(len(model.domains), 'domain')} of {family} ({plural(n, 'thread')})")
        before = parameter_report(model)["relative"]
        try:
            report = refactorize(model, basis_rank=rank, energy=energy, apply=not dry_run)
        except ValueError as e:
            raise flag_error(e, ("basis_rank", "rank", "energy")) from e
        after = parameter_report(model)["relative"] if not dry_run else None
        print_table(["domain", "relative error"], _error_rows(report))
        if output is not None:
            save_family(model, output)
            status(f"saved {output}: parameters {before:.3f}x -> {after:.3f}x the backbone")


def _check_output(family: Path, output: Path) -> None:
    if output.resolve() == family.resolve():
        raise CliError(
            f"--output {output} is the family itself; compression changes every domain: write a new folder "
            "and replace the old one once `adapterkit eval` is content"
        )
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise CliError(f"--output {output} exists and is not empty; pass a new folder")


# ---------------------------------------------------------------------- append
def append(
    family: Annotated[Path, typer.Option(help="family folder (updated in place)")],
    domain: Annotated[str, typer.Option(help="the trained domain to share through the basis")],
    new_columns: Budget = None,
    energy: Energy = None,
    backbone_weights: BackboneWeights = None,
    threads: Threads = DEFAULT_THREADS,
) -> None:
    """Share a trained domain's adapters through the family's basis, appending columns; the other
    domains do not change (their files stay byte-identical).

    Without a budget the append is exact or refused; --new-columns or --energy accept a projection.

    Example: adapterkit append --family fam/ --domain mnist --energy 0.95
    """
    config = require_family(family)
    check_domains(family, config, [domain])
    columns = parse_budget(new_columns, "--new-columns")
    if columns is not None and energy is not None:
        raise CliError("--new-columns and --energy are two budgets: pass one of them (or none: exact)")
    with torch_threads(threads) as n:
        from .compress import append_domain
        from .family import save_family

        model = open_family(family, config, [domain], backbone_weights)
        status(f"appending {domain!r} to the basis of {family} ({plural(n, 'thread')})")
        try:
            report = append_domain(model, domain, new_columns=columns, energy=energy)
        except ValueError as e:
            raise flag_error(e, ("new_columns", "energy")) from e
        save_family(model, family, domains=[domain], overwrite=True)
    widths = sorted(set(report.ranks.values()))
    print_table(["domain", "exact", "relative error", "basis columns"], [
        [domain, "yes" if report.exact else "no", report.domain_errors.get(domain, 0.0),
         f"{widths[0]}-{widths[-1]}" if len(widths) > 1 else (widths[0] if widths else 0)]
    ])  # fmt: skip
