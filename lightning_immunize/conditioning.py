r"""Condition numbers and the two spectral regularizers, in float64 (Section 2, Eq. 12,
Theorems 4.1–4.2).

Everything here works on a symmetric matrix ``S`` of shape ``(..., K, K)`` (a leading batch of
matrices is allowed) or on a feature batch ``Z`` of shape ``(..., B, K)`` with ``S = ZᵀZ``.
Inputs of any floating dtype are promoted to float64; results are float64 and gradients flow
back to the input in its own dtype.

**Which eigenvalues count** (``docs/numerical-rank.md``). Singular values of a symmetric ``S``
are ``|λ_i|``.

* tolerance rule (default): ``σ_i`` counts when ``σ_i > rtol · σ_max`` with
  ``rtol = K · eps`` (NumPy's ``matrix_rank`` rule, ``K`` the side of ``S``; ``eps`` that of
  float64, or of the lower precision a matrix passed directly was formed in);
* input-rank rule: ``rank=r`` keeps the top ``r`` singular values whatever their size; use
  :func:`data_rank` on the inputs of a linear extractor to get ``r``.

**Regularizers** (Theorem A.1 after Nenov et al. 2024, and Eq. 12), on the kept ``σ_1 ≥ … ≥ σ_k``:

* ``R_min(S) = ½σ_1² − (1/2k)·Σσ_i²`` with ``∇_S R_min = σ_1 u_1u_1ᵀ − S_k/k``;
* ``d(S) = (1/2k)·Σσ_i² − ½σ_k²``, ``R_max(S) = 1/(d + δ)`` with
  ``∇_S R_max = (σ_k u_ku_kᵀ − S_k/k)/(d + δ)²``,

where ``S_k`` is ``S`` restricted to the kept eigenpairs (``= S`` when the rest are zero) and
``δ = floor · σ_1²`` (``floor = 1e-12`` by default) keeps ``R_max`` finite on an all-equal
spectrum; ``δ`` is treated as a constant in the gradient, so the gradient there is still the
direction that spreads the spectrum. Both are computed with one ``eigh`` in the forward pass
and the closed-form gradient in the backward pass.

**Repeated extreme eigenvalues.** When ``σ_1`` (or ``σ_k``) is repeated, ``u uᵀ`` is not
defined; we use the minimum-norm subgradient, the average ``P/m`` of the projector ``P`` onto
the ``m``-dimensional eigenspace (eigenvalues within ``1e-10 · σ_max`` of the extreme one count
as repeated). It is finite, symmetric and independent of the eigenvector basis.

**Gram route**. For ``Z`` with ``B < K`` the kept eigenvalues of ``ZᵀZ`` are those of
``ZZᵀ`` (``B × B``), so ``feature_*`` functions pick the cheaper side automatically; the
gradient w.r.t. ``Z`` is the same either way (``2 Z ∇_S R = 2 ∇_G R Z``).

Example:
    >>> import torch
    >>> S = torch.diag(torch.tensor([4.0, 2.0, 1.0], dtype=torch.float64))
    >>> float(condition_number(S))
    4.0
    >>> float(r_min(S))  # ½·16 − (16 + 4 + 1)/6
    4.5
    >>> round(float(r_max(S)), 9)  # 1 / ((16 + 4 + 1)/6 − ½)
    0.333333333
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_immunize.validation import check_finite

__all__ = [
    "condition_number",
    "data_rank",
    "data_singular_values",
    "singular_value_rank",
    "r_min",
    "r_max",
    "feature_condition_number",
    "feature_r_min",
    "feature_r_max",
    "feature_regularizer",
    "spectral_gradient",
    "feature_spectral_gradient",
]

DTYPE = torch.float64
EPS = torch.finfo(DTYPE).eps
#: Relative gap under which two eigenvalues are treated as one repeated eigenvalue.
CLUSTER_RTOL = 1e-10
#: Default floor of R_max's denominator, relative to σ_max².
RMAX_FLOOR = 1e-12
_KINDS = ("r_min", "r_max")


# --------------------------------------------------------------------------- validation


def _check_kind(kind: str) -> None:
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}.")


def _check_square(S: Tensor) -> Tensor:
    if not isinstance(S, Tensor):
        raise TypeError(f"S must be a torch.Tensor, got {type(S).__name__}.")
    if S.ndim < 2 or S.shape[-1] != S.shape[-2]:
        raise ValueError(f"S must be a square matrix (..., K, K), got shape {tuple(S.shape)}.")
    if S.shape[-1] == 0:
        raise ValueError(f"S must be non-empty, got shape {tuple(S.shape)}.")
    check_finite(S, "S")
    S64 = S.to(DTYPE)
    scale = S64.abs().amax(dim=(-2, -1))
    if (scale == 0).any():
        raise ValueError(
            f"S of shape {tuple(S.shape)} is all zero: its condition number is undefined; "
            "expected a matrix with a non-zero entry."
        )
    asym = (S64 - S64.mT).abs().amax(dim=(-2, -1))
    worst = (asym / scale).max().item()
    if worst > 1e-8:
        raise ValueError(
            f"S must be symmetric; found a relative asymmetry of {worst:.3g} (tolerance 1e-8) "
            f"in a matrix of shape {tuple(S.shape)}."
        )
    return S64


def _check_features(Z: Tensor) -> Tensor:
    if not isinstance(Z, Tensor):
        raise TypeError(f"Z must be a torch.Tensor, got {type(Z).__name__}.")
    if Z.ndim < 2:
        raise ValueError(
            f"Z must be a feature batch of shape (..., B, K), got shape {tuple(Z.shape)}."
        )
    if Z.shape[-1] == 0 or Z.shape[-2] == 0:
        raise ValueError(f"Z must be non-empty, got shape {tuple(Z.shape)}.")
    check_finite(Z, "Z")
    Z64 = Z.to(DTYPE)
    if (Z64.abs().amax(dim=(-2, -1)) == 0).any():
        raise ValueError(
            f"Z of shape {tuple(Z.shape)} is all zero: its condition number is undefined; "
            "expected features with a non-zero entry."
        )
    return Z64


def _check_rank(rank: int | None, limit: int) -> None:
    if rank is None:
        return
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= limit:
        raise ValueError(f"rank must be an integer in [1, {limit}], got {rank!r}.")


def _default_rtol(rtol: float | None, side: int, dtype: torch.dtype = DTYPE) -> float:
    if rtol is None:
        return side * _formed_eps(dtype)
    if not rtol >= 0:
        raise ValueError(f"rtol must be a non-negative number, got {rtol!r}.")
    return float(rtol)


def _formed_eps(dtype: torch.dtype) -> float:
    """Round-off unit of a matrix *formed* in ``dtype``: its entries carry errors of that size,
    so eigenvalues below ``K·eps·σ_max`` are indistinguishable from zero however we compute."""
    if not dtype.is_floating_point:
        return EPS
    return max(EPS, torch.finfo(dtype).eps)


# --------------------------------------------------------------------------- spectrum


def _kept(sigma: Tensor, rank: int | None, rtol: float) -> Tensor:
    """Boolean mask of the kept singular values; ``sigma`` sorted ascending on the last dim."""
    if rank is not None:
        n = sigma.shape[-1]
        idx = torch.arange(n, device=sigma.device)
        return (idx >= n - rank).expand_as(sigma)
    return sigma > rtol * sigma[..., -1:]


def _sorted_spectrum(evals: Tensor, evecs: Tensor | None = None):
    """Singular values ``|λ|`` sorted ascending, with the signed eigenvalues (and vectors)."""
    sigma, order = evals.abs().sort(dim=-1)
    lam = evals.gather(-1, order)
    if evecs is None:
        return sigma, lam, None
    vecs = evecs.gather(-1, order.unsqueeze(-2).expand_as(evecs))
    return sigma, lam, vecs


def _condition_from_sigma(sigma: Tensor, keep: Tensor) -> Tensor:
    smallest = torch.where(keep, sigma, torch.full_like(sigma, torch.inf)).amin(dim=-1)
    return sigma[..., -1] / smallest


def _regularizer(kind: str, sigma: Tensor, lam: Tensor, keep: Tensor, floor: float):
    """Value of R and the coefficients ``c`` with ``∇_S R = Σ_i λ_i c_i q_i q_iᵀ``.

    ``sigma``/``lam`` sorted ascending by ``|λ|``; ``keep`` the kept mask.
    """
    keepf = keep.to(sigma.dtype)
    k = keepf.sum(-1, keepdim=True)
    half_mean_sq = 0.5 * (keepf * sigma.square()).sum(-1, keepdim=True) / k
    smax = sigma[..., -1:]
    tol = CLUSTER_RTOL * smax
    if kind == "r_min":
        extreme = smax
        value = (0.5 * smax.square() - half_mean_sq).clamp_min(0.0)  # ≥ 0 despite round-off
        cluster = keep & ((sigma - extreme).abs() <= tol)
        scale = torch.ones_like(value)
    else:
        extreme = torch.where(keep, sigma, torch.full_like(sigma, torch.inf)).amin(-1, keepdim=True)
        d = half_mean_sq - 0.5 * extreme.square()
        d = d.clamp_min(0.0) + floor * smax.square()
        value = 1.0 / d
        cluster = keep & ((sigma - extreme).abs() <= tol)
        scale = 1.0 / d.square()
    clusterf = cluster.to(sigma.dtype)
    coef = (clusterf / clusterf.sum(-1, keepdim=True) - keepf / k) * scale
    # R_min: ∇ = σ_1 P/m − S_k/k ; R_max: ∇ = −∇d/d² = (σ_k P/m − S_k/k)/d².
    return value.squeeze(-1), coef


def _spectral_parts(S64: Tensor, kind: str, rank: int | None, rtol: float, floor: float):
    """``(R, c, λ, Q, κ)`` from one ``eigh``: κ over the same kept spectrum as R."""
    evals, evecs = torch.linalg.eigh(S64)
    sigma, lam, vecs = _sorted_spectrum(evals, evecs)
    keep = _kept(sigma, rank, rtol)
    value, coef = _regularizer(kind, sigma, lam, keep, floor)
    return value, coef, lam, vecs, _condition_from_sigma(sigma, keep)


class _SpectralRegularizer(torch.autograd.Function):
    """Forward: one ``eigh``, giving R and (without a gradient) κ; backward: the closed-form
    gradient ``Q diag(λ∘c) Qᵀ``."""

    @staticmethod
    def forward(ctx, S64: Tensor, kind: str, rank: int | None, rtol: float, floor: float):
        value, coef, lam, vecs, kappa = _spectral_parts(S64, kind, rank, rtol, floor)
        ctx.save_for_backward(coef * lam, vecs)
        ctx.mark_non_differentiable(kappa)
        return value, kappa

    @staticmethod
    def backward(ctx, grad_out: Tensor, _grad_kappa: Tensor | None):
        weights, vecs = ctx.saved_tensors
        grad = (vecs * (weights * grad_out.unsqueeze(-1)).unsqueeze(-2)) @ vecs.mT
        return grad, None, None, None, None


def _symmetrize(S64: Tensor) -> Tensor:
    return 0.5 * (S64 + S64.mT)


def _apply(kind: str, S64: Tensor, rank: int | None, rtol: float, floor: float) -> Tensor:
    return _apply_with_condition(kind, S64, rank, rtol, floor)[0]


def _apply_with_condition(
    kind: str, S64: Tensor, rank: int | None, rtol: float, floor: float
) -> tuple[Tensor, Tensor]:
    return _SpectralRegularizer.apply(_symmetrize(S64), kind, rank, rtol, floor)


# --------------------------------------------------------------------------- matrix API


def _data_matrix(X: Tensor, bias: bool = False) -> Tensor:
    """``X`` (N×D) checked (2-D, non-empty, finite) and converted to float64 as stored, with a
    column of ones appended when ``bias``."""
    if not isinstance(X, Tensor) or X.ndim != 2 or X.numel() == 0:
        shape = tuple(X.shape) if isinstance(X, Tensor) else type(X).__name__
        raise ValueError(f"X must be a non-empty data matrix of shape (N, D), got {shape}.")
    check_finite(X, "X")
    X64 = X.detach().to(DTYPE)
    if bias:
        X64 = torch.cat([X64, torch.ones_like(X64[:, :1])], dim=1)
    return X64


def singular_value_rank(sv: Tensor, shape: tuple[int, ...], rtol: float | None = None) -> int:
    """How many singular values ``sv`` (descending) of a matrix of ``shape`` count: those above
    ``rtol·σ_max``, ``rtol = max(shape)·eps₆₄`` by default — the rule of :func:`data_rank`.

    >>> singular_value_rank(torch.tensor([4.0, 1.0, 1e-17], dtype=torch.float64), (3, 3))
    2
    """
    if sv[0] == 0:
        return 0
    return int((sv > _default_rtol(rtol, max(shape)) * sv[0]).sum())


def data_singular_values(X: Tensor) -> tuple[Tensor, int]:
    """``(σ, rank)`` of a data matrix ``X`` (N×D) as given: its singular values in float64,
    descending, and :func:`data_rank`'s rank read off them (one SVD for both)."""
    X64 = _data_matrix(X)
    sv = torch.linalg.svdvals(X64)
    return sv, singular_value_rank(sv, X64.shape)


