r"""Linear-probing attackers on frozen features (Eq. 16, norm-ratio curves): the functional layer.

An attacker who holds frozen features ``Z`` (N, K) of a task and targets ``y`` (N,) or (N, C)
fits a linear probe by minimising the squared loss

    L(w) = (1/N) ‖Z w − y‖²_F,      ∇L(w) = (2/N) Zᵀ(Z w − y),      H = ∇²L = (2/N) ZᵀZ.

The target of every attacker is the minimum-norm least-squares solution ``w* = Z⁺ y``
(:func:`least_squares_solution`) and its progress is the **norm-ratio curve** (Eq. 16)

    r_t = ‖w_t − w*‖_F / ‖w_0 − w*‖_F,      t = 0, …, T,      r_0 = 1.

The paper's attacker is gradient descent with **exact line search**
(:func:`gd_exact_line_search`): ``g_t = ∇L(w_t)``, ``η_t = ⟨g_t, g_t⟩ / ⟨g_t, H g_t⟩`` (Frobenius
inner products for matrix ``y``), ``w_{t+1} = w_t − η_t g_t``. On a quadratic its error in the
H-norm contracts by at least ``((κ−1)/(κ+1))²`` per step (Kantorovich), κ = κ(H), so

    ‖w_t − w*‖ / ‖w_0 − w*‖ ≤ √κ · ((κ−1)/(κ+1))^t,

the Euclidean error is non-increasing too (``(gᵀg)² ≤ (gᵀHg)(gᵀH⁻¹g)``: the curve is monotone),
and the rate is attained (without the √κ) when the initial gradient has equal energy on the
extreme eigen-directions of ``H``: a larger condition number of the features makes the probe
slower, which is what immunization exploits. Other attackers (fixed step ``1/λ_max(H)``, Adam,
L-BFGS, the closed-form solve) are provided for comparison; a fixed step does not show the
effect as clearly, exact line search does (Section 5.1).

**Rank-deficient Z.** ``w*`` is the minimum-norm solution. Every gradient lies in the row space of
``Z``, so gradient methods started from ``w_0 = 0`` (the default) stay in that row space and
converge to exactly ``w*``; from a ``w_0`` with a component outside the row space they converge to
``w* + P_⊥ w_0`` and the curve levels off at ``‖P_⊥ w_0‖ / ‖w_0 − w*‖``. If ``w_0 = w*`` the curve
is defined as all zeros (``steps_to_tolerance = 0``).

**All-zero Z** is refused with a ``ValueError`` by every function here: its ``w*`` is 0 and its
curve would be all zeros, so a dead extractor would look trivially probeable (or, for
:func:`linear_probe_accuracy`, stuck at chance: perfectly immunized). Neither is a measurement.

All maths is in float64 on the device of ``Z``; the functions are pure (no global RNG use,
inputs are not modified).

Example:
    >>> import torch
    >>> Z = torch.diag(torch.tensor([1.0, 10.0], dtype=torch.float64))  # κ(H) = 100
    >>> y = torch.tensor([1.0, 0.1], dtype=torch.float64)  # w* = (1, 0.01): equal-energy gradient
    >>> traj = gd_exact_line_search(Z, y, steps=500, tol=1e-3)
    >>> traj.norm_ratio[0].item(), traj.steps_to_tolerance  # ((99/101)^t ≤ 1e-3 ⇔ t ≥ 346)
    (1.0, 346)
    >>> curves = run_attackers(Z, y, steps=200)
    >>> {name: c.steps_label() for name, c in curves.items()}
    {'gd_exact': '> 200', 'gd_fixed': '> 200', 'adam': '> 200', 'lbfgs': '3', 'closed_form': '1'}
    >>> round(curves["gd_exact"].progress(200), 3)
    0.982
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_immunize.validation import check_finite, unknown_choice

__all__ = [
    "ATTACKERS",
    "ProbeTrajectory",
    "adam_probe",
    "closed_form_probe",
    "epochs_to_reach",
    "gd_exact_line_search",
    "gd_fixed_step",
    "lbfgs_probe",
    "least_squares_solution",
    "linear_probe_accuracy",
    "run_attackers",
    "squared_loss",
]

F64 = torch.float64


# --------------------------------------------------------------------------------------------
# result type
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeTrajectory:
    """Trajectory of one attacker.

    Attributes:
        name: attacker name (a key of :data:`ATTACKERS`).
        norm_ratio: ``(T+1,)`` float64, ``‖w_t − w*‖ / ‖w_0 − w*‖``; ``norm_ratio[0] = 1``.
        loss: ``(T+1,)`` float64, ``L(w_t)``.
        steps_to_tolerance: first ``t`` with ``norm_ratio[t] ≤ tolerance``, ``None`` if never.
        tolerance: the tolerance used.
        cap: ``T``, the number of steps run.
        iterates: ``(T+1, K[, C])`` float64 weights ``w_0 … w_T`` when asked for, else ``None``.
    """

    name: str
    norm_ratio: Tensor
    loss: Tensor
    steps_to_tolerance: int | None
    tolerance: float
    cap: int
    iterates: Tensor | None = None

    def progress(self, t: int) -> float:
        """``1 − norm_ratio[t]``, with ``t`` clamped to ``[0, T]``."""
        t = min(max(int(t), 0), self.norm_ratio.shape[0] - 1)
        return 1.0 - float(self.norm_ratio[t])

    def steps_label(self) -> str:
        """Steps to tolerance as text: ``"37"``, or ``"> 200"`` when not reached within ``cap``."""
        if self.steps_to_tolerance is None:
            return f"> {self.cap}"
        return str(self.steps_to_tolerance)


# --------------------------------------------------------------------------------------------
# validation and the quadratic problem
# --------------------------------------------------------------------------------------------


def _check_problem(Z: Tensor, y: Tensor, w0: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Validate and convert to float64; returns ``(Z, y, w0)`` with ``w0`` zeros if ``None``."""
    if not isinstance(Z, Tensor) or Z.dim() != 2:
        shape = tuple(Z.shape) if isinstance(Z, Tensor) else type(Z).__name__
        raise ValueError(f"Z must be a 2-D tensor (N, K) of features, got shape {shape}.")
    if not isinstance(y, Tensor) or y.dim() not in (1, 2):
        shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise ValueError(f"y must be a tensor of shape (N,) or (N, C), got shape {shape}.")
    if y.shape[0] != Z.shape[0]:
        raise ValueError(
            f"y has {y.shape[0]} rows but Z has {Z.shape[0]} (shapes {tuple(y.shape)} and "
            f"{tuple(Z.shape)}); expected one row of y per row of Z."
        )
    if Z.shape[0] == 0 or Z.shape[1] == 0:
        raise ValueError(f"Z must be non-empty, got shape {tuple(Z.shape)}.")
    Z = Z.detach().to(F64)
    y = y.detach().to(device=Z.device, dtype=F64)
    check_finite(Z, "Z")
    _check_not_all_zero(Z, "Z")
    check_finite(y, "y")
    w_shape = (Z.shape[1],) + tuple(y.shape[1:])
    if w0 is None:
        w0 = torch.zeros(w_shape, dtype=F64, device=Z.device)
    else:
        if tuple(w0.shape) != w_shape:
            raise ValueError(f"w0 must have shape {w_shape}, got {tuple(w0.shape)}.")
        w0 = w0.detach().to(device=Z.device, dtype=F64).clone()
        check_finite(w0, "w0")
    return Z, y, w0


