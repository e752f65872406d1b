r"""Immunization metrics (Eq. 15–17): the functional layer and the torchmetrics classes over it.

Relative immunization ratio (linear, Eq. 15)::

    ratio_H = κ(S_H(θ)) / κ(Σ_H)      (want ≫ 1)
    ratio_P = κ(S_P(θ)) / κ(Σ_P)      (want ≤ 1)
    RIR     = ratio_H / ratio_P       (want ≫ 1)

with ``κ(Σ)`` over ``r = rank(X)`` and ``κ(S(θ))`` over the top ``min(r, K)`` eigenvalues
(the input-rank rule, ``docs/numerical-rank.md``). A pair is *immunized* when ``RIR > 1``,
``ratio_H > 1`` and ``ratio_P ≤ 1`` (Definition 3.1).

Example:
    >>> import torch
    >>> X_P, X_H = torch.randn(50, 4, dtype=torch.float64), torch.randn(50, 4, dtype=torch.float64)
    >>> out = linear_immunization_ratios(torch.nn.Identity(), X_P, X_H)
    >>> round(out["rir"], 12), round(out["ratio_harmful"], 12)
    (1.0, 1.0)

Metric classes (torchmetrics ``Metric``: accumulate over batches with ``update``, sync across
DDP processes, evaluate with ``compute``), every state in float64:

* :class:`FeatureCovariance` — ``S = Σ_batches ZᵀZ`` (and ``S/n``);
* :class:`ConditionNumber` — ``κ(S)`` of the accumulated feature covariance;
* :class:`RelativeImmunizationRatio` — Eq. 15 (linear, identity reference, input-rank rule);
* :class:`DeepRelativeImmunizationRatio` — Eq. 17 (reference ``θ_0``, ``G`` groups of ``n``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from lightning_immunize.conditioning import (
    condition_number,
    data_singular_values,
    feature_condition_number,
    singular_value_rank,
)
from lightning_immunize.sides import SIDES

__all__ = [
    "extract_features",
    "immunization_ratios",
    "is_immunized",
    "linear_immunization_ratios",
    "FeatureCovariance",
    "ConditionNumber",
    "RelativeImmunizationRatio",
    "DeepRelativeImmunizationRatio",
]

F64 = torch.float64


@torch.no_grad()
def extract_features(
    extractor: Callable[[Tensor], Tensor], X: Tensor, batch_size: int = 1024
) -> Tensor:
    """Features ``(N, K)`` of inputs ``X`` (N, ...) in float64, computed in chunks on the
    extractor's own device and dtype (a ``nn.Module`` with parameters) or as given."""
    param = next(extractor.parameters(), None) if isinstance(extractor, torch.nn.Module) else None
    device = param.device if param is not None else X.device
    dtype = param.dtype if param is not None else X.dtype
    parts = []
    for i in range(0, X.shape[0], batch_size):
        chunk = X[i : i + batch_size].to(device=device, dtype=dtype)
        parts.append(extractor(chunk).reshape(chunk.shape[0], -1).to(torch.float64))
    return torch.cat(parts)


