"""Tests of the linear-probing attackers and norm-ratio curves (SPEC §6, Eq. 16)."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_immunize.probing import (
    ATTACKERS,
    ProbeTrajectory,
    adam_probe,
    closed_form_probe,
    epochs_to_reach,
    gd_exact_line_search,
    gd_fixed_step,
    lbfgs_probe,
    least_squares_solution,
    linear_probe_accuracy,
    run_attackers,
)

F64 = torch.float64
N, K = 200, 20


@pytest.fixture(autouse=True)
def _single_thread():
    """The problems are tiny: intra-op threads only add overhead (and stall under CPU load)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_problem(kappa: float, *, worst_case: bool, seed: int = 0, n: int = N, k: int = K):
    """``Z = U diag(s) Vᵀ`` with the eigenvalues of ``H = (2/N) ZᵀZ`` log-spaced in ``[1, κ]``.

    ``y = Z w_true`` (zero loss at ``w* = w_true``). With ``worst_case`` the initial error
    ``w_0 − w* = −w_true`` has a gradient ``H(w_0 − w*)`` with equal energy on the smallest and the
    largest eigen-direction; otherwise ``w_true`` is a random Gaussian vector.
    Returns ``(Z, y, w_true, eigvals, V)``.
    """
    gen = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=F64))
    V, _ = torch.linalg.qr(torch.randn(k, k, generator=gen, dtype=F64))
    lam = torch.logspace(0.0, math.log10(kappa), k, dtype=F64)  # eigenvalues of H, λ_1 = 1
    s = torch.sqrt(lam * n / 2.0)
    Z = U @ torch.diag(s) @ V.T
    if worst_case:
        coef = torch.zeros(k, dtype=F64)
        coef[0], coef[-1] = 1.0 / lam[0], 1.0 / lam[-1]  # H·coef = e_1 + e_K
        w_true = V @ coef
    else:
        w_true = torch.randn(k, generator=gen, dtype=F64)
    return Z, Z @ w_true, w_true, lam, V


def steepest_descent_rate(kappa: float) -> float:
    return (kappa - 1.0) / (kappa + 1.0)