def _check_not_all_zero(Z: Tensor, name: str) -> None:
    if not bool(Z.ne(0).any()):
        raise ValueError(
            f"{name} of shape {tuple(Z.shape)} is all zero (dead extractor?): there is nothing "
            "to probe, and the attack would look trivially successful (norm-ratio curve of "
            "zeros) or trivially defeated (chance accuracy). Expected features with at least "
            "one non-zero entry."
        )


def _check_steps_tol(steps: int, tol: float) -> None:
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps}.")
    if not (tol > 0) or not math.isfinite(tol):
        raise ValueError(f"tol must be a finite value > 0, got {tol}.")


def squared_loss(Z: Tensor, y: Tensor, w: Tensor) -> Tensor:
    """``L(w) = (1/N) ‖Z w − y‖²_F``.

    Shapes: ``Z`` (N, K), ``y`` (N,) or (N, C), ``w`` (K,) or (K, C); returns a scalar.
    """
    r = Z @ w - y
    return (r * r).sum() / Z.shape[0]


def least_squares_solution(Z: Tensor, y: Tensor) -> Tensor:
    """Minimum-norm least-squares solution ``w* = Z⁺ y``: (K,) for y (N,), (K, C) for y (N, C).

    Uses ``torch.linalg.lstsq`` with the ``gelsd`` (SVD) driver on CPU, ``pinv`` elsewhere;
    computed in float64.
    """
    Z, y, _ = _check_problem(Z, y)
    if Z.device.type == "cpu":
        rhs = y if y.dim() == 2 else y.unsqueeze(1)
        sol = torch.linalg.lstsq(Z, rhs, driver="gelsd").solution
        return sol if y.dim() == 2 else sol.squeeze(1)
    return torch.linalg.pinv(Z) @ y


