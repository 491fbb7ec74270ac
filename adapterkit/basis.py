"""Shared adapter basis: the paper's joint SVD compression and an incremental, append-only basis.

Per layer, ``alpha_t`` (C_out x C_in) ~ ``beta @ gamma_t.T`` with a shared ``beta`` (C_out x K). Domain t's
prefix rank ``k_t`` is the width of its ``gamma_t``; it computes ``beta[:, :k_t] @ gamma_t.T``, so columns
appended later never change its output, bit for bit. Pure functions of 2-D tensors, no module state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral, Real

import torch
from torch import Tensor


@dataclass
class JointBasis:
    """Result of :func:`joint_compress`: ``alphas[t] ~ beta @ gammas[t].T``.

    Attributes:
        beta: Shared basis, C_out x K.
        gammas: Per-domain coefficients, each C_in_t x K.
        singular_values: All singular values of the stacked adapters, descending (float32/64).
        errors: Per-domain relative Frobenius error ``||alpha_t - beta gamma_t^T|| / ||alpha_t||``.
    """

    beta: Tensor
    gammas: list[Tensor]
    singular_values: Tensor
    errors: list[float]

    @property
    def rank(self) -> int:
        return self.beta.shape[1]


@dataclass
class BasisExtension:
    """Result of :func:`extend_basis`: ``alpha ~ torch.cat([beta, new_columns], 1) @ gamma.T``.

    Attributes:
        new_columns: Columns to append to the basis, C_out x m (m may be 0).
        gamma: The new domain's coefficients, C_in x (K + m); its width is the domain's prefix rank.
        error: Relative reconstruction error with the extended basis.
        projection_error: Relative error of the projection on the old basis alone (before appending).
        residual_rank: Directions of the residual above round-off: the columns an exact extension needs.
            ``new_columns`` holds fewer when the budget or the room left (C_out - K) is smaller; then
            ``error`` is the price.
    """

    new_columns: Tensor
    gamma: Tensor
    error: float
    projection_error: float
    residual_rank: int = 0

    @property
    def exact(self) -> bool:
        """True when every direction of the residual above round-off was appended (nothing projected)."""
        return self.new_columns.shape[1] >= self.residual_rank


def _check_budget(rank: int | float | None, energy: float | None, name: str = "rank") -> None:
    """`rank` is the budget under the caller's own name (`basis_rank`, `new_columns`)."""
    if (rank is None) == (energy is None):
        raise ValueError(
            f"pass exactly one of {name}= or energy=, got {name}={rank!r}, energy={energy!r}; "
            f"e.g. {name}=32 (absolute), {name}=0.5 (share of C) or energy=0.95 (share of squared singular values)"
        )
    if rank is not None:
        if isinstance(rank, bool) or not isinstance(rank, Real):
            raise ValueError(f"{name}={rank!r} is not a number; pass an int (absolute) or a float in (0, 1]")
        if isinstance(rank, Integral):
            if rank < 0:
                raise ValueError(f"{name}={rank} is negative; pass {name} >= 1 (new_columns also takes 0)")
        elif not (math.isfinite(rank) and 0.0 < rank <= 1.0):
            raise ValueError(
                f"float {name}={rank!r} must be a share of C in (0, 1]; for an absolute count pass an int"
            )
    if energy is not None:
        if isinstance(energy, bool) or not isinstance(energy, Real):
            raise ValueError(f"energy={energy!r} is not a number; pass a float in (0, 1], e.g. 0.95")
        if not (math.isfinite(energy) and 0.0 < energy <= 1.0):
            raise ValueError(
                f"energy={energy!r} must be in (0, 1], e.g. 0.95; 1.0 keeps every non-zero direction"
            )