# --------------------------------------------------------------------------------------------
# exact line search (Eq. 16)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kappa", [10.0, 100.0, 1000.0])
def test_exact_line_search_matches_the_predicted_step_count(kappa: float) -> None:
    r"""Steps to ``‖w_t − w*‖/‖w_0 − w*‖ ≤ 10⁻³`` against the steepest-descent rate.

    Derivation. Let ``e_t = w_t − w*``; then ``g_t = H e_t`` and, with ``ρ = (κ−1)/(κ+1)``,
    Kantorovich's inequality gives ``‖e_{t+1}‖²_H ≤ ρ² ‖e_t‖²_H``. Since
    ``λ_min ‖e‖² ≤ ‖e‖²_H ≤ λ_max ‖e‖²`` the Euclidean ratio obeys
    ``‖e_t‖/‖e_0‖ ≤ √κ · ρ^t`` in general (a bound, ``t_bound = ⌈(ln tol − ½ ln κ)/ln ρ⌉``).

    For the worst case, take ``e_0 = a/λ_min · v_min + a/λ_max · v_max`` (v the eigenvectors), so
    ``g_0 = a(v_min + v_max)`` has equal energy on both directions. Then
    ``η_0 = ‖g‖²/gᵀHg = 2/(λ_min + λ_max)`` and the two components of ``e_1`` are multiplied by
    ``1 − 2λ_min/(λ_min+λ_max) = ρ`` and ``1 − 2λ_max/(λ_min+λ_max) = −ρ``: ``e_1`` is again of the
    equal-energy-gradient form, so by induction ``e_t = ρ^t (a/λ_min v_min + (−1)^t a/λ_max v_max)``
    and ``‖e_t‖/‖e_0‖ = ρ^t`` exactly: the curve is strictly decreasing and the predicted step
    count is ``t_pred = ⌈ln(tol) / ln ρ⌉`` (346 for κ = 100). The measured count must lie in
    ``[t_pred/2, 2 t_pred]`` (in practice it equals ``t_pred``).
    """
    tol = 1e-3
    Z, y, w_true, _, _ = make_problem(kappa, worst_case=True)
    rho = steepest_descent_rate(kappa)
    t_pred = math.ceil(math.log(tol) / math.log(rho))
    traj = gd_exact_line_search(Z, y, steps=2 * t_pred + 10, tol=tol)

    assert torch.allclose(least_squares_solution(Z, y), w_true, atol=1e-10)
    assert traj.norm_ratio[0].item() == 1.0
    assert torch.isfinite(traj.norm_ratio).all() and torch.isfinite(traj.loss).all()
    # monotone non-increasing Euclidean norm-ratio curve (strictly, until round-off)
    assert (traj.norm_ratio.diff() <= 1e-12).all()
    measured = traj.steps_to_tolerance
    assert measured is not None
    assert t_pred / 2 <= measured <= 2 * t_pred, (kappa, measured, t_pred)
    # the closed form ρ^t is tracked closely in the worst case
    t = torch.arange(min(t_pred, traj.cap) + 1, dtype=F64)
    assert torch.allclose(traj.norm_ratio[: t.numel()], rho**t, rtol=1e-6, atol=1e-12)
    print(f"kappa={kappa:g}: measured {measured} steps, predicted {t_pred}")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_line_search_random_rhs_within_bound_and_h_norm_monotone(seed: int) -> None:
    """Random ``w*``: steps ≤ the general bound ``⌈(ln tol − ½ ln κ)/ln ρ⌉``, the H-norm error
    contracts by ``ρ²`` per step, and the Euclidean error is monotone too.

    Euclidean monotonicity in general: with ``g = H e`` and ``η = gᵀg / gᵀHg``,
    ``‖e − ηg‖² − ‖e‖² = η(η gᵀg − 2 eᵀg) = η((gᵀg)²/gᵀHg − 2 gᵀH⁻¹g) ≤ 0`` because
    ``(gᵀg)² ≤ (gᵀHg)(gᵀH⁻¹g)`` (Cauchy–Schwarz), with room to spare (a factor 2).
    """
    kappa, tol = 100.0, 1e-3
    Z, y, w_true, lam, V = make_problem(kappa, worst_case=False, seed=seed)
    rho = steepest_descent_rate(kappa)
    t_bound = math.ceil((math.log(tol) - 0.5 * math.log(kappa)) / math.log(rho))
    traj = gd_exact_line_search(Z, y, steps=t_bound, tol=tol)
    assert traj.steps_to_tolerance is not None and traj.steps_to_tolerance <= t_bound
    # Euclidean monotonicity holds for any right-hand side (see the docstring)
    assert (traj.norm_ratio.diff() <= 1e-12).all()
    assert (traj.loss.diff() <= 1e-12).all()  # the loss is the H-norm error (y = Z w*)
    # H-norm error contracts by at least ρ² per step
    h_err = traj.loss  # L(w) − L(w*) = ½ ‖w − w*‖²_H, and L(w*) = 0 here
    ok = h_err[:-1] > 1e-26
    assert (h_err[1:][ok] <= rho**2 * h_err[:-1][ok] * (1 + 1e-9)).all()


def test_larger_condition_number_needs_more_exact_steps() -> None:
    counts = []
    for kappa in (10.0, 100.0, 1000.0):
        Z, y, *_ = make_problem(kappa, worst_case=True)
        counts.append(gd_exact_line_search(Z, y, steps=5000).steps_to_tolerance)
    assert counts[0] < counts[1] < counts[2]


def test_exact_line_search_matrix_targets_and_rank_deficient() -> None:
    gen = torch.Generator().manual_seed(3)
    # matrix targets (N, C): Frobenius inner products
    Z = torch.randn(50, 6, generator=gen, dtype=F64)
    Y = torch.randn(50, 3, generator=gen, dtype=F64)
    traj = gd_exact_line_search(Z, Y, steps=300, tol=1e-8)
    assert traj.steps_to_tolerance is not None
    assert least_squares_solution(Z, Y).shape == (6, 3)
    # rank-deficient Z: GD from 0 stays in the row space and reaches the min-norm solution
    Z = torch.randn(40, 3, generator=gen, dtype=F64) @ torch.randn(3, 8, generator=gen, dtype=F64)
    y = torch.randn(40, generator=gen, dtype=F64)
    w_star = least_squares_solution(Z, y)
    assert torch.allclose(w_star, torch.linalg.pinv(Z) @ y, atol=1e-10)
    traj = gd_exact_line_search(Z, y, steps=500, tol=1e-8)
    assert traj.steps_to_tolerance is not None