def immunization_ratios(
    kappa_pretrain: float,
    kappa_harmful: float,
    kappa_pretrain_reference: float,
    kappa_harmful_reference: float,
) -> dict[str, float | bool]:
    """The ratios of Eq. 15 from the four condition numbers, plus the ``immunized`` flag.

    Raises:
        ValueError: when a ratio is undefined (NaN): a κ is NaN, both κ of one ratio are
            infinite, or both ratios are infinite (``RIR = inf/inf``). The message names the
            infinite κ. One infinite κ alone is a defined answer (``RIR = inf`` or ``0``).
    """
    named = {
        "κ(S_P(θ))": float(kappa_pretrain),
        "κ(S_H(θ))": float(kappa_harmful),
        "κ(Σ_P) (reference)": float(kappa_pretrain_reference),
        "κ(Σ_H) (reference)": float(kappa_harmful_reference),
    }
    nan = [k for k, v in named.items() if math.isnan(v)]
    if nan:
        raise ValueError(
            f"the immunization ratios are undefined: {', '.join(nan)} is NaN; expected a number."
        )
    ratio_h = _ratio(float(kappa_harmful), float(kappa_harmful_reference), "harmful")
    ratio_p = _ratio(float(kappa_pretrain), float(kappa_pretrain_reference), "pretrain")
    if math.isinf(ratio_h) and math.isinf(ratio_p):
        infinite = [k for k, v in named.items() if math.isinf(v)]
        raise ValueError(
            f"RIR = inf/inf is undefined: {' and '.join(infinite)} are infinite. An infinite "
            "κ(S(θ)) means the extractor maps a direction of the data's span to exactly zero "
            "(features of lower rank than the inputs, e.g. a zero row or column in θ); expected "
            "at most one infinite ratio."
        )
    out: dict[str, float | bool] = {
        "rir": ratio_h / ratio_p,
        "ratio_harmful": ratio_h,
        "ratio_pretrain": ratio_p,
        "kappa_harmful": float(kappa_harmful),
        "kappa_pretrain": float(kappa_pretrain),
        "kappa_harmful_reference": float(kappa_harmful_reference),
        "kappa_pretrain_reference": float(kappa_pretrain_reference),
    }
    out["immunized"] = is_immunized(out["rir"], ratio_h, ratio_p)
    return out


def _ratio(kappa: float, reference: float, side: str) -> float:
    if math.isinf(kappa) and math.isinf(reference):
        raise ValueError(
            f"ratio_{side} = inf/inf is undefined: κ(S(θ)) and its reference κ are both infinite; "
            "expected at least one of them finite."
        )
    return kappa / reference


def is_immunized(rir: float, ratio_harmful: float, ratio_pretrain: float) -> bool:
    """Definition 3.1 (a), (b): ``RIR > 1``, ``ratio_H > 1`` and ``ratio_P ≤ 1``."""
    return bool(rir > 1.0 and ratio_harmful > 1.0 and ratio_pretrain <= 1.0)


def _top_kappa(sv: Tensor, rank: int, shape: tuple[int, ...]) -> float:
    """κ over the top ``rank`` eigenvalues ``σ_i²`` of ``MᵀM`` from ``M``'s singular values
    ``sv`` (descending; ``M`` of ``shape``): ``(σ_1/σ_rank)²``. A ``σ_rank`` that the rank rule
    does not count (round-off level, where an exact zero lands) counts as zero: ``κ = inf``,
    not a number made of round-off."""
    if singular_value_rank(sv, shape) < rank:
        return math.inf
    return float((sv[0] / sv[rank - 1]).square())


def _relative_immunization_ratio_compute(
    Z_P: Tensor, X_P: Tensor, Z_H: Tensor, X_H: Tensor
) -> dict[str, float | bool | int]:
    """Eq. 15 from the features ``Z`` (N×K) and inputs ``X`` (N×D) of each side.

    Every κ comes from singular values in float64: ``κ(Σ) = (σ_1(X)/σ_r(X))²`` over
    ``r = rank(X)`` (:func:`~lightning_immunize.conditioning.data_rank`: float64, ``max(N, D)·
    eps₆₄``, whatever the data's dtype), the identity extractor's own rank; ``κ(S(θ)) =
    (σ_1(Z)/σ_r'(Z))²`` over ``r' = min(r, K)``, whatever their size (input-rank rule). Taking
    σ of the matrices rather than eigenvalues of ``XᵀX`` keeps directions down to ``eps₆₄``
    relative instead of ``√eps₆₄``.
    """
    kappas: dict[str, float] = {}
    ranks: dict[str, int] = {}
    for side, Z, X in (("pretrain", Z_P, X_P), ("harmful", Z_H, X_H)):
        X64 = X.detach().reshape(X.shape[0], -1).to(F64)
        Z64 = Z.detach().reshape(Z.shape[0], -1).to(F64)
        _check_pair(Z64, X64, f"features ({side})", f"inputs ({side})")
        sv_x, input_rank = data_singular_values(X64)
        if input_rank == 0:
            raise ValueError(
                f"the {side} inputs of shape {tuple(X.shape)} have rank 0; expected inputs with "
                "a non-zero entry."
            )
        rank = min(input_rank, Z64.shape[1])
        kappas[side] = _top_kappa(torch.linalg.svdvals(Z64), rank, Z64.shape)
        kappas[f"{side}_reference"] = _top_kappa(sv_x, input_rank, X64.shape)
        ranks[f"rank_{side}"] = rank
        ranks[f"input_rank_{side}"] = input_rank
    out: dict[str, float | bool | int] = dict(
        immunization_ratios(
            kappas["pretrain"],
            kappas["harmful"],
            kappas["pretrain_reference"],
            kappas["harmful_reference"],
        )
    )
    out.update(ranks)
    return out


