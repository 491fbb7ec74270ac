"""`adapterkit eval`: the accuracy of families' domains on image folders, as a table and, on request,
as an accuracy matrix (JSON, CSV) and its figures.

The matrix has one row per `--family` and one column per `--data` domain, in the order given; a
family without a domain leaves that cell empty. One family gives one row: its domains at the state
the folder holds now. Several families give several rows: snapshots of one family after each domain
(the continual matrix R[i][j], accuracy on domain j after training domain i, when family i holds
exactly the first i + 1 domains: then ACC, BWT and forgetting are reported too), or families trained
with different methods on the same domains (compared domain by domain with `--bars`).
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Annotated, Any

import typer

from .cli_errors import CliError
from .cli_model import (
    DEFAULT_THREADS,
    BackboneWeights,
    ImageColumn,
    LabelColumn,
    Progress,
    Threads,
    check_domains,
    data_split,
    family_or_repo,
    open_family,
    plural,
    require_folder,
    torch_threads,
)
from .cli_output import print_table, status

MATRIX_FORMATS = (".json", ".csv")
FIGURE_FORMATS = (".png", ".svg", ".pdf")
Job = tuple[str, Path]
Family = tuple[Path | str, dict[str, Any], str | None]  # folder or repo id, its config, a repo's commit


def evaluate(
    family: Annotated[
        list[str],
        typer.Option(
            metavar="DIR|ORG/NAME[@REV]",
            help="family folder, or Hub/registry repo id (read at REV); repeat for one matrix row per family",
        ),
    ],
    data: Annotated[
        list[str],
        typer.Option(metavar="[DOMAIN=]DIR", help="repeatable; DIR's test/ or val/ split if it has one"),
    ],
    domain: Annotated[
        str | None,
        typer.Option(
            help="domain of a --data without DOMAIN= \\[default: the family's only one]", show_default=False
        ),
    ] = None,
    output: Annotated[
        list[Path] | None,
        typer.Option(
            metavar="FILE",
            help="write the accuracy matrix: .json (with metrics and the files evaluated) or .csv; repeatable",
            show_default=False,
        ),
    ] = None,
    plot: Annotated[
        Path | None,
        typer.Option(help="draw the accuracy matrix as a heatmap: .png, .svg or .pdf", show_default=False),
    ] = None,
    bars: Annotated[
        Path | None,
        typer.Option(
            help="draw per-domain bars, one per family (each needs every domain): .png, .svg or .pdf",
            show_default=False,
        ),
    ] = None,
    baseline_error: Annotated[
        list[str] | None,
        typer.Option(
            metavar="DOMAIN=ERROR",
            help="the baseline's error (a fraction), one per domain: adds the Decathlon score",
            show_default=False,
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="images per forward pass")] = 64,
    workers: Annotated[int, typer.Option(min=0, help="DataLoader worker processes")] = 0,
    image_column: ImageColumn = "image",
    label_column: LabelColumn = "label",
    backbone_weights: BackboneWeights = None,
    no_progress: Progress = False,
    threads: Threads = DEFAULT_THREADS,
) -> None:
    """Evaluate domains of families on image folders (top-1 accuracy); write the accuracy matrix.

    Example: adapterkit eval --family fam/ --data gtsrb=gtsrb/ --data flowers=flowers/ --output r.json
    """
    families = _families(family)
    jobs = _eval_jobs(families, data, domain)  # all checked before torch is imported
    columns = list(dict.fromkeys(name for name, _ in jobs))
    baseline = _baseline(baseline_error or [], columns)
    _check_outputs(output or [], plot, bars, jobs, families)
    from .train import TrainConfig

    cfg = TrainConfig(
        eval_batch_size=batch_size,
        num_workers=workers,
        progress=not no_progress,
        image_column=image_column,
        label_column=label_column,
    )
    records, rows = [], []
    with torch_threads(threads) as n:
        many = f"{len(families)} families" if len(families) > 1 else str(families[0][0])
        status(f"evaluating {plural(len(jobs), 'data set')} on {many} ({plural(n, 'thread')})")
        for path, config, revision in families:
            record, table = _evaluate_family(path, config, jobs, cfg, backbone_weights, revision)
            records.append(record)
            rows += [[str(path), *row] if len(families) > 1 else row for row in table]
    headers = ["domain", "data", "images", "accuracy", "error", "at training"]
    print_table(["family"] * (len(families) > 1) + headers, rows)
    held = [set(c["domains"]) for _, c, _ in families]
    result = _matrix_result(records, columns, baseline, held)
    print("\n" + _summary(result))  # a paragraph of its own: `eval > results.md` keeps the table whole
    order = sorted(range(len(held)), key=lambda i: len(held[i]))  # would the snapshots in this order be one?
    if order != list(range(len(held))) and all(held[j] == set(columns[: i + 1]) for i, j in enumerate(order)):
        status("note: these families are snapshots of one training sequence in another order; pass --family "
               f"in training order ({', '.join(str(families[i][0]) for i in order)}) for ACC, BWT and forgetting")  # fmt: skip
    _write_outputs(result, output or [], plot, bars)


# ---------------------------------------------------------------------- arguments
def _families(items: list[str]) -> list[Family]:
    """(folder or repo id, its config, the commit a repo was read at) per --family, each given once."""
    seen = [str(Path(i).resolve()) if Path(i).exists() else i for i in items]
    repeated = sorted({i for i, r in zip(items, seen, strict=True) if seen.count(r) > 1})
    if repeated:
        raise CliError(f"--family {', '.join(repeated)} is given twice; give each family once (one row each)")
    return [family_or_repo(i) for i in items]


def _eval_jobs(families: list[Family], data: list[str], domain: str | None) -> list[Job]:
    known = list(dict.fromkeys(d for _, config, _ in families for d in config["domains"]))
    jobs = []
    for item in data:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = domain or (known[0] if len(known) == 1 else None), item
            if name is None:
                where = families[0][0] if len(families) == 1 else "the families"
                raise CliError(
                    f"{where} has domains {', '.join(known)}: pass --domain NAME or --data DOMAIN=DIR"
                )
        jobs.append((name, require_folder(Path(path), "--data")))
    names = [n for n, _ in jobs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise CliError(
            f"--data gives domain {', '.join(map(repr, twice))} more than once; give one data set per domain "
            "(evaluate other data sets in another run)"
        )
    if len(families) == 1:
        check_domains(families[0][0], families[0][1], names)
    missing = [n for n, _ in jobs if n not in known]
    if missing:
        raise CliError(
            f"no --family has domain {', '.join(map(repr, missing))}; they have: {', '.join(known) or 'none'}"
        )
    return jobs


def _baseline(items: list[str], columns: list[str]) -> dict[str, float] | None:
    if not items:
        return None
    baseline = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            error = float(value) if sep else math.nan
        except ValueError:
            error = math.nan
        if not (sep and 0.0 < error <= 1.0):
            raise CliError(f"--baseline-error {item}: give DOMAIN=ERROR with the error a fraction in (0, 1]")
        baseline[name] = error
    missing = [c for c in columns if c not in baseline]
    if missing:
        raise CliError(
            f"--baseline-error has no error for {', '.join(missing)}; give one per evaluated domain"
        )
    return baseline


def _check_outputs(
    outputs: list[Path],
    plot: Path | None,
    bars: Path | None,
    jobs: list[Job],
    families: list[Family],
) -> None:
    columns = {name for name, _ in jobs}
    named = [(p, MATRIX_FORMATS, "--output") for p in outputs]
    named += [(p, FIGURE_FORMATS, flag) for p, flag in ((plot, "--plot"), (bars, "--bars")) if p is not None]
    for path, formats, flag in named:
        if path.suffix.lower() not in formats:
            raise CliError(f"{flag} {path}: name it {' or '.join(formats)}; the format follows the suffix")
        if not path.parent.is_dir():
            raise CliError(f"{flag} {path}: folder {path.parent} does not exist; create it first")
    lacking = [str(path) for path, config, _ in families if not columns <= set(config["domains"])]
    if bars is not None and lacking:
        raise CliError(
            f"--bars compares families on every domain; {', '.join(lacking)} lacks some: use --plot"
        )
    if plot or bars:
        try:
            import matplotlib  # noqa: F401
        except ImportError as e:
            raise CliError("--plot and --bars need matplotlib: pip install 'adapterkit[plot]'") from e


# ---------------------------------------------------------------------- evaluating
def _evaluate_family(
    path: Path | str,
    config: dict[str, Any],
    jobs: list[Job],
    cfg: Any,
    weights: Path | None,
    revision: str | None,
):
    """The family's record for the JSON document, and its rows of the printed table."""
    from .compress import parameter_report
    from .data import split_folders
    from .train import evaluate as accuracy_of

    mine = [(name, where) for name, where in jobs if name in config["domains"]]
    model = open_family(path, config, list(dict.fromkeys(name for name, _ in mine)), weights, revision)
    evaluated, rows = {}, []
    for name, where in mine:
        part, dataset = data_split(where, ("test", "val", "train"), (cfg.image_column, cfg.label_column))
        if dataset is None:
            raise CliError(f"{where} has no images; give a folder with class subfolders, or test/")
        split = split_folders(Path(where))
        if part == "train" and split:
            raise CliError(
                f"{where} has a {split['train'].name}/ split but no test/ or val/ one, and eval scores "
                f"held-out images: add one, or pass {split['train']} to score the training images"
            )
        accuracy = accuracy_of(model, dataset, name, config=cfg)
        stored = model.domain_info(name).metrics.get("accuracy")
        stored = stored if isinstance(stored, float) and math.isfinite(stored) else None  # JSON has no NaN
        label = f"{where}" + (f" ({split[part].name})" if part in split else "")
        rows.append([name, label, len(dataset), accuracy, 1 - accuracy, stored])
        evaluated[name] = {"accuracy": accuracy, "at_training": stored, "data": str(where), "split": part,
                           "images": len(dataset), "sha256": config["domains"][name].get("sha256")}  # fmt: skip
    backbone = config["backbone"]
    record = {"family": str(path), "revision": revision, "backbone": backbone.get("name"), "fingerprint": backbone.get("fingerprint"),
              "domains": evaluated, "parameters": parameter_report(model)}  # fmt: skip
    return record, rows