def test_exact_line_search_stops_on_zero_gradient_and_pads() -> None:
    Z = 2.0 * torch.eye(4, dtype=F64)  # H = I: one exact step solves it
    y = torch.tensor([1.0, -1.0, 2.0, 0.5], dtype=F64)
    traj = gd_exact_line_search(Z, y, steps=10)
    assert traj.norm_ratio.shape == (11,) and traj.loss.shape == (11,)
    assert traj.steps_to_tolerance == 1
    assert (traj.norm_ratio[1:] == traj.norm_ratio[1]).all()
    # w0 = w*: degenerate curve, all zeros
    traj = gd_exact_line_search(Z, y, steps=3, w0=y / 2)
    assert traj.steps_to_tolerance == 0 and (traj.norm_ratio == 0).all()


# --------------------------------------------------------------------------------------------
# other attackers
# --------------------------------------------------------------------------------------------


def test_fixed_step_needs_more_steps_when_worse_conditioned() -> None:
    counts = {}
    for kappa in (10.0, 100.0):
        Z, y, *_ = make_problem(kappa, worst_case=False, seed=4)
        traj = gd_fixed_step(Z, y, steps=3000)
        assert (traj.norm_ratio.diff() <= 1e-12).all()  # 1/L step: every mode contracts
        counts[kappa] = traj.steps_to_tolerance
    assert counts[10.0] is not None and counts[100.0] is not None
    assert counts[10.0] < counts[100.0]
    # the slowest mode contracts by (1 − 1/κ) per step
    assert counts[100.0] <= math.ceil(math.log(1e-3) / math.log(1 - 1 / 100.0)) + 1
    # explicit lr
    Z, y, *_ = make_problem(10.0, worst_case=False)
    assert gd_fixed_step(Z, y, steps=5, lr=1e-6).norm_ratio[-1] > 0.99


@pytest.mark.parametrize("kappa", [10.0, 1000.0])
def test_closed_form_is_one_step_regardless(kappa: float) -> None:
    Z, y, *_ = make_problem(kappa, worst_case=False)
    traj = closed_form_probe(Z, y, steps=7)
    assert traj.steps_to_tolerance == 1 and traj.steps_label() == "1"
    assert traj.norm_ratio.tolist() == [1.0] + [0.0] * 7


def test_adam_and_lbfgs_decrease_the_loss() -> None:
    Z, y, *_ = make_problem(100.0, worst_case=False)
    for fn in (adam_probe, lbfgs_probe):
        traj = fn(Z, y, steps=50)
        assert traj.norm_ratio.shape == (51,)
        assert traj.norm_ratio[0].item() == 1.0
        assert torch.isfinite(traj.norm_ratio).all() and torch.isfinite(traj.loss).all()
        assert (traj.loss[1:] <= traj.loss[:-1] * (1 + 1e-12)).all() or fn is adam_probe
        assert traj.loss[-1] < 0.5 * traj.loss[0]
    assert lbfgs_probe(Z, y, steps=100).steps_to_tolerance is not None


def test_run_attackers_all_curves_start_at_one_and_are_finite() -> None:
    Z, y, *_ = make_problem(100.0, worst_case=False)
    out = run_attackers(Z, y, steps=30)
    assert list(out) == list(ATTACKERS) == ["gd_exact", "gd_fixed", "adam", "lbfgs", "closed_form"]
    for name, traj in out.items():
        assert isinstance(traj, ProbeTrajectory) and traj.name == name
        assert traj.cap == 30 and traj.tolerance == 1e-3
        assert traj.norm_ratio.dtype == F64 and traj.norm_ratio.shape == (31,)
        assert traj.norm_ratio[0].item() == 1.0
        assert torch.isfinite(traj.norm_ratio).all() and torch.isfinite(traj.loss).all()
        assert traj.loss[-1] < traj.loss[0]
    sub = run_attackers(Z, y, names=["closed_form"], steps=2)
    assert list(sub) == ["closed_form"]