@torch.no_grad()
def linear_immunization_ratios(
    extractor: Callable[[Tensor], Tensor], X_P: Tensor, X_H: Tensor
) -> dict[str, float | bool | int]:
    """Linear RIR (Eq. 15): the identity (the inputs themselves) is the reference.

    ``X_P`` (N_P×D) and ``X_H`` (N_H×D) are the full datasets as the extractor sees them.
    ``κ(Σ)`` is over ``r = rank(X)`` (float64, ``max(N, D)·eps₆₄``, any dtype) and ``κ(S(θ))``
    over the top ``min(r, K)`` eigenvalues, all from singular values. Returns the dict of
    :func:`immunization_ratios` plus ``rank_*`` (``min(r, K)``) and ``input_rank_*`` (``r``);
    :class:`RelativeImmunizationRatio` computes the same thing batch by batch.
    """
    return _relative_immunization_ratio_compute(
        extract_features(extractor, X_P), X_P, extract_features(extractor, X_H), X_H
    )


# --------------------------------------------------------------------------- metric helpers


def _as_matrix(T: Tensor, name: str) -> Tensor:
    """``T`` (B, K) or (B, *) as a detached float64 matrix (B, K)."""
    if not isinstance(T, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(T).__name__}.")
    if T.ndim < 2:
        raise ValueError(f"{name} must have shape (B, K) or (B, *), got {tuple(T.shape)}.")
    M = T.detach().reshape(T.shape[0], math.prod(T.shape[1:]))
    if M.shape[1] == 0:
        raise ValueError(
            f"{name} has no features, got shape {tuple(T.shape)}; expected at least one feature."
        )
    return M.to(F64)


def _check_pair(A: Tensor, B: Tensor, name_a: str, name_b: str) -> None:
    if A.shape[0] != B.shape[0]:
        raise ValueError(
            f"{name_a} and {name_b} must hold the same samples, got {A.shape[0]} and "
            f"{B.shape[0]} rows."
        )


def _check_positive_int(value: int | None, name: str, optional: bool = True) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


