r"""Ours: the condition-number immunization of Eq. 11, applied by Algorithm 1.

**Covariance scale.** Regularizers see the batch-mean feature covariance ``S = ZᵀZ/B``, so λ
values do not depend on the batch size (the reference code sums, ``S = ZᵀZ``: its λ_P is ours
divided by ``B²`` and its λ_H ours times ``B²``; ``docs/reference-units.md``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_immunize.conditioning import (
    RMAX_FLOOR,
    data_rank,
    feature_condition_number,
    feature_r_max,
    feature_r_min,
    feature_spectral_gradient,
    r_max,
    r_min,
    spectral_gradient,
)
from lightning_immunize.distributed import all_reduce_sum, gather_rows, world_size
from lightning_immunize.models import LinearExtractor
from lightning_immunize.objectives.base import (
    Objective,
    ObjectiveHost,
    ObjectiveOutput,
    check_lambda,
)
from lightning_immunize.preconditioning import (
    PreconditionedLinear,
    PreconditionSwitch,
    check_mode,
    convert_linear_layers,
    deferred_preconditioning,
)
from lightning_immunize.sides import SIDES
from lightning_immunize.validation import unknown_choice

__all__ = [
    "ConditionNumberObjective",
    "input_rank",
    "eq11_terms",
    "RANK_RULES",
    "COVARIANCE_ESTIMATORS",
]

COVARIANCE_ESTIMATORS = ("batch", "ema")
#: A kept spectrum with κ ≤ 1 + this is flat: R_max sits at its floor with a zero gradient
#: (the closed form treats eigenvalues within 1e-10·σ_max as one repeated eigenvalue).
FLAT_KAPPA_RTOL = 1e-9

RANK_RULES = ("auto", "input", "tolerance")


def check_rank_rule(rule: str) -> None:
    if rule not in RANK_RULES:
        raise unknown_choice("rank_rule", rule, RANK_RULES)


def input_rank(extractor: nn.Module, x: Tensor, width: int, rule: str = "auto") -> int | None:
    """How many eigenvalues of ``S = ZᵀZ`` count for the input batch ``x`` (B, ...).

    ``"input"``: the input-rank rule, ``min(rank(x), B, width)`` with ``rank`` by
    :func:`~lightning_immunize.conditioning.data_rank` (float64, any dtype) — for a linear
    extractor a direction squeezed to round-off still counts; ``"tolerance"``: ``None`` (the
    tolerance rule on the features); ``"auto"``: ``input`` for a
    :class:`~lightning_immunize.models.LinearExtractor`, else ``tolerance``.

    Raises:
        ValueError: for an unknown ``rule`` or a batch of rank 0.
    """
    check_rank_rule(rule)
    if rule == "auto":
        rule = "input" if isinstance(extractor, LinearExtractor) else "tolerance"
    if rule == "tolerance":
        return None
    rank = min(data_rank(x.reshape(x.shape[0], -1)), x.shape[0], width)
    if rank == 0:
        raise ValueError(
            f"the input batch of shape {tuple(x.shape)} has rank 0; expected inputs with a "
            "non-zero entry."
        )
    return rank


def eq11_terms(lambda_pretrain: float, lambda_harmful: float) -> list[tuple[str, str, float]]:
    """Eq. 11's regularizer terms ``(side, regularizer, λ)`` whose λ is not 0: ``R_min`` on
    D_P, ``R_max`` on D_H."""
    terms = [("pretrain", "r_min", lambda_pretrain), ("harmful", "r_max", lambda_harmful)]
    return [t for t in terms if t[2] > 0]


class ConditionNumberObjective(Objective):
    r"""Ours (Eq. 11): ``L(D_P) + λ_P·R_min(S_P) + λ_H·R_max(S_H)``.

    Args:
        lambda_pretrain: ``λ_P ≥ 0`` (``0`` gives the ``rmax_only`` baseline).
        lambda_harmful: ``λ_H ≥ 0``.
        preconditioner: ``"exact"`` (``2θ∇_S R``; linear extractors only), ``"ridge"``
            (layer-wise ``(Σ+ρI)⁻¹`` on every ``PreconditionedLinear`` of the extractor),
            ``"none"``, or ``"auto"`` (``exact`` for a :class:`LinearExtractor`, else ``none``).
        ridge: relative ridge ``ρ`` of the ``ridge`` mode; :meth:`prepare` converts the
            extractor's ``nn.Linear`` layers (same parameters) and sets it on them.
        rank_rule: ``"input"`` (the input-rank rule, ``docs/numerical-rank.md``: κ over the
            top ``rank(X_batch)`` eigenvalues; linear extractors), ``"tolerance"``, or
            ``"auto"`` (``input`` for a
            :class:`LinearExtractor`, else ``tolerance``).
        covariance: ``"batch"`` (the paper: each step's global batch, ``S = ZᵀZ/B``) or
            ``"ema"``: ``S = β·S_run + (1−β)·ZᵀZ/B`` with ``S_run`` the running estimate
            (``β = ema_decay``; the first step uses the batch alone). Only the current batch
            carries the gradient, so small batches (64 against 768 features) still see a
            full-rank covariance. ``ema`` works on the K×K covariance (no Gram route) with the
            tolerance rule for κ; its running estimate is saved in checkpoints.
        ema_decay: ``β ∈ [0, 1)``, the weight of the running estimate with
            ``covariance="ema"`` (unused with ``"batch"``).
    """

    name = "ours"

    def __init__(
        self,
        lambda_pretrain: float = 1.0,
        lambda_harmful: float = 1.0,
        preconditioner: str = "auto",
        ridge: float = 1e-3,
        rank_rule: str = "auto",
        covariance: str = "batch",
        ema_decay: float = 0.9,
    ) -> None:
        self.lambda_pretrain = check_lambda("lambda_pretrain", lambda_pretrain)
        if covariance not in COVARIANCE_ESTIMATORS:
            raise unknown_choice("covariance estimator", covariance, COVARIANCE_ESTIMATORS)
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay!r}.")
        self.covariance = covariance
        self.ema_decay = float(ema_decay)
        self._running: dict[str, Tensor] = {}
        self.lambda_harmful = check_lambda("lambda_harmful", lambda_harmful)
        if preconditioner != "auto":
            check_mode(preconditioner)
        check_rank_rule(rank_rule)
        if not ridge > 0:
            raise ValueError(f"ridge must be > 0, got {ridge!r}.")
        self.preconditioner = preconditioner
        self.ridge = float(ridge)
        self.rank_rule = rank_rule
        self._flat_warned: set[str] = set()

    # -- resolved settings ------------------------------------------------------------------

    def prepare(self, module: ObjectiveHost) -> None:
        """``ridge`` mode: turn the extractor's ``nn.Linear`` layers into preconditioned ones
        (same parameters) so each regularizer's weight gradient gets ``(Σ+ρI)⁻¹``."""
        if self.mode_for(module.extractor) != "ridge":
            return
        convert_linear_layers(module.extractor, ridge=self.ridge)
        if not any(isinstance(m, PreconditionedLinear) for m in module.extractor.modules()):
            raise ValueError(
                f"preconditioner 'ridge' needs nn.Linear layers in the extractor; "
                f"{type(module.extractor).__name__} has none. Use 'none'."
            )

    def mode_for(self, extractor: nn.Module) -> str:
        linear = isinstance(extractor, LinearExtractor)
        mode = self.preconditioner
        if mode == "auto":
            return "exact" if linear else "none"
        if mode == "exact" and not linear:
            raise ValueError(
                "preconditioner 'exact' needs a LinearExtractor (it uses 2·θ·∇_S R); got "
                f"{type(extractor).__name__}. Use 'ridge' (layer-wise, nn.Linear layers) or 'none'."
            )
        return mode

    def rank_for(self, extractor: nn.Module, x: Tensor, width: int) -> int | None:
        """The rank at which κ and the regularizers are taken for input batch ``x``."""
        return input_rank(extractor, x, width, self.rank_rule)

    # -- the step ---------------------------------------------------------------------------

    def terms(self) -> list[tuple[str, str, float]]:
        """``(side, regularizer, λ)`` of the active terms."""
        return eq11_terms(self.lambda_pretrain, self.lambda_harmful)

    def backward(self, module: ObjectiveHost, batch: Mapping[str, Any]) -> ObjectiveOutput:
        """Eq. 11 by Algorithm 1: task loss + regularizers on the *global* batch (all ranks'
        features, ``docs/distributed.md``), each side's batch forwarded once.

        ``none``: one backward of the sum. ``exact``: the task loss's backward, then the
        closed-form term added to θ's gradient, the same on every rank. ``ridge``: see
        :meth:`_ridge_backward`.
        """
        extractor = module.extractor
        mode = self.mode_for(extractor)
        x = {side: batch[side][0] for side in SIDES}
        terms = self.terms()
        deferred: AbstractContextManager[PreconditionSwitch | None] = (
            deferred_preconditioning(extractor) if mode == "ridge" else nullcontext()
        )
        with deferred as switch:
            z = {"pretrain": module.features(x["pretrain"], side="pretrain")}
            if any(side == "harmful" for side, _, _ in terms):
                with torch.no_grad() if mode == "exact" else nullcontext():
                    z["harmful"] = module.features(x["harmful"], side="harmful")
        loss = module.task_loss(z["pretrain"], batch["pretrain"][1])
        width = z["pretrain"].shape[-1]
        rank = {
            side: self.rank_for(extractor, gather_rows(x[side], differentiable=False), width)
            for side in SIDES
        }
        logs: dict[str, Tensor | float] = {"task_loss": loss.detach()}
        values: dict[str, Tensor] = {}
        if mode == "exact":
            module.manual_backward(loss)
            for side, kind, lam in terms:
                z_all = gather_rows(z[side].detach(), differentiable=False)
                values[side] = self._exact_step(module, z_all, kind, lam, rank[side], side)
        else:
            regularizer: Tensor | float = 0.0
            for side, kind, lam in terms:
                values[side] = self._regularizer(kind, gather_rows(z[side]), rank[side], side)
                regularizer = regularizer + lam * values[side]
            if switch is not None and terms:
                self._ridge_backward(module, loss, regularizer, switch)
            else:
                module.manual_backward(loss + regularizer)
        for side, kind, _ in terms:
            logs[kind] = values[side].detach()
        for side in SIDES:
            zs = z.get(side)
            if zs is None:
                with torch.no_grad():
                    zs = module.features(x[side], side=side)
            z_all = gather_rows(zs.detach().reshape(zs.shape[0], -1), differentiable=False)
            logs[f"kappa_{side}"] = feature_condition_number(z_all, rank=rank[side])
        for side, kind, _ in terms:
            if kind == "r_max":
                self._warn_if_at_floor(module, side, values[side], logs[f"kappa_{side}"])
        return ObjectiveOutput(
            loss=loss.detach(),
            logs=logs,
            terms={f"{kind} on {side}": values[side].detach() for side, kind, _ in terms},
        )

    @staticmethod
    def _ridge_backward(
        module: ObjectiveHost,
        loss: Tensor,
        regularizer: Tensor | float,
        switch: PreconditionSwitch,
    ) -> None:
        """Algorithm 1 with the ``ridge`` preconditioner from **one** forward of each side.

        The forward ran under :func:`deferred_preconditioning`, so each ``PreconditionedLinear``
        decides at backward time: the regularizer's gradients are taken first with
        ``autograd.grad`` while the switch is on (weight gradients times ``(Σ+ρI)⁻¹``), then the
        task loss goes through ``manual_backward`` with it off (plain), and the two are summed
        in ``.grad``. A second forward would update BatchNorm statistics twice and draw other
        dropout masks; two ``manual_backward`` calls would upset DDP, which expects one
        backward per step (the head is not in the regularizer's graph). The regularizer's
        gradients bypass DDP's averaging, so they are averaged over ranks here: each rank holds
        ``W·∂R/∂θ`` of its own rows (the all-gather's backward sums over ranks), and the mean
        is the global-batch gradient, the same on every rank — as in the ``exact`` mode.
        """
        params = [p for p in module.extractor.parameters() if p.requires_grad]
        if not (params and isinstance(regularizer, Tensor) and regularizer.requires_grad):
            module.manual_backward(loss)  # nothing of the extractor to regularize
            return
        with switch.on():
            grads = torch.autograd.grad(
                regularizer * module.loss_scale(), params, retain_graph=True, allow_unused=True
            )
        module.manual_backward(loss)
        pairs = [(p, g) for p, g in zip(params, grads, strict=True) if g is not None]
        if world_size() > 1 and pairs:
            flat = all_reduce_sum(torch.cat([g.reshape(-1) for _, g in pairs])) / world_size()
            sizes = [g.numel() for _, g in pairs]
            chunks = flat.split(sizes)
            pairs = [(p, c.view_as(g)) for (p, g), c in zip(pairs, chunks, strict=True)]
        for p, g in pairs:
            if p.grad is None:
                p.grad = g.to(p.dtype)
            else:
                p.grad.add_(g.to(p.dtype))

    def _warn_if_at_floor(
        self, module: ObjectiveHost, side: str, value: Tensor, kappa: Tensor
    ) -> None:
        """Warn, once per objective and side, when R_max sits at its floor: a flat kept
        spectrum (rank 1 or all eigenvalues equal) gives ``d(S) = 0``, ``R_max = 1/(floor·σ_1²)``
        and an exactly zero gradient, so the term does nothing."""
        if side in self._flat_warned:
            return
        if self.covariance == "ema":  # the regularized S is the running one, not the batch's
            S = self._running[side]
            at_floor = bool(value.detach() * S.square().sum() >= 0.5 / RMAX_FLOOR)
        else:
            at_floor = bool(kappa <= 1.0 + FLAT_KAPPA_RTOL)
        if not at_floor:
            return
        self._flat_warned.add(side)
        rank_zero_warn(
            f"R_max on the {side} batch is at its floor at training step "
            f"{module.step_label()}: the kept spectrum of the feature covariance is flat "
            f"(κ = {float(kappa):.6g}; expected κ > 1 — rank-1 features or all eigenvalues "
            "equal), so R_max = 1/(floor·σ_max²) has a zero gradient and this term does not "
            f"immunize. Check the {side} data (identical or collinear samples? a batch of one "
            "class?) and the extractor (collapsed features?). Warned once per objective and side."
        )

    def _regularizer(self, kind: str, z: Tensor, rank: int | None, side: str) -> Tensor:
        z = z.reshape(z.shape[0], -1) / math.sqrt(z.shape[0])
        if self.covariance == "ema":
            S, _ = self._ema_covariance(z, side)
            return r_min(S) if kind == "r_min" else r_max(S)
        return feature_r_min(z, rank=rank) if kind == "r_min" else feature_r_max(z, rank=rank)

    def _ema_covariance(self, z: Tensor, side: str) -> tuple[Tensor, float]:
        """``(S, weight of the batch part)``; updates the running estimate of ``side``."""
        z64 = z.to(torch.float64)
        batch = z64.mT @ z64
        previous = self._running.get(side)
        if previous is None or previous.shape != batch.shape:
            S, weight = batch, 1.0
        else:
            weight = 1.0 - self.ema_decay
            S = self.ema_decay * previous.to(batch.device) + weight * batch
        self._running[side] = S.detach()
        return S, weight

    def state_dict(self) -> dict[str, Tensor]:
        return {f"running_{side}": S.cpu() for side, S in self._running.items()}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        self._running = {k.removeprefix("running_"): v for k, v in state.items()}

    def _exact_step(
        self,
        module: ObjectiveHost,
        z: Tensor,
        kind: str,
        lam: float,
        rank: int | None,
        side: str,
    ) -> Tensor:
        """Add ``λ·2θ∇_S R`` (the exact preconditioned gradient, D×K) to θ's gradient."""
        weight = module.extractor.linear.weight  # θᵀ, K×D
        z = z / math.sqrt(z.shape[0])
        if self.covariance == "ema":
            S, batch_weight = self._ema_covariance(z, side)
            value, grad_S = spectral_gradient(S, kind)
            grad_theta = batch_weight * (weight.detach().mT.to(torch.float64) @ grad_S)
        else:
            value, grad_theta = feature_spectral_gradient(
                z, kind, rank=rank, left=weight.detach().mT
            )
        update = grad_theta.mT
        alpha = 2.0 * lam * module.loss_scale()
        if weight.grad is None:
            weight.grad = (alpha * update).to(weight.dtype)
        else:  # in place: no 784×784 temporaries on the hot path
            weight.grad.add_(update.to(weight.dtype), alpha=alpha)
        return value