# ---------------------------------------------------------------------- the matrix
def _matrix_result(records, columns, baseline, held: list[set[str]]) -> dict[str, Any]:
    """The JSON document: the matrix (null where not evaluated), its metrics and what was evaluated."""
    from . import __version__
    from .metrics import ContinualReport, decathlon_score

    matrix = [[r["domains"].get(c, {}).get("accuracy") for c in columns] for r in records]
    metrics: dict[str, Any] = {
        "mean_accuracy": [_mean([a for a in row if a is not None]) for row in matrix],
        "domains_evaluated": [sum(a is not None for a in row) for row in matrix],
        # backbone + basis + the evaluated domains' own parameters, in backbones (the paper's "#par")
        "total_parameters": [r["parameters"]["relative"] for r in records],
    }
    sequence = len(records) == len(columns) > 1 and all(
        h == set(columns[: i + 1]) for i, h in enumerate(held)
    )
    if sequence:
        report = ContinualReport.from_matrix([row[: i + 1] for i, row in enumerate(matrix)], columns)
        metrics.update(acc=report.acc, bwt=report.bwt, forgetting=report.forgetting)
    if baseline is not None:
        scores = [
            decathlon_score({c: 1 - a for c, a in zip(columns, row, strict=True) if a is not None}, baseline)
            for row in matrix
        ]
        metrics["decathlon"] = [total for total, _ in scores]
        metrics["decathlon_per_domain"] = [per for _, per in scores]
    return {"format_version": 1, "adapterkit_version": __version__, "domains": columns,
            "rows": [r["family"] for r in records], "matrix": matrix, "sequence": sequence, "metrics": metrics,
            "baseline_errors": baseline, "families": records}  # fmt: skip


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _summary(result: dict[str, Any]) -> str:
    m = result["metrics"]
    lines = []
    for i, row in enumerate(result["rows"]):
        line = f"{row}: mean accuracy {m['mean_accuracy'][i]:.4f} over {plural(m['domains_evaluated'][i], 'domain')}"
        if "decathlon" in m:
            line += f", Decathlon score {m['decathlon'][i]:.0f}"
        lines.append(line)
    if result["sequence"]:
        lines.append(f"continual: ACC {m['acc']:.4f}  BWT {m['bwt']:+.4f}  forgetting {m['forgetting']:.4f}")
    return "\n".join(lines)