def _trajectory(
    name: str,
    iterates: Sequence[Tensor],
    w_star: Tensor,
    Z: Tensor,
    y: Tensor,
    steps: int,
    tol: float,
    keep_iterates: bool = False,
) -> ProbeTrajectory:
    """Build the curve from iterates ``w_0 … w_t`` (padded with the last one to ``steps+1``)."""
    iterates = list(iterates)
    iterates += [iterates[-1]] * (steps + 1 - len(iterates))
    W = torch.stack(iterates)  # (T+1, K[, C])
    err = (W - w_star).flatten(1).norm(dim=1)
    if err[0] > 0:
        ratio = err / err[0]
    else:
        ratio = torch.zeros_like(err)
    R = (W @ Z.T if W.dim() == 2 else Z @ W) - y  # (T+1, N[, C])
    loss = (R * R).flatten(1).sum(dim=1) / Z.shape[0]
    hit = torch.nonzero(ratio <= tol)
    first = int(hit[0, 0]) if hit.numel() else None
    return ProbeTrajectory(
        name=name,
        norm_ratio=ratio.cpu(),
        loss=loss.cpu(),
        steps_to_tolerance=first,
        tolerance=float(tol),
        cap=int(steps),
        iterates=W.cpu() if keep_iterates else None,
    )


def _gradient(Z: Tensor, y: Tensor, w: Tensor) -> Tensor:
    return (2.0 / Z.shape[0]) * (Z.T @ (Z @ w - y))


# --------------------------------------------------------------------------------------------
# attackers
# --------------------------------------------------------------------------------------------