def data_rank(X: Tensor, rtol: float | None = None, bias: bool = False) -> int:
    """Numerical rank of a data matrix ``X`` (N×D): the rank of the data *as given*.

    ``X`` is taken exactly as stored and converted to float64; a singular value counts when
    ``σ_i > rtol·σ_max`` with ``rtol = max(N, D)·eps₆₄`` (NumPy's ``matrix_rank`` rule in
    float64) **whatever ``X``'s dtype**: float32 storage moves each singular value by about
    ``eps₃₂`` relative, far less than the real directions it would drop if the threshold used
    ``eps₃₂`` (``docs/numerical-rank.md``). Training (the input-rank rule of every linear
    regularizer) and the reports use this one rule.

    ``bias=True`` appends a column of ones first (for an extractor with a bias term). Use it
    as ``rank=`` for the input-rank rule.

    >>> data_rank(torch.tensor([[1.0, 2.0], [2.0, 4.0], [3.0, 6.0]]))
    1
    """
    X64 = _data_matrix(X, bias)
    tol = _default_rtol(rtol, max(X64.shape))
    n = min(X64.shape)
    if n < max(X64.shape):
        # Fast path (a batch of B ≪ D samples, every training step): the eigenvalues of the
        # n×n Gram matrix are σ², each within n·eps·σ_max² of the truth. When even the smallest
        # is clearly above the threshold the rank is n; otherwise the SVD decides.
        G = X64 @ X64.mT if X64.shape[0] == n else X64.mT @ X64
        mu = torch.linalg.eigvalsh(G)
        top = float(mu[-1])
        if top > 0 and float(mu[0]) > (tol**2 + 4 * n * EPS) * top:
            return n
    return singular_value_rank(torch.linalg.svdvals(X64), X64.shape, tol)


