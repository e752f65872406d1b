"""Tests of the covariance-preconditioned gradients (SPEC §5, Theorem 4.2–4.3)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_immunize.conditioning import (
    condition_number,
    feature_r_max,
    feature_spectral_gradient,
    spectral_gradient,
)
from lightning_immunize.preconditioning import (
    PreconditionedLinear,
    convert_linear_layers,
    input_covariance,
    preconditioned_gradient,
    preconditioning_enabled,
    ridge_solve,
)

F64 = torch.float64


def problem(seed: int, n: int = 40, d: int = 6, k: int = 4):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=gen, dtype=F64) * torch.linspace(0.5, 2.0, d, dtype=F64)
    theta = torch.randn(d, k, generator=gen, dtype=F64)
    return X, theta


def test_theorem_4_2_chain_rule():
    X, theta = problem(0)
    sigma = input_covariance(X)
    theta = theta.clone().requires_grad_()
    from lightning_immunize.conditioning import r_max

    value = r_max(theta.T @ sigma @ theta)
    (grad,) = torch.autograd.grad(value, theta)
    _, grad_S = spectral_gradient(theta.detach().T @ sigma @ theta.detach(), "r_max")
    plain = preconditioned_gradient(theta, sigma, grad_S, mode="none")
    assert torch.allclose(grad, plain, rtol=1e-10, atol=1e-14)


def test_inverse_covariance_identity_and_ridge_converges_to_exact():
    X, theta = problem(1)
    sigma = input_covariance(X)
    _, grad_S = spectral_gradient(theta.T @ sigma @ theta, "r_min")
    exact = preconditioned_gradient(theta, sigma, grad_S, mode="exact")
    plain = preconditioned_gradient(theta, sigma, grad_S, mode="none")
    assert torch.allclose(torch.linalg.solve(sigma, plain), exact, rtol=1e-10, atol=1e-12)
    errors = [
        float((preconditioned_gradient(theta, sigma, grad_S, "ridge", ridge=r) - exact).norm())
        for r in (1e-1, 1e-3, 1e-5, 1e-7)
    ]
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False))
    assert errors[-1] / float(exact.norm()) < 1e-5


@pytest.mark.parametrize("mode", ["exact", "ridge"])
def test_theorem_4_3_preconditioned_step_moves_kappa_monotonically(mode):
    for seed in range(20):
        X, theta = problem(seed)
        sigma = input_covariance(X)
        S = theta.T @ sigma @ theta
        kappa = condition_number(S)
        for kind, sign in (("r_min", -1), ("r_max", +1)):
            _, grad_S = spectral_gradient(S, kind)
            step_dir = preconditioned_gradient(theta, sigma, grad_S, mode=mode, ridge=1e-8)
            eta = 1e-4 * theta.norm() / step_dir.norm()
            moved = theta - eta * step_dir
            new_kappa = condition_number(moved.T @ sigma @ moved)
            assert sign * (new_kappa - kappa) > 0, (seed, kind, mode)


def test_ridge_solve_matches_dense_solve_and_validates():
    X, _ = problem(2)
    sigma = input_covariance(X)
    grad = torch.randn(6, 3, dtype=F64)
    rho = 1e-2 * torch.trace(sigma) / 6
    expected = torch.linalg.solve(sigma + rho * torch.eye(6, dtype=F64), grad)
    assert torch.allclose(ridge_solve(sigma, grad, 1e-2), expected, rtol=1e-10)
    with pytest.raises(ValueError, match="ridge must be > 0"):
        ridge_solve(sigma, grad, 0.0)
    with pytest.raises(ValueError, match=r"\(6, 6\).*\(5, 3\)"):
        ridge_solve(sigma, grad[:5], 1e-2)
    with pytest.raises(ValueError, match="unknown preconditioner mode 'inverse'"):
        preconditioned_gradient(torch.eye(2), torch.eye(2), torch.eye(2), mode="inverse")


def test_preconditioned_linear_layer_gives_exact_gradient_for_small_ridge():
    """The "dummy layer": its weight gradient is (Σ+ρI)⁻¹∇_θ R, i.e. ≈ 2θ∇_S R."""
    X, theta = problem(3, n=50, d=5, k=3)
    layer = PreconditionedLinear(5, 3, bias=False, ridge=1e-9, dtype=F64)
    with torch.no_grad():
        layer.weight.copy_(theta.T)
    Z = layer(X)
    feature_r_max(Z / X.shape[0] ** 0.5).backward()  # regularizer on S = ZᵀZ/N
    _, grad_S = feature_spectral_gradient(Z.detach() / X.shape[0] ** 0.5, "r_max")
    exact = preconditioned_gradient(theta, None, grad_S, mode="exact")
    assert torch.allclose(layer.weight.grad.T, exact, rtol=1e-6, atol=1e-12)


def test_preconditioning_switch_and_conversion_keep_plain_behaviour():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    net[0].weight.requires_grad_(False)
    x = torch.randn(16, 4)
    reference = net(x)
    convert_linear_layers(net, ridge=1e-3)
    assert all(isinstance(net[i], PreconditionedLinear) for i in (0, 2))
    assert not net[0].weight.requires_grad
    assert torch.equal(net(x), reference)
    net(x).square().sum().backward()
    plain_grad = net[2].weight.grad.clone()
    net.zero_grad()
    with preconditioning_enabled(net):
        assert net[2].precondition
        out = net(x)
        out.square().sum().backward()
    assert not net[2].precondition
    hidden = torch.relu(net[0](x)).detach()
    expected = ridge_solve(input_covariance(hidden), plain_grad.T.double(), 1e-3).T.float()
    assert torch.allclose(net[2].weight.grad, expected, rtol=1e-4, atol=1e-6)
    assert torch.equal(out, reference)