def gd_exact_line_search(
    Z: Tensor,
    y: Tensor,
    steps: int = 200,
    tol: float = 1e-3,
    w0: Tensor | None = None,
    keep_iterates: bool = False,
) -> ProbeTrajectory:
    """Gradient descent with exact line search on ``L`` (Eq. 16); ``keep_iterates`` keeps
    the weights of every step in the trajectory.

    ``η_t = ⟨g_t, g_t⟩ / ⟨g_t, H g_t⟩`` with ``⟨g, H g⟩ = (2/N) ‖Z g‖²_F``. Stops early only if the
    gradient is exactly zero (the curve is then padded with its last value).
    Shapes: ``Z`` (N, K), ``y`` (N,) or (N, C); curves (steps+1,). An all-zero ``Z`` (a dead
    extractor) raises ``ValueError``, as in every attacker.
    """
    _check_steps_tol(steps, tol)
    Z, y, w = _check_problem(Z, y, w0)
    w_star = least_squares_solution(Z, y)
    n = Z.shape[0]
    iterates = [w.clone()]
    for _ in range(steps):
        g = _gradient(Z, y, w)
        gg = (g * g).sum()
        Zg = Z @ g
        gHg = (2.0 / n) * (Zg * Zg).sum()
        if gg == 0 or gHg <= 0:
            break
        w = w - (gg / gHg) * g
        iterates.append(w.clone())
    return _trajectory("gd_exact", iterates, w_star, Z, y, steps, tol, keep_iterates)


def gd_fixed_step(
    Z: Tensor,
    y: Tensor,
    steps: int = 200,
    tol: float = 1e-3,
    w0: Tensor | None = None,
    lr: float | None = None,
) -> ProbeTrajectory:
    """Gradient descent with a fixed step ``lr``, by default ``1/λ_max(H)`` (``1/L``).

    ``λ_max(H) = (2/N) σ_max(Z)²``. Shapes as in :func:`gd_exact_line_search`.
    """
    _check_steps_tol(steps, tol)
    if lr is not None and not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a finite value > 0, got {lr}.")
    Z, y, w = _check_problem(Z, y, w0)
    w_star = least_squares_solution(Z, y)
    if lr is None:
        lam_max = (2.0 / Z.shape[0]) * float(torch.linalg.svdvals(Z)[0]) ** 2
        lr = 1.0 / lam_max if lam_max > 0 else 0.0
    iterates = [w.clone()]
    for _ in range(steps):
        w = w - lr * _gradient(Z, y, w)
        iterates.append(w.clone())
    return _trajectory("gd_fixed", iterates, w_star, Z, y, steps, tol)


def _torch_optimizer_probe(
    name: str,
    make_optimizer: Callable[[list[Tensor]], torch.optim.Optimizer],
    Z: Tensor,
    y: Tensor,
    steps: int,
    tol: float,
    w0: Tensor | None,
) -> ProbeTrajectory:
    _check_steps_tol(steps, tol)
    Z, y, w_init = _check_problem(Z, y, w0)
    w_star = least_squares_solution(Z, y)
    w = w_init.clone().requires_grad_(True)
    optimizer = make_optimizer([w])

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = squared_loss(Z, y, w)
        loss.backward()
        return loss

    iterates = [w.detach().clone()]
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.step(closure)
            iterates.append(w.detach().clone())
    return _trajectory(name, iterates, w_star, Z, y, steps, tol)


def adam_probe(
    Z: Tensor,
    y: Tensor,
    steps: int = 200,
    tol: float = 1e-3,
    w0: Tensor | None = None,
    lr: float = 1e-2,
) -> ProbeTrajectory:
    """Full-batch ``torch.optim.Adam`` on ``L`` with learning rate ``lr``, one step per point."""
    return _torch_optimizer_probe(
        "adam", lambda p: torch.optim.Adam(p, lr=lr), Z, y, steps, tol, w0
    )


def lbfgs_probe(
    Z: Tensor,
    y: Tensor,
    steps: int = 200,
    tol: float = 1e-3,
    w0: Tensor | None = None,
    lr: float = 1.0,
    history_size: int = 10,
    max_eval: int = 25,
) -> ProbeTrajectory:
    """``torch.optim.LBFGS`` (strong-Wolfe line search, ``max_iter=1``): one ``step`` per point.

    ``max_eval`` bounds the closure evaluations per step and must be set explicitly: torch's
    default ``max_iter · 5 // 4 = 1`` leaves the line search no evaluations, so ``w`` never moves.
    """
    if int(max_eval) != max_eval or max_eval < 2:
        raise ValueError(f"max_eval must be an integer >= 2, got {max_eval}.")
    return _torch_optimizer_probe(
        "lbfgs",
        lambda p: torch.optim.LBFGS(
            p,
            lr=lr,
            max_iter=1,
            max_eval=int(max_eval),
            history_size=history_size,
            line_search_fn="strong_wolfe",
        ),
        Z,
        y,
        steps,
        tol,
        w0,
    )