def resolve_rank(
    singular_values: Tensor, *, rank: int | float | None = None, energy: float | None = None, max_rank: int
) -> int:
    """Turns a rank or energy budget into a rank K.

    Args:
        singular_values: Singular values in descending order (as returned by ``torch.linalg.svd``).
        rank: An int is the absolute K (1 <= K <= max_rank). A float in (0, 1] is a share of
            ``max_rank``, rounded up: pass ``max_rank=min(C_out, C_in)`` so that ``rank=0.5`` means K = C/2.
        energy: The smallest K whose squared singular values reach this share of their total;
            1.0 keeps every non-zero singular value, so it loses nothing.
        max_rank: The largest admissible K (the caller's C).

    Returns:
        K, at most ``max_rank``; 0 only for an energy budget on all-zero singular values.

    Raises:
        ValueError: Both or neither budget given, or a budget out of range; the message says the fix.

    Example:
        >>> resolve_rank(torch.tensor([3.0, 1.0, 0.0]), energy=1.0, max_rank=3)
        2
        >>> resolve_rank(torch.ones(64), rank=0.5, max_rank=64)
        32
    """
    _check_budget(rank, energy)
    if isinstance(max_rank, bool) or not isinstance(max_rank, Integral) or max_rank < 1:
        raise ValueError(f"max_rank={max_rank!r} must be an int >= 1 (the caller's C, e.g. min(C_out, C_in))")
    if rank is not None:
        if isinstance(rank, Integral):
            if rank == 0:
                raise ValueError("rank=0 keeps nothing; pass rank >= 1, a float share in (0, 1] or energy=")
            if rank > max_rank:
                raise ValueError(
                    f"rank={rank} exceeds the layer's largest rank, {max_rank} (its smaller channel count); "
                    f"pass rank <= {max_rank} or a float share such as 0.5"
                )
            return int(rank)
        return min(max_rank, max(1, math.ceil(rank * max_rank - 1e-9)))
    s2 = singular_values.detach().flatten().double() ** 2
    nonzero = int((s2 > 0).sum())
    if nonzero == 0 or energy >= 1.0:
        return min(nonzero, max_rank)
    cum = torch.cumsum(s2, 0)
    # A tiny relative slack so that an exact share (e.g. 0.5 of two equal values) is not lost to round-off.
    k = int(torch.searchsorted(cum, cum[-1] * energy * (1.0 - 1e-12))) + 1
    return min(k, nonzero, max_rank)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _relative(diff: Tensor, ref: Tensor) -> float:
    ref_norm = float(torch.linalg.matrix_norm(ref))
    return 0.0 if ref_norm == 0.0 else float(torch.linalg.matrix_norm(diff)) / ref_norm


def _check_matrix(name: str, x: Tensor) -> None:
    if not isinstance(x, Tensor) or x.ndim != 2 or not x.is_floating_point():
        got = f"shape {tuple(x.shape)}, {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(
            f"{name} must be a 2-D floating tensor (C_out x C_in), got {got}; flatten 1x1 conv weights first"
        )


def effective_adapter(beta: Tensor, gamma: Tensor) -> Tensor:
    """The adapter a domain computes: ``beta[:, :k] @ gamma.T`` with k = ``gamma.shape[1]``.

    The prefix is made contiguous so the matmul sees the same memory layout however wide the basis grows.

    Example:
        >>> effective_adapter(torch.eye(4), torch.ones(3, 2)).shape
        torch.Size([4, 3])
    """
    k = gamma.shape[1]
    if k > beta.shape[1]:
        raise ValueError(f"gamma has prefix rank {k} but the basis has only {beta.shape[1]} columns")
    return beta[:, :k].contiguous() @ gamma.T


def reconstruction_error(alpha: Tensor, beta: Tensor, gamma: Tensor) -> float:
    """Relative Frobenius error ``||alpha - beta[:, :k] gamma^T|| / ||alpha||`` (0 for a zero alpha).

    Example:
        >>> reconstruction_error(torch.eye(3), torch.eye(3), torch.eye(3))
        0.0
    """
    with torch.no_grad():
        wd = _work_dtype(alpha.dtype)
        approx = effective_adapter(beta.detach().to(wd), gamma.detach().to(wd))
        return _relative(alpha.detach().to(wd) - approx, alpha.detach().to(wd))


