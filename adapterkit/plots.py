"""Figures for a paper: the continual accuracy matrix as a heatmap, total parameters vs mean accuracy
with its Pareto front, and per-domain accuracy bars per method.

matplotlib is an optional dependency (``pip install 'adapterkit[plot]'``) imported inside the functions;
figures are drawn on matplotlib's ``Figure`` with the Agg canvas (no pyplot, no global state, no display).
The format follows the path's suffix (``.png``, ``.svg`` or ``.pdf``); the file is written next to its
target and renamed into place, so a failure leaves no half-written figure.

Accuracies may be fractions in [0, 1] or percentages in [0, 100] (``percent=None`` tells them apart: all
values <= 1 are fractions); the figures always show percentages.
"""

from __future__ import annotations

import functools
import math
import os
import secrets
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .metrics import accuracy_matrix

__all__ = ["FORMATS", "accuracy_heatmap", "domain_bars", "pareto_front", "pareto_plot"]

FORMATS = (".png", ".svg", ".pdf")
# A paper's single column is ~3.3 in wide, a double column ~7 in; fonts at 8-9 pt stay readable there.
FONT_SIZE = 8
PNG_DPI = 200
# Text stays text in SVG; TrueType (not Type 3) fonts in PDF, as publishers ask.
STYLE = {"font.size": FONT_SIZE, "svg.fonttype": "none", "pdf.fonttype": 42, "svg.hashsalt": "adapterkit"}
Point = tuple[float, float] | tuple[float, float, str | None] | tuple[float, float, str | None, float | None]


def _drawing(function: Callable[..., Path]) -> Callable[..., Path]:
    """Runs a plotting function with matplotlib imported and the paper style set for its duration only."""

    @functools.wraps(function)
    def draw(*args: Any, **kwargs: Any) -> Path:
        try:
            import matplotlib
        except ImportError as e:
            raise ImportError("adapterkit's plots need matplotlib: pip install 'adapterkit[plot]'") from e
        with matplotlib.rc_context(STYLE):
            return function(*args, **kwargs)

    return draw


