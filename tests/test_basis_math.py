"""Numerics of the shared basis: joint SVD compression, rank budgets and the append-only basis."""

import math

import pytest
import torch

from adapterkit.basis import (
    effective_adapter,
    extend_basis,
    joint_compress,
    resolve_rank,
)

TOL = 1e-5  # float32 reconstruction tolerance (relative Frobenius error)


def _alphas(n: int, c_out: int = 32, c_in: int = 32, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(c_out, c_in, generator=g) for _ in range(n)]


@pytest.mark.parametrize("rank", [32, 1.0])
def test_full_rank_reconstructs_exactly(rank):
    alphas = _alphas(5)
    jb = joint_compress(alphas, basis_rank=rank)
    assert jb.beta.shape == (32, 32) and all(g.shape == (32, 32) for g in jb.gammas)
    assert max(jb.errors) < TOL
    for a, g in zip(alphas, jb.gammas, strict=True):
        torch.testing.assert_close(jb.beta @ g.T, a, rtol=1e-4, atol=1e-4)


def test_domains_may_differ_in_c_in():
    alphas = [torch.randn(32, 16), torch.randn(32, 48), torch.randn(32, 8)]
    jb = joint_compress(alphas, basis_rank=32)
    assert [g.shape for g in jb.gammas] == [(16, 32), (48, 32), (8, 32)]
    assert max(jb.errors) < TOL
    with pytest.raises(ValueError, match="share C_out"):
        joint_compress([torch.randn(32, 8), torch.randn(16, 8)], basis_rank=4)


def test_truncation_is_optimal_eckart_young():
    alphas = _alphas(8, 16, 16)  # wide stack: exercises the QR route
    s = torch.linalg.svdvals(torch.cat(alphas, dim=1).double())
    for k in (3, 8, 16):
        jb = joint_compress(alphas, basis_rank=k)
        residual = sum((e * float(a.double().norm())) ** 2 for e, a in zip(jb.errors, alphas, strict=True))
        assert residual == pytest.approx(float((s[k:] ** 2).sum()), rel=1e-3, abs=1e-6)
        torch.testing.assert_close(jb.singular_values.double(), s, rtol=1e-4, atol=1e-4)


def test_float_rank_is_a_share_of_c():
    assert joint_compress(_alphas(4, 64, 64), basis_rank=0.5).rank == 32
    assert resolve_rank(torch.ones(64), rank=0.5, max_rank=64) == 32
    assert resolve_rank(torch.ones(3), rank=0.5, max_rank=3) == 2  # rounded up, never 0


def test_error_falls_monotonically_with_rank():
    alphas = _alphas(6)
    previous = [math.inf] * len(alphas)
    for k in range(1, 33):
        errors = joint_compress(alphas, basis_rank=k).errors
        assert all(e <= p + 1e-6 for e, p in zip(errors, previous, strict=True)), k
        previous = errors
    assert max(previous) < TOL


def test_energy_one_loses_nothing():
    g = torch.Generator().manual_seed(1)
    # A rank-deficient stack: every adapter lives in the same 5-dimensional column space.
    basis = torch.randn(32, 5, generator=g)
    alphas = [basis @ torch.randn(5, 32, generator=g) for _ in range(4)]
    jb = joint_compress(alphas, energy=1.0)
    assert max(jb.errors) < TOL
    assert max(joint_compress(_alphas(3), energy=1.0).errors) < TOL


def test_energy_picks_smallest_rank_reaching_the_share():
    s = torch.tensor([4.0, 3.0, 2.0, 1.0])  # squared: 16, 9, 4, 1 of 30
    assert resolve_rank(s, energy=0.5, max_rank=4) == 1
    assert resolve_rank(s, energy=25 / 30, max_rank=4) == 2  # an exact share is not lost to round-off
    assert resolve_rank(s, energy=0.84, max_rank=4) == 3
    assert resolve_rank(torch.tensor([1.0, 1.0]), energy=0.5, max_rank=2) == 1
    assert resolve_rank(torch.tensor([3.0, 1.0, 0.0, 0.0]), energy=1.0, max_rank=4) == 2
    assert resolve_rank(torch.zeros(4), energy=0.9, max_rank=4) == 0


BAD_BUDGETS = [
    (dict(rank=0), "rank=0"),
    (dict(rank=-2), "negative"),
    (dict(rank=33), "exceeds the layer's largest rank, 32"),
    (dict(rank=True), "not a number"),
    (dict(rank=1.5), r"\(0, 1\]"),
    (dict(rank=float("nan")), r"\(0, 1\]"),
    (dict(energy=float("nan")), "energy=nan"),
    (dict(energy=float("inf")), "energy=inf"),
    (dict(energy=0.0), r"energy=0.0 must be in \(0, 1\]"),
    (dict(energy=1.01), r"must be in \(0, 1\]"),
    (dict(rank=4, energy=0.9), "exactly one"),
    (dict(), "exactly one"),
]