class _SquareStateMetric(Metric):
    """Base of the metrics whose states include Gram matrices ``MᵀM`` summed over batches.

    A Gram state whose width is not given at construction starts as a ``(0, 0)`` tensor and
    takes its width ``W×W`` at the first update; later updates must keep the width.
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def _add_gram_state(self, name: str, width: int | None) -> None:
        side = 0 if width is None else width
        self.add_state(name, default=torch.zeros(side, side, dtype=F64), dist_reduce_fx="sum")

    def _check_gram_width(self, name: str, width: int, what: str) -> None:
        side = getattr(self, name).shape[-1]
        if side != 0 and side != width:
            raise ValueError(
                f"{what} changed width: earlier updates (or num_features/num_inputs) had "
                f"{side}, this one has {width}."
            )

    def _accumulate_gram(self, name: str, M: Tensor, what: str) -> None:
        self._check_gram_width(name, M.shape[1], what)
        state = getattr(self, name)
        width = M.shape[1]
        if state.shape[-1] == 0:
            state = torch.zeros(width, width, dtype=F64, device=state.device)
        M = M.to(device=state.device)
        setattr(self, name, state + M.mT @ M)

    def _gram_state_names(self) -> list[str]:
        return [k for k, v in self._defaults.items() if isinstance(v, Tensor) and v.ndim == 2]

    def _reduce_states(self, incoming_state: dict) -> None:
        # ``forward`` and ``merge_state`` add states; a state not yet updated is (0, 0).
        incoming = dict(incoming_state)
        for name in self._gram_state_names():
            local, other = getattr(self, name), incoming[name]
            if local.shape == other.shape:
                continue
            if other.shape[-1] == 0:
                incoming[name] = torch.zeros_like(local)
            elif local.shape[-1] == 0:
                setattr(self, name, torch.zeros_like(other, device=local.device))
            else:
                raise ValueError(
                    f"cannot merge state {name!r} of width {local.shape[-1]} with one of width "
                    f"{other.shape[-1]}."
                )
        super()._reduce_states(incoming)

    def _nonempty(self, name: str, count: Tensor, what: str) -> Tensor:
        state = getattr(self, name)
        if state.shape[-1] == 0 or int(count) == 0:
            raise ValueError(f"{type(self).__name__} has no {what} yet: call update() first.")
        return state.to(F64)


# --------------------------------------------------------------------------- metric classes


class FeatureCovariance(_SquareStateMetric):
    r"""Feature covariance ``S = ZᵀZ`` accumulated over batches, in float64.

    .. math:: S = \sum_{\text{batches}} Z_b^\top Z_b, \qquad n = \sum_b B_b,

    ``compute()`` returns ``S / n`` (``normalize=True``, the default) or ``S`` (K×K, uncentered,
    as in the paper's Section 2). ``update(Z)`` takes ``Z`` of shape (B, K) or (B, \*),
    flattened to (B, K). ``K``
    is fixed by ``num_features`` or by the first update; a later width raises ``ValueError``.
    Both states are sums (``dist_reduce_fx="sum"``), so under DDP ``compute()`` sees the global
    ``S`` and ``n``; give ``num_features`` when a rank may see no batch at all.

    Example:
        >>> import torch
        >>> metric = FeatureCovariance()
        >>> metric.update(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        >>> metric.update(torch.tensor([[2.0, 2.0]]))
        >>> metric.compute() * 3
        tensor([[5., 4.],
                [4., 8.]], dtype=torch.float64)
    """

    def __init__(self, num_features: int | None = None, normalize: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        _check_positive_int(num_features, "num_features")
        self.num_features = num_features
        self.normalize = bool(normalize)
        self._add_gram_state("covariance", num_features)
        self.add_state(
            "num_samples", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum"
        )

    def update(self, Z: Tensor) -> None:
        """Add the batch ``Z`` (B, K) or (B, ...) to ``S`` and its size to ``n``."""
        Z64 = _as_matrix(Z, "Z")
        self._accumulate_gram("covariance", Z64, "Z")
        self.num_samples += Z64.shape[0]

    def compute(self) -> Tensor:
        """``S / n`` or ``S`` (float64, K×K)."""
        S = self._nonempty("covariance", self.num_samples, "features")
        return S / self.num_samples.to(F64) if self.normalize else S


class ConditionNumber(FeatureCovariance):
    r"""κ of the accumulated feature covariance ``S = Σ ZᵀZ``, float64.

    .. math:: \kappa(S) = \sigma_{\max}(S) / \sigma^{+}_{\min}(S)

    over the kept singular values: by default the tolerance rule (``σ > rtol·σ_max``, ``rtol``
    defaulting to ``K·eps``), or the top ``rank`` whatever their size. For the input-rank rule
    of a linear extractor pass ``rank=min(data_rank(X), K)`` with ``X`` the inputs (or use
    :class:`RelativeImmunizationRatio`, which finds the rank itself). Equal to
    :func:`~lightning_immunize.conditioning.feature_condition_number` on all the features at
    once. The states are those of :class:`FeatureCovariance`.

    Example:
        >>> import torch
        >>> metric = ConditionNumber()
        >>> metric.update(torch.tensor([[2.0, 0.0, 0.0]]))
        >>> metric.update(torch.tensor([[0.0, 1.0, 0.0]]))
        >>> metric.compute()  # 4 / 1; the null direction does not count
        tensor(4., dtype=torch.float64)
        >>> ConditionNumber(rank=2).forward(torch.tensor([[2.0, 0.0], [0.0, 1e-9]]))
        tensor(4.0000e+18, dtype=torch.float64)
    """

    def __init__(
        self,
        num_features: int | None = None,
        rank: int | None = None,
        rtol: float | None = None,
        **kwargs,
    ) -> None:
        super().__init__(num_features=num_features, normalize=False, **kwargs)
        _check_positive_int(rank, "rank")
        self.rank = rank
        self.rtol = rtol

    def compute(self) -> Tensor:
        """κ(S) as a float64 scalar tensor."""
        S = self._nonempty("covariance", self.num_samples, "features")
        return condition_number(S, rtol=self.rtol, rank=self.rank)


class RelativeImmunizationRatio(Metric):
    r"""Relative immunization ratio of a linear extractor (Eq. 15, Definition 3.1), float64.

    .. math::
        \mathrm{ratio}_H = \frac{\kappa(Z_H^\top Z_H)}{\kappa(X_H^\top X_H)},\quad
        \mathrm{ratio}_P = \frac{\kappa(Z_P^\top Z_P)}{\kappa(X_P^\top X_P)},\quad
        \mathrm{RIR} = \mathrm{ratio}_H / \mathrm{ratio}_P

    The reference is the identity extractor: ``κ(XᵀX)`` over ``r = rank(X)`` eigenvalues,
    ``κ(ZᵀZ)`` over the top ``min(r, K)`` whatever their size; ``rank(X)`` by the tolerance rule
    in float64 (``σ > max(N, D)·eps₆₄·σ_max``) for inputs of any dtype, and every κ from
    singular values. ``update(Z_P, X_P, Z_H, X_H)`` appends a batch of each side (features
    ``Z = f_θ(X)`` and the inputs they came from; (B, \*) flattened; ``None`` for both of a side
    skips it). ``compute()`` calls the same function as :func:`linear_immunization_ratios` on
    all the rows seen and returns its dict (ratios, the four κ, ``immunized``, ``rank_*``,
    ``input_rank_*``).

    The rows are kept (float64 list states, ``dist_reduce_fx="cat"``): singular values of the
    data resolve directions a summed ``XᵀX`` cannot, and they do not depend on the row order, so
    ``compute()`` under DDP equals a single process that saw every batch.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> X_P, X_H = torch.randn(60, 4, generator=g), torch.randn(60, 4, generator=g)
        >>> theta = torch.diag(torch.tensor([1.0, 1.0, 1.0, 10.0]))
        >>> metric = RelativeImmunizationRatio()
        >>> for i in range(0, 60, 20):  # three batches
        ...     metric.update(X_P[i:i + 20] @ theta, X_P[i:i + 20], X_H[i:i + 20], X_H[i:i + 20])
        >>> out = metric.compute()  # θ stretches one direction of D_P: ratio_P > 1
        >>> round(out["ratio_harmful"], 12), out["ratio_pretrain"] > 1, out["immunized"]
        (1.0, True, False)
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(
        self, num_features: int | None = None, num_inputs: int | None = None, **kwargs
    ) -> None:
        super().__init__(**kwargs)
        _check_positive_int(num_features, "num_features")
        _check_positive_int(num_inputs, "num_inputs")
        self.widths = {"features": num_features, "inputs": num_inputs}
        for side in SIDES:
            self.add_state(f"features_{side}", default=[], dist_reduce_fx="cat")
            self.add_state(f"inputs_{side}", default=[], dist_reduce_fx="cat")
            self.add_state(
                f"num_{side}", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum"
            )

    def _check_width(self, kind: str, side: str, M: Tensor, label: str) -> None:
        width = self.widths[kind]
        state = getattr(self, f"{kind}_{side}")
        if width is None and isinstance(state, list) and state:
            width = state[0].shape[1]
        if width is not None and width != M.shape[1]:
            raise ValueError(
                f"{label} changed width: earlier updates (or num_features/num_inputs) had "
                f"{width}, this one has {M.shape[1]}."
            )

    def update(
        self,
        Z_P: Tensor | None,
        X_P: Tensor | None,
        Z_H: Tensor | None,
        X_H: Tensor | None,
    ) -> None:
        """Append a batch of each side: features ``Z`` (B, K) and the inputs ``X`` (B, D) they
        came from; ``None`` for both ``Z`` and ``X`` of a side skips that side."""
        batches = []
        for side, Z, X, zn, xn in (
            ("pretrain", Z_P, X_P, "Z_P", "X_P"),
            ("harmful", Z_H, X_H, "Z_H", "X_H"),
        ):
            if Z is None and X is None:
                continue
            if Z is None or X is None:
                raise ValueError(
                    f"{zn} and {xn} must be given together, got only {xn if Z is None else zn}."
                )
            Z64, X64 = _as_matrix(Z, zn), _as_matrix(X, xn)
            _check_pair(Z64, X64, zn, xn)
            self._check_width("features", side, Z64, f"features ({zn})")
            self._check_width("inputs", side, X64, f"inputs ({xn})")
            batches.append((side, Z64, X64))
        for side, Z64, X64 in batches:  # validated first: an error leaves no trace
            getattr(self, f"features_{side}").append(Z64)
            getattr(self, f"inputs_{side}").append(X64)
            setattr(self, f"num_{side}", getattr(self, f"num_{side}") + X64.shape[0])

    def _rows(self, name: str, side: str) -> Tensor:
        state = getattr(self, name)
        parts = [state] if isinstance(state, Tensor) else list(state)
        parts = [p for p in parts if p.ndim == 2]  # an idle DDP rank contributes an empty 1-D
        if not parts or int(getattr(self, f"num_{side}")) == 0:
            raise ValueError(f"{type(self).__name__} has no {side} samples yet: call update().")
        return dim_zero_cat(parts).to(F64)

    def compute(self) -> dict[str, float | bool | int]:
        """The ratios, the four κ, ``immunized`` and the ranks (Python scalars)."""
        rows = {
            f"{kind}_{side}": self._rows(f"{kind}_{side}", side)
            for side in SIDES
            for kind in ("features", "inputs")
        }
        return _relative_immunization_ratio_compute(
            rows["features_pretrain"],
            rows["inputs_pretrain"],
            rows["features_harmful"],
            rows["inputs_harmful"],
        )


class DeepRelativeImmunizationRatio(Metric):
    r"""Relative immunization ratio of a deep net against its initial model (Eq. 17).

    .. math::
        \mathrm{ratio}_H^{(g)} = \frac{\kappa(S_H^{(g)}(\theta_I))}{\kappa(S_H^{(g)}(\theta_0))},
        \quad \mathrm{ratio}_P^{(g)} = \frac{\kappa(S_P^{(g)}(\theta_I))}
        {\kappa(S_P^{(g)}(\theta_0))}, \quad
        \mathrm{RIR}^{(g)} = \mathrm{ratio}_H^{(g)} / \mathrm{ratio}_P^{(g)}

    where ``S^{(g)} = Z_gᵀZ_g`` is the covariance of the (penultimate) features of group ``g``,
    ``g = 1…G``: ``G = num_groups`` random groups of ``n = group_size`` samples per side (paper:
    20 × 100), drawn without replacement within a group, the same groups for the immunized
    model ``θ_I`` and the reference ``θ_0``. κ by the tolerance rule (``rtol``, default
    ``K·eps``). ``compute()`` returns the means over groups of ``ratio_harmful``,
    ``ratio_pretrain``, ``rir`` (the mean of the per-group RIR, not the ratio of the means)
    and of the four κ, the population standard deviations ``*_std`` (``ddof = 0``) of the
    three ratios, ``immunized`` (:func:`is_immunized` on the means), ``num_groups`` and
    ``group_size``.

    ``update(Z_P, Z_P_ref, Z_H, Z_H_ref)`` appends the features of a batch of each side under
    ``θ_I`` and ``θ_0`` (same samples, same order; (B, \*) flattened; a side may be ``None``).
    The features are kept (float64 list states, ``dist_reduce_fx="cat"``); ``compute()`` draws
    the groups from ``torch.Generator().manual_seed(seed)``, D_P's groups first, and raises
    ``ValueError`` when a side has fewer than ``group_size`` samples. Under DDP the states are
    gathered in rank order before ``compute()``, so every rank draws the same groups from the
    same pooled features (which, with a ``DistributedSampler``, are in a different order from a
    single-process run: the groups differ, not their distribution). Every rank must see at
    least one batch.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> Z_P, Z_H = torch.randn(300, 8, generator=g), torch.randn(300, 8, generator=g)
        >>> metric = DeepRelativeImmunizationRatio(num_groups=5, group_size=50, seed=0)
        >>> metric.update(Z_P, Z_P, Z_H @ torch.diag(torch.arange(1.0, 9.0)), Z_H)
        >>> out = metric.compute()
        >>> out["ratio_pretrain"], out["ratio_pretrain_std"], out["ratio_harmful"] > 1
        (1.0, 0.0, True)
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    _STATES = (
        "features_pretrain",
        "features_pretrain_reference",
        "features_harmful",
        "features_harmful_reference",
    )

    def __init__(
        self,
        num_groups: int = 20,
        group_size: int = 100,
        seed: int = 0,
        rtol: float | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        _check_positive_int(num_groups, "num_groups", optional=False)
        _check_positive_int(group_size, "group_size", optional=False)
        self.num_groups = num_groups
        self.group_size = group_size
        self.seed = int(seed)
        self.rtol = rtol
        for name in self._STATES:
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def _append(self, name: str, Z: Tensor, label: str) -> None:
        state = getattr(self, name)
        if isinstance(state, list) and state and state[0].shape[1] != Z.shape[1]:
            raise ValueError(
                f"{label} changed width: earlier updates had {state[0].shape[1]}, this one has "
                f"{Z.shape[1]}."
            )
        state.append(Z)

    def update(
        self,
        Z_P: Tensor | None,
        Z_P_ref: Tensor | None,
        Z_H: Tensor | None,
        Z_H_ref: Tensor | None,
    ) -> None:
        """Append a batch of features of each side under ``θ_I`` and ``θ_0``."""
        for side, Z, Z_ref, zn, rn in (
            ("pretrain", Z_P, Z_P_ref, "Z_P", "Z_P_ref"),
            ("harmful", Z_H, Z_H_ref, "Z_H", "Z_H_ref"),
        ):
            if Z is None and Z_ref is None:
                continue
            if Z is None or Z_ref is None:
                raise ValueError(
                    f"{zn} and {rn} must be given together, got only {rn if Z is None else zn}."
                )
            Z64, R64 = _as_matrix(Z, zn), _as_matrix(Z_ref, rn)
            _check_pair(Z64, R64, zn, rn)
            self._append(f"features_{side}", Z64, zn)
            self._append(f"features_{side}_reference", R64, rn)

    def _features(self, name: str) -> Tensor:
        state = getattr(self, name)
        if isinstance(state, list) and not state:
            return torch.zeros(0, 0, dtype=F64, device=self.device)
        return dim_zero_cat(state).to(F64)

    def compute(self) -> dict[str, float | int | bool]:
        """Means and standard deviations over the groups (Python scalars)."""
        G, n = self.num_groups, self.group_size
        gen = torch.Generator().manual_seed(self.seed)
        kappa: dict[str, Tensor] = {}
        ratio: dict[str, Tensor] = {}
        for side in SIDES:
            Z = self._features(f"features_{side}")
            Z_ref = self._features(f"features_{side}_reference")
            N = Z.shape[0]
            if N < n:
                raise ValueError(
                    f"the {side} side has {N} samples, fewer than group_size={n}: cannot "
                    f"draw groups of {n} without replacement."
                )
            idx = torch.stack([torch.randperm(N, generator=gen)[:n] for _ in range(G)])
            idx = idx.to(Z.device)
            kappa[side] = feature_condition_number(Z[idx], rtol=self.rtol)
            kappa[f"{side}_reference"] = feature_condition_number(Z_ref[idx], rtol=self.rtol)
            ratio[side] = kappa[side] / kappa[f"{side}_reference"]
        per_group = {
            "rir": ratio["harmful"] / ratio["pretrain"],
            "ratio_harmful": ratio["harmful"],
            "ratio_pretrain": ratio["pretrain"],
        }
        out: dict[str, float | int | bool] = {}
        for key, values in per_group.items():
            out[key] = float(values.mean())
            out[f"{key}_std"] = float(values.std(correction=0))
        for key, values in kappa.items():
            out[f"kappa_{key}"] = float(values.mean())
        out["immunized"] = is_immunized(out["rir"], out["ratio_harmful"], out["ratio_pretrain"])
        out["num_groups"] = G
        out["group_size"] = n
        return out