@_drawing
def accuracy_heatmap(
    matrix: Any,
    names: Sequence[str],
    path: str | os.PathLike,
    title: str | None = None,
    *,
    row_names: Sequence[str] | None = None,
    ylabel: str | None = None,
    percent: bool | None = None,
) -> Path:
    """The accuracy matrix ``R[i][j]`` (accuracy on domain j after training domain i) as an annotated heatmap.

    Cells above the diagonal (domains not trained yet) are left blank; with ``row_names`` the matrix may
    be any ``rows x len(names)`` table (one row per checkpoint or family, NaN where not measured).

    Args:
        matrix: T x T rows, or the lower-triangular ragged form ``adapterkit.metrics.accuracy_matrix``
            takes (row i holds domains 0..i); with ``row_names``, one full row per name.
        names: The evaluated domains (columns); also the rows unless ``row_names`` is given.
        path: Where to write the figure; ``.png``, ``.svg`` or ``.pdf``.
        title: Drawn above the matrix.
        row_names: Labels of the rows when they are not the domains trained in sequence.
        ylabel: Label of the rows' axis; default: "after training" without ``row_names``, none with.
        percent: Whether values are percentages; None: fractions if every value is <= 1.

    Returns:
        The path written.

    Example:
        >>> accuracy_heatmap([[0.9], [0.9, 0.8]], ["gtsrb", "mnist"], tmp / "r.png")  # doctest: +SKIP
    """
    names = _names(names, "names")
    if row_names is None:
        m = accuracy_matrix(matrix)
        if m.shape[0] != len(names):
            raise ValueError(
                f"got {len(names)} names for a {m.shape[0]} x {m.shape[0]} matrix; pass one per domain"
            )
        rows, ylabel = names, "after training" if ylabel is None else ylabel
    else:
        rows = _names(row_names, "row_names")
        m = _table(matrix, len(rows), len(names))
    m = m * _factor(m, percent)
    # Room for the labels: ~0.06 in per character at 8 pt (column labels are rotated 30 degrees).
    width = 0.55 * len(names) + 1.6 + 0.06 * max(map(len, rows))
    height = 0.4 * len(rows) + 0.9 + 0.03 * max(map(len, names))
    figure = _figure((max(2.8, width), max(1.4, height)), title)
    ax = figure.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(m), cmap="viridis", vmin=0.0, vmax=100.0, aspect="auto")
    for i, j in zip(*np.nonzero(np.isfinite(m)), strict=True):
        ax.text(j, i, f"{m[i, j]:.1f}", ha="center", va="center", color="black" if m[i, j] > 60 else "white")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("accuracy on")
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.tick_params(length=0)
    figure.colorbar(image, ax=ax, label="accuracy (%)", fraction=0.05, pad=0.03)
    return _save(figure, path)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats: none has fewer or equal parameters and higher accuracy.

    Sorted by parameters; ties keep the more accurate point.

    Example:
        >>> pareto_front([(1.6, 55.0), (1.4, 54.9), (1.5, 50.0), (1.0, 40.0)])
        [(1.0, 40.0), (1.4, 54.9), (1.6, 55.0)]
    """
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((float(x), float(y)))
    return front


@_drawing
def pareto_plot(
    points: Mapping[str, Sequence[Point]],
    path: str | os.PathLike,
    title: str | None = None,
    *,
    xlabel: str = "total parameters (× one backbone)",
    ylabel: str = "mean accuracy (%)",
    percent: bool | None = None,
) -> Path:
    """Total parameters vs mean accuracy, one marker series per method, the Pareto front over all drawn.

    Args:
        points: ``{method: [(parameters, accuracy[, label[, std]]), ...]}``; ``label`` annotates the point
            (e.g. "K=C/2"), ``std`` draws a vertical error bar (same unit as accuracy). Points of one
            method are joined by a line in the order given.
        path: Where to write the figure; ``.png``, ``.svg`` or ``.pdf``.
        title: Drawn above the axes.
        xlabel, ylabel: Axis labels.
        percent: Whether accuracies are percentages; None: fractions if every value is <= 1.

    Returns:
        The path written.

    Example:
        >>> pareto_plot({"adapters": [(1.66, 59.2)], "joint SVD": [(1.37, 54.9, "K=C/2")]}, "p.png")  # doctest: +SKIP
    """
    series = _series(points)
    factor = _factor(np.array([p[1] for s in series.values() for p in s]), percent)
    figure = _figure((3.6, 2.7), title)
    ax = figure.add_subplot()
    markers = "osD^vP*Xh<>"
    for k, (method, pts) in enumerate(series.items()):
        x = [p[0] for p in pts]
        y = [p[1] * factor for p in pts]
        err = [(p[3] or 0.0) * factor for p in pts]
        line = ax.errorbar(x, y, yerr=err if any(err) else None, marker=markers[k % len(markers)], ms=4,
                           lw=1, capsize=2, label=method)  # fmt: skip
        for xi, yi, p in zip(x, y, pts, strict=True):
            if p[2]:
                ax.annotate(p[2], (xi, yi), xytext=(3, 3), textcoords="offset points",
                            fontsize=FONT_SIZE - 2, color=line[0].get_color())  # fmt: skip
    front = pareto_front([(p[0], p[1] * factor) for s in series.values() for p in s])
    fx, fy = zip(*front, strict=True)
    ax.step(fx, fy, where="post", color="0.4", lw=0.8, ls="--", zorder=0)
    ax.scatter(fx, fy, s=70, facecolors="none", edgecolors="0.2", lw=0.8, zorder=3, label="Pareto front")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, lw=0.5)
    ax.legend(frameon=False, fontsize=FONT_SIZE - 1)
    return _save(figure, path)


@_drawing
def domain_bars(
    results: Mapping[str, Mapping[str, float]],
    path: str | os.PathLike,
    errors: Mapping[str, Mapping[str, float]] | None = None,
    *,
    title: str | None = None,
    mean: bool = True,
    percent: bool | None = None,
) -> Path:
    """Per-domain accuracy as grouped bars, one bar per method in each domain's group.

    Args:
        results: ``{method: {domain: accuracy}}``; every method needs the same domains.
        path: Where to write the figure; ``.png``, ``.svg`` or ``.pdf``.
        errors: ``{method: {domain: std}}`` drawn as ± error bars (same unit as the accuracies); a
            method or domain left out has none.
        title: Drawn above the axes.
        mean: Add a "mean" group, the mean over domains; its error bar is ``errors[method]["mean"]`` if
            given (the std of the mean over seeds is not a function of the per-domain stds).
        percent: Whether accuracies are percentages; None: fractions if every value is <= 1.

    Returns:
        The path written.
    """
    methods, domains, acc = _results(results)
    if mean and "mean" in domains:
        raise ValueError('a domain is named "mean"; rename it or pass mean=False')
    factor = _factor(acc, percent)
    acc = acc * factor
    if mean:
        acc = np.column_stack([acc, acc.mean(axis=1)])
        domains = [*domains, "mean"]
    err = _errors(errors or {}, methods, domains) * factor
    width = 0.8 / len(methods)
    figure = _figure((max(3.3, 0.22 * len(methods) * len(domains) + 1.4), 2.6), title)
    ax = figure.add_subplot()
    x = np.arange(len(domains))
    for k, method in enumerate(methods):
        yerr = err[k] if np.isfinite(err[k]).any() else None
        ax.bar(x + (k - (len(methods) - 1) / 2) * width, acc[k], width, yerr=yerr, capsize=1.5,
               label=method, error_kw={"lw": 0.6})  # fmt: skip
    ax.set_xticks(
        x, domains, rotation=30 if len(domains) > 4 else 0, ha="right" if len(domains) > 4 else "center"
    )
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3, lw=0.5)
    ax.set_axisbelow(True)
    figure.legend(
        frameon=False, fontsize=FONT_SIZE - 1, ncols=min(len(methods), 4), loc="outside lower center"
    )
    return _save(figure, path)


# ---------------------------------------------------------------------- checks
def _names(names: Sequence[str], what: str) -> list[str]:
    if isinstance(names, str) or not all(isinstance(n, str) and n for n in names):
        raise TypeError(f"{what} must be a list of non-empty strings, got {names!r}")
    if not names:
        raise ValueError(f"{what} is empty; pass one name per domain")
    if len(set(names)) != len(names):
        raise ValueError(f"{what} repeats a name: {list(names)}; names must be unique")
    return list(names)


def _table(matrix: Any, rows: int, columns: int) -> np.ndarray:
    m = [np.asarray(r, dtype=np.float64).reshape(-1) for r in matrix]
    if len(m) != rows:
        raise ValueError(f"the matrix has {len(m)} rows for {rows} row_names; pass one name per row")
    ragged = [i for i, r in enumerate(m) if len(r) != columns]
    if ragged:
        raise ValueError(
            f"row {ragged[0]} has {len(m[ragged[0]])} entries for {columns} names; every row needs one "
            "entry per domain (NaN where not measured)"
        )
    return np.stack(m)


def _factor(values: np.ndarray, percent: bool | None) -> float:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        raise ValueError("no finite accuracy to plot; pass measured accuracies")
    if finite.min() < 0 or finite.max() > 100 or (percent is False and finite.max() > 1):
        raise ValueError(
            f"accuracies span {finite.min():g} to {finite.max():g}; pass fractions in [0, 1] or percentages "
            "in [0, 100]"
        )
    if percent is None:
        percent = bool(finite.max() > 1)
    return 1.0 if percent else 100.0


def _series(
    points: Mapping[str, Sequence[Point]],
) -> dict[str, list[tuple[float, float, str | None, float | None]]]:
    if not isinstance(points, Mapping) or not points:
        raise ValueError("points is empty; pass {method: [(parameters, accuracy), ...]}")
    out = {}
    for method, pts in points.items():
        if not pts:
            raise ValueError(f"method {method!r} has no points; pass at least one (parameters, accuracy)")
        out[str(method)] = []
        for p in pts:
            if not 2 <= len(p) <= 4:
                raise ValueError(f"point {p!r} of {method!r}: pass (parameters, accuracy[, label[, std]])")
            x, y, label, std = (*p, None, None)[:4]
            if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (x, y)) or x <= 0:
                raise ValueError(f"point {p!r} of {method!r}: parameters must be > 0 and accuracy finite")
            out[str(method)].append((float(x), float(y), label, None if std is None else float(std)))
    return out


def _results(results: Mapping[str, Mapping[str, float]]) -> tuple[list[str], list[str], np.ndarray]:
    if not isinstance(results, Mapping) or not results:
        raise ValueError("results is empty; pass {method: {domain: accuracy}}")
    methods = _names(list(results), "methods")
    domains = list(next(iter(results.values())))
    if not domains:
        raise ValueError(f"method {methods[0]!r} has no domains; pass {{domain: accuracy}}")
    for method, accs in results.items():
        if set(accs) != set(domains):
            missing, extra = set(domains) - set(accs), set(accs) - set(domains)
            raise ValueError(
                f"method {method!r} has other domains than {methods[0]!r} (missing {sorted(missing)}, extra "
                f"{sorted(extra)}); every method needs the same domains"
            )
    acc = np.array([[float(results[m][d]) for d in domains] for m in methods])
    if not np.isfinite(acc).all():
        raise ValueError("an accuracy is not finite; every method and domain needs a measured accuracy")
    return methods, domains, acc


def _errors(errors: Mapping[str, Mapping[str, float]], methods: list[str], domains: list[str]) -> np.ndarray:
    unknown = [m for m in errors if m not in methods] + [
        d for e in errors.values() for d in e if d not in domains
    ]
    if unknown:
        raise ValueError(f"errors names {unknown}, not in results; use the methods and domains of results")
    given = [float(e[d]) for e in errors.values() for d in e]
    if not all(math.isfinite(v) and v >= 0 for v in given):
        raise ValueError(f"errors must be finite standard deviations >= 0, got {given}")
    # NaN where no error is given: matplotlib draws no bar there (0 would draw a flat cap).
    return np.array([[float(errors.get(m, {}).get(d, math.nan)) for d in domains] for m in methods])


# ---------------------------------------------------------------------- drawing and writing
def _figure(size: tuple[float, float], title: str | None):
    from matplotlib.figure import Figure

    figure = Figure(figsize=size, layout="constrained")
    if title:
        figure.suptitle(title, fontsize=FONT_SIZE + 1)
    return figure


def _save(figure, path: str | os.PathLike) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"cannot write a figure to {path}: name it .png, .svg or .pdf")
    if not path.parent.is_dir():
        raise ValueError(f"cannot write {path}: folder {path.parent} does not exist; create it first")
    FigureCanvasAgg(figure)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:  # the umask's permissions, unlike mkstemp's 0600
            figure.savefig(f, format=suffix[1:], dpi=PNG_DPI, metadata=_metadata(suffix))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _metadata(suffix: str) -> dict[str, Any]:
    # No creation date, so the same figure is the same bytes (docs/img/ stays stable under git).
    if suffix == ".png":
        return {"Software": "adapterkit"}
    if suffix == ".svg":
        return {"Date": None}
    return {"CreationDate": None}