def condition_number(S: Tensor, rtol: float | None = None, rank: int | None = None) -> Tensor:
    """κ(S) = σ_max / σ_min⁺ of a symmetric ``S`` (..., K, K), float64, differentiable.

    ``rank`` keeps the top ``rank`` singular values (input-rank rule); otherwise the tolerance
    rule with ``rtol``, default ``K·eps`` with the eps of the dtype ``S`` was **formed** in
    (``S.dtype``): a float32 ``S = ZᵀZ`` carries float32 round-off in every entry, which
    float64 arithmetic afterwards cannot remove, so its eigenvalues under ``K·eps₃₂·σ_max`` are
    noise. The spectrum itself is always computed in float64. To keep float64 resolution,
    form ``S`` in float64 (as :func:`feature_condition_number` does from ``Z``).

    >>> float(condition_number(torch.diag(torch.tensor([9.0, 3.0, 0.0]))))
    3.0
    >>> float(condition_number(torch.diag(torch.tensor([9.0, 3.0, 1e-3])), rank=2))
    3.0
    """
    S64 = _check_square(S)
    _check_rank(rank, S.shape[-1])
    sigma, _, _ = _sorted_spectrum(torch.linalg.eigvalsh(_symmetrize(S64)))
    keep = _kept(sigma, rank, _default_rtol(rtol, S.shape[-1], S.dtype))
    return _condition_from_sigma(sigma, keep)