def closed_form_probe(
    Z: Tensor, y: Tensor, steps: int = 200, tol: float = 1e-3, w0: Tensor | None = None
) -> ProbeTrajectory:
    """The least-squares solve: reaches ``w*`` in one step, curve ``[1, 0, 0, …]``."""
    _check_steps_tol(steps, tol)
    Z, y, w = _check_problem(Z, y, w0)
    w_star = least_squares_solution(Z, y)
    return _trajectory("closed_form", [w, w_star], w_star, Z, y, steps, tol)


ATTACKERS: dict[str, Callable[..., ProbeTrajectory]] = {
    "gd_exact": gd_exact_line_search,
    "gd_fixed": gd_fixed_step,
    "adam": adam_probe,
    "lbfgs": lbfgs_probe,
    "closed_form": closed_form_probe,
}


def run_attackers(
    Z: Tensor,
    y: Tensor,
    names: Sequence[str] | None = None,
    steps: int = 200,
    tol: float = 1e-3,
    w0: Tensor | None = None,
) -> dict[str, ProbeTrajectory]:
    """Run the named attackers (all of :data:`ATTACKERS` by default) on the same problem.

    Raises ``ValueError`` before any attacker runs for an unknown name or a bad problem
    (e.g. an all-zero ``Z``: a dead extractor)."""
    names = list(ATTACKERS) if names is None else list(names)
    unknown = [n for n in names if n not in ATTACKERS]
    if unknown:
        raise unknown_choice("probing attacker", unknown, sorted(ATTACKERS))
    _check_problem(Z, y, w0)
    return {n: ATTACKERS[n](Z, y, steps=steps, tol=tol, w0=w0) for n in names}


# --------------------------------------------------------------------------------------------
# classification probe (deep nets, Fig. 3)
# --------------------------------------------------------------------------------------------


def _check_labels(Z: Tensor, labels: Tensor, num_classes: int, what: str) -> Tensor:
    if not isinstance(Z, Tensor) or Z.dim() != 2:
        shape = tuple(Z.shape) if isinstance(Z, Tensor) else type(Z).__name__
        raise ValueError(f"Z_{what} must be a 2-D tensor (N, K), got shape {shape}.")
    check_finite(Z, f"Z_{what}")
    if Z.numel():
        _check_not_all_zero(Z, f"Z_{what}")
    if labels.dim() != 1 or labels.shape[0] != Z.shape[0]:
        raise ValueError(
            f"y_{what} must have shape ({Z.shape[0]},) to match Z_{what} {tuple(Z.shape)}, "
            f"got {tuple(labels.shape)}."
        )
    if labels.is_floating_point() and not torch.equal(labels, labels.round()):
        first = labels[labels != labels.round()].flatten()[0].item()
        raise ValueError(f"y_{what} must hold integer class labels, got {first}.")
    labels = labels.long()
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"y_{what} labels must lie in [0, {num_classes}), got range "
            f"[{int(labels.min())}, {int(labels.max())}]."
        )
    return labels


