"""Tests of the float64 condition-number core (SPEC §2–§4)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_immunize.conditioning import (
    condition_number,
    data_rank,
    feature_condition_number,
    feature_r_max,
    feature_r_min,
    feature_regularizer,
    feature_spectral_gradient,
    r_max,
    r_min,
    spectral_gradient,
)

F64 = torch.float64


def central_difference(fn, x: torch.Tensor, h: float = 1e-6) -> torch.Tensor:
    grad = torch.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        plus, minus = x.clone(), x.clone()
        plus[idx] += h
        minus[idx] -= h
        grad[idx] = (fn(plus) - fn(minus)) / (2 * h)
    return grad


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def random_psd(k: int, gen: torch.Generator, n: int | None = None) -> torch.Tensor:
    a = torch.randn(n or k + 2, k, generator=gen, dtype=F64)
    return a.T @ a


def eigvalsh_reference(S: torch.Tensor, kind: str) -> torch.Tensor:
    """The regularizers written naively through autograd of ``eigvalsh`` (full rank)."""
    sig = torch.linalg.eigvalsh(S)
    half_mean = (sig**2).sum() / (2 * sig.numel())
    if kind == "r_min":
        return 0.5 * sig[-1] ** 2 - half_mean
    return 1.0 / (half_mean - 0.5 * sig[0] ** 2)


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("kind", ["r_min", "r_max"])
@pytest.mark.parametrize("shape", [(3, 6), (6, 6), (9, 6)])
def test_feature_gradients_match_finite_differences(kind, shape):
    gen = torch.Generator().manual_seed(sum(shape))
    Z = torch.randn(*shape, generator=gen, dtype=F64, requires_grad=True)
    fn = feature_r_min if kind == "r_min" else feature_r_max
    (grad,) = torch.autograd.grad(fn(Z), Z)
    numeric = central_difference(lambda z: fn(z).item(), Z.detach())
    assert rel_err(grad, numeric) < 1e-6


@pytest.mark.parametrize("kind", ["r_min", "r_max"])
def test_matrix_gradients_match_finite_differences_and_eigvalsh(kind):
    gen = torch.Generator().manual_seed(7)
    fn = r_min if kind == "r_min" else r_max
    for _ in range(5):
        A = torch.randn(5, 5, generator=gen, dtype=F64)
        S = (A @ A.T + 0.1 * torch.eye(5, dtype=F64)).requires_grad_()
        (grad,) = torch.autograd.grad(fn(S), S)
        (ref,) = torch.autograd.grad(eigvalsh_reference(S, kind), S)
        assert rel_err(grad, ref) < 1e-9
        assert torch.allclose(fn(S), eigvalsh_reference(S, kind), rtol=1e-12)
        # finite differences on a symmetric parameterisation S = (A + Aᵀ)/2 + c·I
        A0 = S.detach().clone()
        numeric = central_difference(lambda a: fn(0.5 * (a + a.T)).item(), A0)
        assert rel_err(0.5 * (grad + grad.T), numeric) < 1e-6


@pytest.mark.parametrize("kind", ["r_min", "r_max"])
def test_spectral_gradient_matches_autograd(kind):
    gen = torch.Generator().manual_seed(3)
    S = random_psd(6, gen).requires_grad_()
    fn = r_min if kind == "r_min" else r_max
    (grad,) = torch.autograd.grad(fn(S), S)
    value, explicit = spectral_gradient(S, kind)
    assert torch.allclose(value, fn(S).detach())
    assert rel_err(explicit, grad) < 1e-12


# ----------------------------------------------------------------------------- routes


@pytest.mark.parametrize("shape", [(4, 10), (12, 10)])
@pytest.mark.parametrize("kind", ["r_min", "r_max"])
def test_feature_regularizer_is_the_regularizer_and_kappa_from_one_spectrum(shape, kind):
    gen = torch.Generator().manual_seed(shape[0])
    Z = torch.randn(*shape, generator=gen, dtype=F64, requires_grad=True)
    value, kappa = feature_regularizer(Z, kind)
    alone = (feature_r_min if kind == "r_min" else feature_r_max)(Z)
    assert torch.equal(value, alone)  # κ: the same spectrum up to round-off (eigh, not eigvalsh)
    torch.testing.assert_close(kappa, feature_condition_number(Z.detach()), rtol=1e-12, atol=0)
    assert not kappa.requires_grad
    (g1,) = torch.autograd.grad(value, Z)
    (g2,) = torch.autograd.grad(alone, Z)
    assert torch.equal(g1, g2)
    with pytest.raises(ValueError, match="kind must be one of"):
        feature_regularizer(Z, "kappa")


@pytest.mark.parametrize("shape", [(4, 10), (10, 10), (16, 10)])
@pytest.mark.parametrize("kind", ["kappa", "r_min", "r_max"])
def test_gram_route_equals_covariance_route(shape, kind):
    gen = torch.Generator().manual_seed(shape[0])
    Z = torch.randn(*shape, generator=gen, dtype=F64, requires_grad=True)
    feature_fn = {"kappa": feature_condition_number, "r_min": feature_r_min, "r_max": feature_r_max}
    matrix_fn = {"kappa": condition_number, "r_min": r_min, "r_max": r_max}
    rank = min(shape)
    via_features = feature_fn[kind](Z, rank=rank)
    via_matrix = matrix_fn[kind](Z.T @ Z, rank=rank)
    assert torch.allclose(via_features, via_matrix, rtol=1e-9)
    (g1,) = torch.autograd.grad(via_features, Z)
    (g2,) = torch.autograd.grad(via_matrix, Z)
    assert rel_err(g1, g2) < 1e-8
    # the tolerance rule agrees between routes too
    tol_features = feature_fn[kind](Z.detach())
    tol_matrix = matrix_fn[kind](Z.detach().T @ Z.detach())
    assert torch.allclose(tol_features, tol_matrix, rtol=1e-8)


@pytest.mark.parametrize("shape", [(4, 10), (12, 10)])
@pytest.mark.parametrize("kind", ["r_min", "r_max"])
def test_feature_spectral_gradient_both_routes(shape, kind):
    gen = torch.Generator().manual_seed(11)
    Z = torch.randn(*shape, generator=gen, dtype=F64)
    value, grad_S = feature_spectral_gradient(Z, kind)
    ref_value, ref_grad = spectral_gradient(Z.T @ Z, kind, rank=min(shape))
    assert torch.allclose(value, ref_value, rtol=1e-10)
    assert rel_err(grad_S, ref_grad) < 1e-8


def test_batched_matrices_match_one_by_one():
    gen = torch.Generator().manual_seed(5)
    S = torch.stack([random_psd(5, gen) for _ in range(4)])
    Z = torch.randn(3, 4, 7, generator=gen, dtype=F64)
    for fn in (condition_number, r_min, r_max):
        batched = fn(S)
        assert batched.shape == (4,)
        assert torch.allclose(batched, torch.stack([fn(s) for s in S]), rtol=1e-12)
    for fn in (feature_condition_number, feature_r_min, feature_r_max):
        batched = fn(Z)
        assert torch.allclose(batched, torch.stack([fn(z) for z in Z]), rtol=1e-12)


# ----------------------------------------------------------------------------- rank rules


def test_tolerance_rule_ignores_zero_eigenvalues_and_rank_rule_keeps_tiny_ones():
    S = torch.diag(torch.tensor([8.0, 2.0, 1e-3, 0.0], dtype=F64))
    assert condition_number(S).item() == pytest.approx(8000.0)
    assert condition_number(S, rank=2).item() == pytest.approx(4.0)
    assert condition_number(S, rtol=1e-2).item() == pytest.approx(4.0)


def test_data_rank():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(20, 3, generator=gen, dtype=F64) @ torch.randn(3, 8, generator=gen, dtype=F64)
    assert data_rank(X) == 3
    assert data_rank(X, bias=True) == 4
    assert data_rank(torch.zeros(4, 3)) == 0


def test_float32_input_gives_float64_and_grad_in_input_dtype():
    Z = torch.randn(5, 3, requires_grad=True)
    value = feature_r_max(Z)
    assert value.dtype == F64
    value.backward()
    assert Z.grad.dtype == torch.float32 and torch.isfinite(Z.grad).all()


# ----------------------------------------------------------------------------- theorems


def test_gradient_step_of_r_min_decreases_and_r_max_increases_kappa():
    """Theorem A.1(4) / 4.1(4) on 100 random matrices."""
    gen = torch.Generator().manual_seed(2024)
    for trial in range(100):
        k = 2 + trial % 7
        S = random_psd(k, gen)
        kappa = condition_number(S)
        for kind, sign in (("r_min", -1), ("r_max", +1)):
            _, grad = spectral_gradient(S, kind)
            step = 1e-3 * S.norm() / grad.norm()
            moved = condition_number(S - step * grad)
            assert sign * (moved - kappa) > 0, (trial, kind, float(kappa), float(moved))


def test_repeated_extreme_eigenvalue_uses_averaged_projector():
    Q, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(1), dtype=F64))
    S = (Q * torch.tensor([1.0, 2.0, 5.0, 5.0], dtype=F64)) @ Q.T
    _, grad = spectral_gradient(S, "r_min")
    top = Q[:, 2:]
    expected = 5.0 * top @ top.T / 2 - S / 4
    assert torch.allclose(grad, expected, atol=1e-12)
    S_low = (Q * torch.tensor([1.0, 1.0, 3.0, 5.0], dtype=F64)) @ Q.T
    _, grad = spectral_gradient(S_low, "r_max")
    assert torch.isfinite(grad).all()


def test_all_equal_spectrum_is_finite():
    S = 3.0 * torch.eye(4, dtype=F64, requires_grad=True)
    value = r_max(S)
    (grad,) = torch.autograd.grad(value, S)
    assert torch.isfinite(value) and torch.isfinite(grad).all()
    assert r_min(S.detach()).item() == 0.0
    assert condition_number(S.detach()).item() == pytest.approx(1.0)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (torch.ones(3, 4), r"square.*\(3, 4\)"),
        (torch.tensor([[1.0, 2.0], [0.0, 1.0]]), "symmetric"),
        (torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]]), "non-finite S .*first nan"),
        (torch.tensor([[float("inf"), 0.0], [0.0, 1.0]]), "non-finite S .*first inf"),
        (torch.zeros(3, 3), "all zero"),
    ],
)
@pytest.mark.parametrize("fn", [condition_number, r_min, r_max])
def test_bad_matrices_raise(fn, bad, message):
    with pytest.raises(ValueError, match=message):
        fn(bad)


@pytest.mark.parametrize("fn", [feature_condition_number, feature_r_min, feature_r_max])
def test_bad_features_raise(fn):
    with pytest.raises(ValueError, match=r"\(5,\)"):
        fn(torch.ones(5))
    with pytest.raises(ValueError, match="all zero"):
        fn(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="non-finite"):
        fn(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(ValueError, match=r"rank must be an integer in \[1, 2\], got 3"):
        fn(torch.randn(2, 5), rank=3)


def test_unknown_kind_raises():
    with pytest.raises(ValueError, match="'r_mid'"):
        spectral_gradient(torch.eye(2), "r_mid")


# ----------------------------------------------------------------------------- properties


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(2, 12),
    width=st.integers(1, 12),
    rank_frac=st.floats(0.0, 1.0),
    log_scale=st.floats(-8.0, 8.0),
    seed=st.integers(0, 2**16),
    use_rank_rule=st.booleans(),
)
def test_properties_finite_kappa_at_least_one_regularizers_non_negative(
    batch, width, rank_frac, log_scale, seed, use_rank_rule
):
    gen = torch.Generator().manual_seed(seed)
    r_true = max(1, round(rank_frac * min(batch, width)))
    Z = torch.randn(batch, r_true, generator=gen, dtype=F64) @ torch.randn(
        r_true, width, generator=gen, dtype=F64
    )
    Z = Z * 10.0**log_scale
    rank = r_true if use_rank_rule else None
    Z.requires_grad_()
    kappa = feature_condition_number(Z, rank=rank)
    rmin, rmax = feature_r_min(Z, rank=rank), feature_r_max(Z, rank=rank)
    for value in (kappa, rmin, rmax):
        assert torch.isfinite(value)
    assert kappa >= 1.0
    assert rmin >= 0.0 and rmax >= 0.0
    (grad,) = torch.autograd.grad(rmin + rmax, Z)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_data_rank_gram_fast_path_agrees_with_svd(dtype):
    from lightning_immunize.conditioning import data_rank

    gen = torch.Generator().manual_seed(0)
    X = torch.randn(64, 784, generator=gen, dtype=torch.float64)
    cases = {
        "full": X,
        "duplicate row": torch.cat([X[:63], X[:1]]),
        "rank 10": torch.randn(64, 10, generator=gen, dtype=torch.float64)
        @ torch.randn(10, 784, generator=gen, dtype=torch.float64),
        "tall": X.mT.contiguous(),
        "tiny direction": torch.cat([X[:63], X[:1] + 1e-5 * X[1:2]]),
    }
    for name, M in cases.items():
        M = M.to(dtype)
        sv = torch.linalg.svdvals(M.to(torch.float64))
        eps = torch.finfo(torch.float64).eps  # the data as given, whatever their dtype
        expected = int((sv > max(M.shape) * eps * sv[0]).sum())
        assert data_rank(M) == expected, name