def r_min(S: Tensor, rank: int | None = None, rtol: float | None = None) -> Tensor:
    """R_min(S) = ½σ_1² − (1/2k)Σσ_i² (≥ 0, = 0 iff the kept σ_i are equal); shape ``(...)``.

    >>> S = torch.eye(3, dtype=torch.float64)
    >>> float(r_min(S))
    0.0
    """
    S64 = _check_square(S)
    _check_rank(rank, S.shape[-1])
    return _apply("r_min", S64, rank, _default_rtol(rtol, S.shape[-1], S.dtype), RMAX_FLOOR)


def r_max(
    S: Tensor, rank: int | None = None, rtol: float | None = None, floor: float = RMAX_FLOOR
) -> Tensor:
    """R_max(S) = 1/(d(S) + δ), d = (1/2k)Σσ_i² − ½σ_k², δ = ``floor``·σ_1²; shape ``(...)``.

    >>> round(float(r_max(torch.diag(torch.tensor([3.0, 1.0])))), 9)  # d = (9 + 1)/4 − ½
    0.5
    """
    S64 = _check_square(S)
    _check_rank(rank, S.shape[-1])
    return _apply("r_max", S64, rank, _default_rtol(rtol, S.shape[-1], S.dtype), floor)


def spectral_gradient(
    S: Tensor,
    kind: str,
    rank: int | None = None,
    rtol: float | None = None,
    floor: float = RMAX_FLOOR,
) -> tuple[Tensor, Tensor]:
    """``(R(S), ∇_S R)`` for ``kind`` in ``{"r_min", "r_max"}`` without autograd.

    Returns the value ``(...)`` and the symmetric gradient ``(..., K, K)``, both float64.
    """
    _check_kind(kind)
    S64 = _check_square(S).detach()
    _check_rank(rank, S.shape[-1])
    value, coef, lam, vecs, _ = _spectral_parts(
        _symmetrize(S64), kind, rank, _default_rtol(rtol, S.shape[-1], S.dtype), floor
    )
    return value, (vecs * (coef * lam).unsqueeze(-2)) @ vecs.mT