def joint_compress(
    alphas: Sequence[Tensor], *, basis_rank: int | float | None = None, energy: float | None = None
) -> JointBasis:
    """The paper's joint compression: SVD of ``[alpha_1 ... alpha_T]``, truncated to rank K.

    Domains may have different C_in (they share C_out). A float ``rank`` is a share of
    ``min(C_out, max C_in)`` (C for square C x C adapters); an int may go up to ``min(C_out, sum C_in)``.
    The SVD runs in float32 (float64 for float64 input) under ``no_grad``; results have the input dtype.

    Args:
        alphas: Per-domain adapters, each C_out x C_in_t, same dtype and device.
        basis_rank: Absolute K (int) or share of C (float in (0, 1]).
        energy: Share of the stacked adapters' squared singular values to keep, in (0, 1].

    Example:
        >>> alphas = [torch.randn(64, 64) for _ in range(10)]
        >>> jb = joint_compress(alphas, basis_rank=0.5)
        >>> jb.beta.shape, jb.gammas[0].shape
        (torch.Size([64, 32]), torch.Size([64, 32]))
    """
    alphas = list(alphas)
    if not alphas:
        raise ValueError("joint_compress needs at least one adapter; got an empty sequence")
    _check_budget(basis_rank, energy, "basis_rank")
    for t, a in enumerate(alphas):
        _check_matrix(f"alphas[{t}]", a)
    c_out, dtype, device = alphas[0].shape[0], alphas[0].dtype, alphas[0].device
    for t, a in enumerate(alphas):
        if a.shape[0] != c_out or a.dtype != dtype or a.device != device:
            raise ValueError(
                f"alphas[{t}] is {tuple(a.shape)} {a.dtype} on {a.device} but alphas[0] is "
                f"{tuple(alphas[0].shape)} {dtype} on {device}; all domains of a layer share C_out, dtype, device"
            )
    widths, rank = [a.shape[1] for a in alphas], basis_rank
    with torch.no_grad():
        stacked = torch.cat([a.detach().to(_work_dtype(dtype)) for a in alphas], dim=1)
        if stacked.shape[1] > 2 * c_out:
            # Wide stack (many domains): A^T = QR, then the SVD of the small R^T. Same factors, several
            # times faster than LAPACK on the wide matrix, and only the K kept columns of V are formed.
            q, r = torch.linalg.qr(stacked.T)
            u, s, vh = torch.linalg.svd(r.T)
        else:
            q, (u, s, vh) = None, torch.linalg.svd(stacked, full_matrices=False)
        float_share = rank is not None and not isinstance(rank, Integral)
        c = min(c_out, max(widths)) if float_share else min(stacked.shape)
        k = resolve_rank(s, rank=rank, energy=energy, max_rank=c)
        beta = (u[:, :k] * s[:k]).to(dtype)
        v = vh[:k].T if q is None else q @ vh[:k].T
        gammas = [g.contiguous().to(dtype) for g in v.split(widths, dim=0)]
    errors = [reconstruction_error(a, beta, g) for a, g in zip(alphas, gammas, strict=True)]
    return JointBasis(beta=beta, gammas=gammas, singular_values=s, errors=errors)