def test_trajectory_progress_and_label() -> None:
    traj = ProbeTrajectory(
        name="x",
        norm_ratio=torch.tensor([1.0, 0.5, 0.25], dtype=F64),
        loss=torch.tensor([3.0, 2.0, 1.0], dtype=F64),
        steps_to_tolerance=None,
        tolerance=1e-3,
        cap=2,
    )
    assert traj.progress(0) == 0.0 and traj.progress(1) == 0.5
    assert traj.progress(99) == 0.75  # clamped to the last index
    assert traj.steps_label() == "> 2"


# --------------------------------------------------------------------------------------------
# classification probe
# --------------------------------------------------------------------------------------------


def clusters(n: int, k: int = 8, classes: int = 3, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    means = 4.0 * torch.randn(classes, k, generator=gen)
    labels = torch.arange(n) % classes
    return means[labels] + torch.randn(n, k, generator=gen), labels


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_linear_probe_accuracy_separable_and_deterministic(optimizer: str) -> None:
    Z, y = clusters(450, seed=0)
    Ztr, ytr, Zte, yte = Z[:300], y[:300], Z[300:], y[300:]
    lr = None if optimizer == "sgd" else 1e-2
    curve = linear_probe_accuracy(Ztr, ytr, Zte, yte, 3, epochs=20, optimizer=optimizer, lr=lr)
    assert curve.shape == (21,) and curve.dtype == F64
    assert curve.max() > 0.9
    e = epochs_to_reach(curve, 0.9)
    assert e is not None and 1 <= e <= 20
    again = linear_probe_accuracy(Ztr, ytr, Zte, yte, 3, epochs=20, optimizer=optimizer, lr=lr)
    assert torch.equal(curve, again)


def test_linear_probe_binary_uses_two_outputs() -> None:
    Z, y = clusters(200, classes=2, seed=5)
    curve = linear_probe_accuracy(Z[:150], y[:150], Z[150:], y[150:], 2, epochs=5)
    assert curve.shape == (6,) and curve[-1] > 0.9


def test_epochs_to_reach() -> None:
    curve = torch.tensor([0.1, 0.5, 0.92, 0.95], dtype=F64)
    assert epochs_to_reach(curve, 0.9) == 2
    assert epochs_to_reach(curve, 0.1) == 0
    assert epochs_to_reach(curve, 0.99) is None


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------

Zg = torch.randn(10, 3, dtype=F64)
yg = torch.randn(10, dtype=F64)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: gd_exact_line_search(torch.randn(10), yg), r"Z must be a 2-D tensor.*\(10,\)"),
        (lambda: gd_exact_line_search(torch.randn(2, 5, 3), yg), r"2-D.*\(2, 5, 3\)"),
        (lambda: gd_exact_line_search(Zg, torch.randn(9)), r"y has 9 rows but Z has 10"),
        (lambda: gd_fixed_step(Zg, yg, steps=0), r"steps must be an integer >= 1, got 0"),
        (lambda: adam_probe(Zg, yg, tol=0.0), r"tol must be a finite value > 0, got 0.0"),
        (lambda: lbfgs_probe(Zg, yg, tol=-1.0), r"tol must be .* got -1.0"),
        (
            lambda: run_attackers(Zg, yg, names=["sgd"]),
            r"unknown probing attacker.*'sgd'.*expected one of",
        ),
        (
            lambda: closed_form_probe(Zg.clone().index_fill_(0, torch.tensor([0]), math.nan), yg),
            r"non-finite Z \(NaN or inf",
        ),
        (lambda: gd_exact_line_search(Zg, yg, w0=torch.zeros(4)), r"w0 must have shape \(3,\)"),
        (lambda: gd_fixed_step(Zg, yg, lr=-1.0), r"lr must be a finite value > 0"),
        (
            lambda: linear_probe_accuracy(Zg, torch.zeros(9), Zg, torch.zeros(10), 2),
            r"y_train must have shape \(10,\)",
        ),
        (
            lambda: linear_probe_accuracy(Zg, torch.full((10,), 3), Zg, torch.zeros(10), 2),
            r"labels must lie in \[0, 2\)",
        ),
        (
            lambda: linear_probe_accuracy(
                Zg, torch.zeros(10), Zg, torch.zeros(10), 2, optimizer="x"
            ),
            r"optimizer must be 'sgd' or 'adam'",
        ),
        (lambda: epochs_to_reach(torch.zeros(2, 2), 0.5), r"curve must be 1-D"),
    ],
)
def test_bad_input_raises(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()
