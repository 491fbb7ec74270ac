"""Continual-learning metrics: the accuracy matrix, ACC, BWT, forgetting and the Visual Decathlon score.

``R[i, j]`` is the accuracy on domain j measured after training domain i; entries above the diagonal
(domains not trained yet) may be NaN. Any accuracy unit works (fractions or percent) as long as it is
consistent; the Decathlon score takes errors as fractions in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Real

import numpy as np

__all__ = [
    "ContinualReport",
    "accuracy_matrix",
    "average_accuracy",
    "backward_transfer",
    "decathlon_score",
    "forgetting",
    "format_matrix",
    "format_table",
]

MatrixLike = Sequence[Sequence[float]] | np.ndarray


def accuracy_matrix(rows: MatrixLike) -> np.ndarray:
    """Builds and validates a T x T accuracy matrix (float64, NaN above the diagonal allowed).

    Rows may be ragged: row i needs only its first i + 1 entries (the domains trained so far), the rest is
    filled with NaN, so one can append ``[acc(d) for d in domains[: i + 1]]`` after each domain.
    Torch tensors work too (anything ``np.asarray`` accepts row by row).

    Raises:
        ValueError: A row too long or too short, or a missing / non-finite entry on or below the diagonal.

    Example:
        >>> accuracy_matrix([[0.9], [0.9, 0.8]])
        array([[0.9, nan],
               [0.9, 0.8]])
    """
    rows = [np.asarray(r, dtype=np.float64).reshape(-1) for r in rows]
    t = len(rows)
    if t == 0:
        raise ValueError("the accuracy matrix is empty; record at least one row (after the first domain)")
    out = np.full((t, t), np.nan)
    for i, row in enumerate(rows):
        if not i + 1 <= len(row) <= t:
            raise ValueError(
                f"row {i} has {len(row)} entries; after training domain {i} it needs {i + 1} to {t} "
                "(accuracy on domains 0..i, optionally later ones)"
            )
        out[i, : len(row)] = row
    for i, j in zip(*np.tril_indices(t), strict=True):
        if not math.isfinite(out[i, j]):
            raise ValueError(
                f"R[{i}][{j}] = {out[i, j]} is not finite; entries with j <= i must be measured accuracies"
            )
    return out


def average_accuracy(r: MatrixLike) -> float:
    """ACC: mean accuracy over all domains after training the last one, ``mean_j R[T-1, j]``.

    Example:
        >>> average_accuracy([[0.9], [0.8, 0.6]])
        0.7
    """
    m = accuracy_matrix(r)
    return float(m[-1].mean())


def backward_transfer(r: MatrixLike) -> float:
    """BWT (Lopez-Paz & Ranzato): ``mean_{j<T-1} (R[T-1, j] - R[j, j])``; 0 for a single domain.

    Exactly 0 when no column changes after its domain is trained (adapterkit's no-forgetting invariant).

    Example:
        >>> round(backward_transfer([[0.9], [0.8, 0.6]]), 4)
        -0.1
    """
    m = accuracy_matrix(r)
    t = m.shape[0]
    if t == 1:
        return 0.0
    return float(np.mean([m[-1, j] - m[j, j] for j in range(t - 1)]))


def forgetting(r: MatrixLike) -> float:
    """Average forgetting (Chaudhry et al.): ``mean_{j<T-1} max_{j<=i<T-1} R[i, j] - R[T-1, j]``.

    Example:
        >>> round(forgetting([[0.9, None], [0.95, 0.7], [0.8, 0.7, 0.6]]), 4)
        0.075
    """
    m = accuracy_matrix(r)
    t = m.shape[0]
    if t == 1:
        return 0.0
    return float(np.mean([m[j : t - 1, j].max() - m[-1, j] for j in range(t - 1)]))


def decathlon_score(
    errors: Mapping[str, float], baseline_errors: Mapping[str, float]
) -> tuple[float, dict[str, float]]:
    """Visual Decathlon score ``S = sum_d alpha_d max(0, E_max_d - E_d)^2``.

    ``E_max_d = 2 E_base_d`` and ``alpha_d = 1000 / E_max_d^2``: a domain at its baseline error scores 250,
    a perfect one 1000, one at twice the baseline error or worse 0.

    Args:
        errors: Test error per domain, a fraction in [0, 1].
        baseline_errors: The fine-tuned baseline's error per domain, in (0, 1]; extra domains are ignored.

    Returns:
        The total and the per-domain scores.

    Example:
        >>> decathlon_score({"gtsrb": 0.1, "dtd": 0.0}, {"gtsrb": 0.1, "dtd": 0.4})
        (1250.0, {'gtsrb': 250.0, 'dtd': 1000.0})
    """
    if not errors:
        raise ValueError("errors is empty; pass {domain: test error in [0, 1]}")
    per_domain: dict[str, float] = {}
    for name, err in errors.items():
        if name not in baseline_errors:
            raise ValueError(
                f"no baseline error for domain {name!r}; baseline_errors has {sorted(baseline_errors)}"
            )
        base = baseline_errors[name]
        for what, value in (("error", err), ("baseline error", base)):
            valid = isinstance(value, Real) and not isinstance(value, bool)
            if not (valid and math.isfinite(value) and 0.0 <= value <= 1.0):
                raise ValueError(
                    f"{what} of {name!r} is {value!r}; pass a fraction in [0, 1] (e.g. 0.12, not 12%)"
                )
        if base == 0.0:
            raise ValueError(f"baseline error of {name!r} is 0, so alpha_d = 1000 / (2 * 0)^2 is undefined")
        e_max = 2.0 * base
        # alpha_d * max(0, E_max - E)^2 written as a ratio so that 250 and 1000 come out exact.
        per_domain[name] = 1000.0 * (max(0.0, e_max - err) / e_max) ** 2
    return float(sum(per_domain.values())), per_domain


def format_matrix(r: MatrixLike, names: Sequence[str] | None = None, *, digits: int = 2) -> str:
    """Plain-text table of R: one row per training step, one column per evaluated domain, NaN as "-".

    Example:
        >>> print(format_matrix([[0.9], [0.9, 0.8]], ["a", "b"]))
        after \\ on     a     b
        a           0.90     -
        b           0.90  0.80
    """
    m = accuracy_matrix(r)
    names = [str(i) for i in range(m.shape[0])] if names is None else list(names)
    if len(names) != m.shape[0]:
        raise ValueError(
            f"got {len(names)} names for a {m.shape[0]} x {m.shape[0]} matrix; pass one per domain"
        )
    cells = [["-" if math.isnan(v) else f"{v:.{digits}f}" for v in row] for row in m]
    head = "after \\ on"
    w0 = max(len(head), *(len(n) for n in names))
    w = max(len(n) for n in names + [c for row in cells for c in row])
    lines = [head.ljust(w0) + "".join(f"  {n:>{w}}" for n in names)]
    lines += [n.ljust(w0) + "".join(f"  {c:>{w}}" for c in row) for n, row in zip(names, cells, strict=True)]
    return "\n".join(lines)


def format_table(rows: Sequence[Sequence[object]], headers: Sequence[str]) -> str:
    """Plain-text table: text columns left-aligned, numbers right-aligned (floats below 10 with 4
    decimals, larger ones with 1).

    Example:
        >>> print(format_table([["gtsrb", 0.9712, 43]], ["domain", "accuracy", "classes"]))
        domain  accuracy  classes
        gtsrb     0.9712       43
    """
    cells = [[_cell(v) for v in row] for row in rows]
    if any(len(row) != len(headers) for row in cells):
        raise ValueError(f"every row needs {len(headers)} cells, one per header")
    numeric = [bool(rows) and all(isinstance(row[i], Real) for row in rows) for i in range(len(headers))]
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True)]
        return "  ".join(parts).rstrip()

    return "\n".join([line(list(headers)), *(line(row) for row in cells)])


def _cell(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


@dataclass(frozen=True)
class ContinualReport:
    """ACC, BWT and forgetting of one accuracy matrix, with its table.

    Example:
        >>> rep = ContinualReport.from_matrix([[0.9], [0.9, 0.8]], ["a", "b"])
        >>> round(rep.acc, 4), rep.bwt, rep.forgetting
        (0.85, 0.0, 0.0)
    """

    names: tuple[str, ...]
    matrix: np.ndarray
    acc: float
    bwt: float
    forgetting: float

    @classmethod
    def from_matrix(cls, r: MatrixLike, names: Sequence[str]) -> ContinualReport:
        m = accuracy_matrix(r)
        if len(names) != m.shape[0]:
            raise ValueError(f"got {len(names)} names for {m.shape[0]} domains; pass one name per domain")
        return cls(tuple(names), m, average_accuracy(m), backward_transfer(m), forgetting(m))

    def __str__(self) -> str:
        table = format_matrix(self.matrix, self.names)
        return f"{table}\nACC {self.acc:.4f}  BWT {self.bwt:+.4f}  forgetting {self.forgetting:.4f}"