def linear_probe_accuracy(
    Z_train: Tensor,
    y_train: Tensor,
    Z_test: Tensor,
    y_test: Tensor,
    num_classes: int,
    epochs: int = 20,
    optimizer: str = "sgd",
    lr: float | None = None,
    batch_size: int = 64,
    seed: int = 0,
    momentum: float = 0.9,
) -> Tensor:
    """Test accuracy of a linear probe (with bias) trained on frozen features, per epoch.

    Cross-entropy with ``num_classes`` outputs (also for 2 classes), mini-batches of
    ``batch_size`` reshuffled each epoch, float64. ``optimizer`` is ``"sgd"`` (momentum
    ``momentum``, default ``lr`` 0.1) or ``"adam"`` (default ``lr`` 1e-3). Initialisation and
    shuffling use a private generator seeded with ``seed``: the result is deterministic.

    Shapes: ``Z_train`` (N, K), ``y_train`` (N,) integer labels, ``Z_test`` (M, K), ``y_test``
    (M,). Returns ``(epochs+1,)`` float64; index 0 is the accuracy before training. All-zero
    ``Z_train`` or ``Z_test`` (a dead extractor) raises ``ValueError``.
    """
    if int(num_classes) != num_classes or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes}.")
    if int(epochs) != epochs or epochs < 0:
        raise ValueError(f"epochs must be an integer >= 0, got {epochs}.")
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size}.")
    if optimizer not in ("sgd", "adam"):
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}.")
    y_train = _check_labels(Z_train, y_train, num_classes, "train")
    y_test = _check_labels(Z_test, y_test, num_classes, "test")
    if Z_train.shape[0] == 0 or Z_test.shape[0] == 0:
        raise ValueError(
            f"Z_train and Z_test must be non-empty, got shapes {tuple(Z_train.shape)} and "
            f"{tuple(Z_test.shape)}."
        )
    if Z_train.shape[1] != Z_test.shape[1]:
        raise ValueError(
            f"Z_train {tuple(Z_train.shape)} and Z_test {tuple(Z_test.shape)} must have the same "
            "number of features."
        )
    if lr is None:
        lr = 0.1 if optimizer == "sgd" else 1e-3
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a finite value > 0, got {lr}.")

    device = Z_train.device
    Ztr = Z_train.detach().to(F64)
    Zte = Z_test.detach().to(device=device, dtype=F64)
    y_train, y_test = y_train.to(device), y_test.to(device)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    k = Ztr.shape[1]
    bound = 1.0 / math.sqrt(k)  # nn.Linear's default uniform range
    W = ((torch.rand(num_classes, k, generator=gen, dtype=F64) * 2 - 1) * bound).to(device)
    b = ((torch.rand(num_classes, generator=gen, dtype=F64) * 2 - 1) * bound).to(device)
    W.requires_grad_(True)
    b.requires_grad_(True)
    opt: torch.optim.Optimizer
    if optimizer == "sgd":
        opt = torch.optim.SGD([W, b], lr=lr, momentum=momentum)
    else:
        opt = torch.optim.Adam([W, b], lr=lr)

    def accuracy() -> float:
        with torch.no_grad():
            return float(((Zte @ W.T + b).argmax(dim=1) == y_test).to(F64).mean())

    curve = [accuracy()]
    n = Ztr.shape[0]
    with torch.enable_grad():
        for _ in range(int(epochs)):
            perm = torch.randperm(n, generator=gen).to(device)
            for i in range(0, n, batch_size):
                idx = perm[i : i + batch_size]
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(Ztr[idx] @ W.T + b, y_train[idx])
                loss.backward()
                opt.step()
            curve.append(accuracy())
    return torch.tensor(curve, dtype=F64)


def epochs_to_reach(curve: Tensor | Sequence[float], threshold: float) -> int | None:
    """First index ``e`` of a ``(E+1,)`` accuracy curve (a tensor or a list) with
    ``curve[e] ≥ threshold``, or None."""
    if not isinstance(curve, Tensor):  # a list of accuracies: compare in float64, not float32
        curve = torch.as_tensor(curve, dtype=torch.float64)
    if curve.dim() != 1:
        raise ValueError(f"curve must be 1-D, got shape {tuple(curve.shape)}.")
    hit = torch.nonzero(curve >= threshold)
    return int(hit[0, 0]) if hit.numel() else None