# Over 60 lines with its docstring and input checks; the maths is one projection and one SVD.
def extend_basis(
    beta: Tensor, alpha: Tensor, *, new_columns: int | float | None = None, energy: float | None = None
) -> BasisExtension:
    """Expresses a new domain's adapter on the basis, appending what the basis cannot express.

    ``alpha`` is projected (least squares, robust to a rank-deficient or empty ``beta``) on the span of
    ``beta``; the residual's leading left singular vectors (orthonormal, orthogonal to that span) are the
    new columns, under the budget. The basis never exceeds C_out columns: once it spans everything, m = 0.
    Old columns are untouched, so domains built on a prefix of ``beta`` keep their exact outputs.

    Args:
        beta: Current basis, C_out x K (K may be 0), same dtype as ``alpha``.
        alpha: The new domain's trained adapter, C_out x C_in.
        new_columns: Most columns to append: an int (0 = project only) or a share of ``min(C_out, C_in)``.
        energy: Share of the residual's energy the new columns must capture, in (0, 1].

    Example:
        >>> beta = torch.zeros(64, 0)
        >>> for _ in range(3):
        ...     ext = extend_basis(beta, torch.randn(64, 64), new_columns=8)
        ...     beta = torch.cat([beta, ext.new_columns], dim=1)
        >>> beta.shape, ext.gamma.shape
        (torch.Size([64, 24]), torch.Size([64, 24]))
    """
    _check_matrix("beta", beta)
    _check_matrix("alpha", alpha)
    rank = new_columns
    _check_budget(rank, energy, "new_columns")
    (c_out, c_in), k = alpha.shape, beta.shape[1]
    if beta.shape[0] != c_out or beta.dtype != alpha.dtype or beta.device != alpha.device:
        raise ValueError(
            f"beta is {tuple(beta.shape)} {beta.dtype} on {beta.device} but alpha is {tuple(alpha.shape)} "
            f"{alpha.dtype} on {alpha.device}; they must share C_out, dtype and device"
        )
    if k > c_out:
        raise ValueError(f"beta has {k} columns for C_out={c_out}; an append-only basis never exceeds C_out")
    wd = _work_dtype(alpha.dtype)
    with torch.no_grad():
        a, b = alpha.detach().to(wd), beta.detach().to(wd)
        if k:
            u, s, vh = torch.linalg.svd(b, full_matrices=False)
            keep = s > s[0] * max(b.shape) * torch.finfo(wd).eps  # pinv's cutoff: drop dependent columns
            u, s, vh = u[:, keep], s[keep], vh[keep]
            coords = u.T @ a
            coef = vh.T @ (coords / s[:, None])  # K x C_in, the minimum-norm least-squares solution
            residual = a - u @ coords
        else:
            coef, residual = a.new_zeros(0, c_in), a
        # Always decomposed, even with no room or no budget: its rank says whether the result is exact.
        ru, rs, rvh = torch.linalg.svd(residual, full_matrices=False)
        # Directions at round-off level (the input's, the SVDs') are not information: spend no columns on them.
        eps_in, eps_work = torch.finfo(alpha.dtype).eps, torch.finfo(wd).eps
        noise = (4 * eps_in + max(c_out, c_in) * eps_work) * torch.linalg.matrix_norm(a)
        meaningful = int((rs > noise).sum())
        useful = min(meaningful, c_out - k)
        if useful == 0 or rank == 0:
            m = 0
        elif isinstance(rank, Integral):
            m = min(int(rank), useful)
        else:
            budget = resolve_rank(rs[:meaningful], rank=rank, energy=energy, max_rank=min(c_out, c_in))
            m = min(budget, useful)
        appended = ru[:, :m]
        gamma = torch.cat([coef.T, rvh[:m].T * rs[:m]], dim=1)
        projection_error = _relative(residual, a)
        appended, gamma = appended.contiguous().to(alpha.dtype), gamma.contiguous().to(alpha.dtype)
    error = reconstruction_error(alpha, torch.cat([beta.detach(), appended], dim=1), gamma)
    return BasisExtension(appended, gamma, error, projection_error, residual_rank=meaningful)


def check_extends(old: dict[str, Tensor], new: dict[str, Tensor], what: str) -> None:
    """Raise unless every layer's `new` basis starts with its `old` columns, bit for bit (append-only).

    The one check behind every basis change that must not move published domains: installing a
    family's basis in a model, hot-adding a domain, pushing to a repo that already has a basis.

    Example:
        >>> b = torch.randn(8, 2)
        >>> check_extends({"conv": b}, {"conv": torch.cat([b, torch.randn(8, 1)], 1)}, "the basis")
    """
    for name, beta in old.items():
        if beta.shape[1] == 0:
            continue
        longer = new.get(name)
        if (
            longer is None
            or longer.shape[1] < beta.shape[1]
            or not torch.equal(longer[:, : beta.shape[1]].to(device=beta.device, dtype=beta.dtype), beta)
        ):
            raise ValueError(
                f"{what} for layer {name} does not extend the current one: it was re-factorised, which would "
                "change the domains already built on it. Load the family into a fresh AdapterModel, or push "
                "to a new repo (or re-push every domain with force=True)."
            )