# --------------------------------------------------------------------------- feature API


def _use_gram(Z: Tensor) -> bool:
    return Z.shape[-2] < Z.shape[-1]


def _feature_matrix(Z64: Tensor) -> Tensor:
    """``ZZᵀ`` (B×B) when ``B < K`` (Gram route), else ``ZᵀZ`` (K×K)."""
    return Z64 @ Z64.mT if _use_gram(Z64) else Z64.mT @ Z64


def _feature_args(Z: Tensor, rank: int | None, rtol: float | None) -> tuple[Tensor, float]:
    Z64 = _check_features(Z)
    _check_rank(rank, min(Z.shape[-2], Z.shape[-1]))
    # The tolerance is that of S = ZᵀZ (side K) on either route, so both routes agree.
    return Z64, _default_rtol(rtol, Z.shape[-1])


def feature_condition_number(
    Z: Tensor, rtol: float | None = None, rank: int | None = None
) -> Tensor:
    """κ(ZᵀZ) of a feature batch ``Z`` (..., B, K), by the cheaper of the two routes.

    >>> Z = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    >>> float(feature_condition_number(Z))
    4.0
    """
    Z64, tol = _feature_args(Z, rank, rtol)
    sigma, _, _ = _sorted_spectrum(torch.linalg.eigvalsh(_feature_matrix(Z64)))
    return _condition_from_sigma(sigma, _kept(sigma, rank, tol))