def _write_outputs(result: dict[str, Any], outputs: list[Path], plot: Path | None, bars: Path | None) -> None:
    from .format import atomic_write, json_bytes

    for path in outputs:
        atomic_write(path, json_bytes(result) if path.suffix.lower() == ".json" else _csv_bytes(result))
        status(f"wrote the accuracy matrix to {path}")
    if plot is not None:
        from .plots import accuracy_heatmap

        nan = [[math.nan if a is None else a for a in row] for row in result["matrix"]]
        accuracy_heatmap(
            nan, result["domains"], plot, row_names=result["rows"], ylabel="family", percent=False
        )
        status(f"wrote the heatmap to {plot}")
    if bars is not None:
        from .plots import domain_bars

        table = {
            r: dict(zip(result["domains"], row, strict=True))
            for r, row in zip(result["rows"], result["matrix"], strict=True)
        }
        domain_bars(table, bars, percent=False)
        status(f"wrote the per-domain bars to {bars}")


def _csv_bytes(result: dict[str, Any]) -> bytes:
    """One row per family, one column per domain, accuracies as fractions (empty: not evaluated)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["family", *result["domains"]])
    for row, values in zip(result["rows"], result["matrix"], strict=True):
        writer.writerow([row, *("" if a is None else repr(a) for a in values)])
    return out.getvalue().encode()