@pytest.mark.parametrize("kwargs, match", BAD_BUDGETS)
def test_bad_budgets_raise_helpful_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        resolve_rank(torch.ones(32), max_rank=32, **kwargs)
    with pytest.raises(ValueError, match=match):
        joint_compress(_alphas(1), **{"basis_rank" if k == "rank" else k: v for k, v in kwargs.items()})


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(new_columns=-1), "negative"), (dict(energy=float("nan")), "energy=nan"), (dict(), "exactly one")],
)
def test_extend_basis_rejects_bad_budgets(kwargs, match):
    with pytest.raises(ValueError, match=match):
        extend_basis(torch.zeros(32, 0), torch.randn(32, 32), **kwargs)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="at least one"):
        joint_compress([], basis_rank=1)
    with pytest.raises(ValueError, match="2-D"):
        joint_compress([torch.randn(8, 8, 1, 1)], basis_rank=1)
    with pytest.raises(ValueError, match="share C_out"):
        extend_basis(torch.randn(16, 4), torch.randn(32, 32), new_columns=1)
    with pytest.raises(ValueError, match="never exceeds C_out"):
        extend_basis(torch.randn(8, 9), torch.randn(8, 8), new_columns=1)


def test_outputs_keep_dtype_and_carry_no_grad():
    a64 = [torch.randn(16, 16, dtype=torch.float64) for _ in range(2)]
    jb = joint_compress(a64, basis_rank=16)
    assert jb.beta.dtype == torch.float64 and max(jb.errors) < 1e-12
    a = [torch.randn(16, 16, requires_grad=True)]
    jb = joint_compress([x.to(torch.bfloat16) for x in a], basis_rank=8)
    assert jb.beta.dtype == torch.bfloat16 and not jb.beta.requires_grad
    ext = extend_basis(torch.zeros(16, 0), a[0], new_columns=4)
    assert not ext.gamma.requires_grad and not ext.new_columns.requires_grad


def test_extend_keeps_old_domains_bit_identical():
    joint = joint_compress(_alphas(3, 64, 64), basis_rank=16)
    beta, gammas = joint.beta, list(joint.gammas)
    for alpha in _alphas(2, 64, 64, seed=1):  # two incremental domains on top of the joint basis
        ext = extend_basis(beta, alpha, new_columns=8)
        beta = torch.cat([beta, ext.new_columns], dim=1)
        gammas.append(ext.gamma)
    before_beta = beta.clone()
    before = [effective_adapter(beta, g) for g in gammas]
    manual = [beta[:, : g.shape[1]] @ g.T for g in gammas]
    for alpha in _alphas(3, 64, 64, seed=2):
        ext = extend_basis(beta, alpha, energy=0.9)
        assert ext.new_columns.shape[1] > 0
        beta = torch.cat([beta, ext.new_columns], dim=1)
    assert torch.equal(beta[:, : before_beta.shape[1]], before_beta)
    for g, old, old_manual in zip(gammas, before, manual, strict=True):
        assert torch.equal(effective_adapter(beta, g), old)
        assert torch.equal(beta[:, : g.shape[1]] @ g.T, old_manual)


def test_extend_reconstructs_with_the_new_columns():
    beta = torch.zeros(32, 0)
    for alpha in _alphas(3):
        ext = extend_basis(beta, alpha, new_columns=32)
        beta = torch.cat([beta, ext.new_columns], dim=1)
        assert ext.error < TOL
        torch.testing.assert_close(effective_adapter(beta, ext.gamma), alpha, rtol=1e-4, atol=1e-4)


def test_alpha_inside_the_span_appends_nothing():
    g = torch.Generator().manual_seed(3)
    beta = torch.randn(64, 20, generator=g)
    alpha = beta @ torch.randn(48, 20, generator=g).T
    ext = extend_basis(beta, alpha, energy=1.0)
    assert ext.new_columns.shape == (64, 0) and ext.gamma.shape == (48, 20)
    assert ext.projection_error < TOL and ext.error < TOL
    # A rank-deficient basis (duplicated columns) is handled by the least-squares projection too.
    ext = extend_basis(torch.cat([beta, beta[:, :5]], dim=1), alpha, new_columns=8)
    assert ext.new_columns.shape[1] == 0 and ext.error < TOL


def test_project_only_and_energy_budget():
    g = torch.Generator().manual_seed(4)
    beta, alpha = torch.randn(64, 16, generator=g), torch.randn(64, 64, generator=g)
    ext = extend_basis(beta, alpha, new_columns=0)
    assert ext.new_columns.shape[1] == 0 and ext.gamma.shape == (64, 16)
    assert ext.error == pytest.approx(ext.projection_error, rel=1e-4)
    ext = extend_basis(beta, alpha, energy=0.8)
    # The new columns capture at least 80% of the residual's energy.
    assert ext.error**2 <= 0.2 * ext.projection_error**2 + 1e-6
    assert ext.error < ext.projection_error


def test_basis_never_exceeds_c_out():
    beta = torch.zeros(32, 0)
    for alpha in _alphas(8, 32, 16):
        ext = extend_basis(beta, alpha, new_columns=8)
        beta = torch.cat([beta, ext.new_columns], dim=1)
        assert beta.shape[1] <= 32
    assert beta.shape[1] == 32
    ext = extend_basis(beta, torch.randn(32, 16), new_columns=8)
    assert ext.new_columns.shape[1] == 0 and ext.error < TOL  # a saturated basis expresses anything