def feature_r_min(Z: Tensor, rank: int | None = None, rtol: float | None = None) -> Tensor:
    """R_min(ZᵀZ) for a feature batch ``Z`` (..., B, K); gradients flow to ``Z``."""
    Z64, tol = _feature_args(Z, rank, rtol)
    return _apply("r_min", _feature_matrix(Z64), rank, tol, RMAX_FLOOR)


def feature_r_max(
    Z: Tensor, rank: int | None = None, rtol: float | None = None, floor: float = RMAX_FLOOR
) -> Tensor:
    """R_max(ZᵀZ) for a feature batch ``Z`` (..., B, K); gradients flow to ``Z``."""
    Z64, tol = _feature_args(Z, rank, rtol)
    return _apply("r_max", _feature_matrix(Z64), rank, tol, floor)


def feature_regularizer(
    Z: Tensor,
    kind: str,
    rank: int | None = None,
    rtol: float | None = None,
    floor: float = RMAX_FLOOR,
) -> tuple[Tensor, Tensor]:
    """``(R(ZᵀZ), κ(ZᵀZ))`` for ``kind`` in ``{"r_min", "r_max"}`` from one ``eigh``: R as
    :func:`feature_r_min` / :func:`feature_r_max` (gradients flow to ``Z``), κ as
    :func:`feature_condition_number` (no gradient), over the same kept spectrum.

    >>> value, kappa = feature_regularizer(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), "r_min")
    >>> float(value), float(kappa)  # S = diag(4, 1): R_min = ½·16 − 17/4
    (3.75, 4.0)
    """
    _check_kind(kind)
    Z64, tol = _feature_args(Z, rank, rtol)
    return _apply_with_condition(kind, _feature_matrix(Z64), rank, tol, floor)


def feature_spectral_gradient(
    Z: Tensor,
    kind: str,
    rank: int | None = None,
    rtol: float | None = None,
    floor: float = RMAX_FLOOR,
    left: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``(R(ZᵀZ), ∇_S R)`` with ``∇_S R`` of shape (..., K, K), by the cheaper route.

    With ``left`` (D×K) the second item is ``left @ ∇_S R`` (D×K) instead, which the Gram route
    computes without forming the K×K matrix (the exact preconditioner ``2θ∇_S R`` uses it).
    On the Gram route ``∇_S R = Zᵀ A diag(c) Aᵀ Z`` with ``(μ, A)`` the eigenpairs of ``ZZᵀ``:
    an eigenvector ``a`` of ``ZZᵀ`` maps to ``u = Zᵀa/√μ`` and ``λ_i u_i u_iᵀ = Zᵀ a_i a_iᵀ Z``.
    """
    _check_kind(kind)
    Z64, tol = _feature_args(Z, rank, rtol)
    Z64 = Z64.detach()
    if not _use_gram(Z64):
        value, grad_S = spectral_gradient(Z64.mT @ Z64, kind, rank=rank, rtol=tol, floor=floor)
        return value, grad_S if left is None else left.detach().to(DTYPE) @ grad_S
    value, coef, _, vecs, _ = _spectral_parts(_symmetrize(Z64 @ Z64.mT), kind, rank, tol, floor)
    AtZ = vecs.mT @ Z64
    if left is None:
        return value, (AtZ.mT * coef.unsqueeze(-2)) @ AtZ
    return value, ((left.detach().to(DTYPE) @ Z64.mT) @ vecs * coef.unsqueeze(-2)) @ AtZ
