r"""The :class:`ImmunizationModule` and its pluggable objectives (SPEC §5, Algorithm 1).

One training step, with manual optimization::

    zero_grad
    objective.backward(module, batch)   # task loss on D_P + the objective's regularizer terms,
                                        # each regularizer gradient preconditioned (SPEC §5)
    check the step (finite task loss, regularizer terms and gradients; else ValueError)
    clip gradients; optimizer.step(); scheduler.step()

The training loop knows nothing of the objective's maths: baselines (``rmax_only``, ``opt``,
``imma``, ...) are other :class:`Objective` classes, selected in the config.

**Covariance scale.** Regularizers see the batch-mean feature covariance ``S = ZᵀZ/B`` (the
convention of SPEC §10), so λ values do not depend on the batch size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
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
from lightning_immunize.preconditioning import (
    PreconditionedLinear,
    PreconditionSwitch,
    check_mode,
    convert_linear_layers,
    deferred_preconditioning,
)

__all__ = [
    "Objective",
    "ObjectiveOutput",
    "ConditionNumberObjective",
    "ImmunizationModule",
    "OBJECTIVES",
    "make_objective",
]

SIDES = ("pretrain", "harmful")
COVARIANCE_ESTIMATORS = ("batch", "ema")
#: A kept spectrum with κ ≤ 1 + this is flat: R_max sits at its floor with a zero gradient
#: (the closed form treats eigenvalues within 1e-10·σ_max as one repeated eigenvalue).
FLAT_KAPPA_RTOL = 1e-9


@dataclass
class ObjectiveOutput:
    """What an objective reports for one step.

    Attributes:
        loss: the task loss on the D_P batch (detached).
        logs: scalars to log (``train/<key>``).
        terms: each regularizer term's value by a readable name (``"r_max on harmful"``,
            ``"log κ(S_H)"``); the module refuses the step, before ``optimizer.step()``, if
            one of them is not finite.
    """

    loss: Tensor
    logs: dict[str, Tensor | float] = field(default_factory=dict)
    terms: dict[str, Tensor | float] = field(default_factory=dict)


class Objective:
    """Base class of immunization objectives.

    An objective owns the maths of one step: :meth:`backward` computes the task loss on the
    D_P batch and every regularizer term, and leaves the (preconditioned) gradients in the
    parameters' ``.grad`` by calling ``module.manual_backward`` or by adding to ``.grad``. It
    reports each term's value in :attr:`ObjectiveOutput.terms`, so that the module can name a
    non-finite one.
    """

    #: Name used in configs (``method:``), reports and exported metadata.
    name: str = "objective"

    def prepare(self, module: ImmunizationModule) -> None:
        """Adapt the model once, when the module is built (default: nothing)."""

    def state_dict(self) -> dict[str, Tensor]:
        """Running state to keep in checkpoints (default: none)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def hyperparameters(self) -> dict[str, Any]:
        """The objective's settings, for logs and exported metadata."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def backward(self, module: ImmunizationModule, batch: Mapping[str, Any]) -> ObjectiveOutput:
        raise NotImplementedError


def _check_lambda(name: str, value: float) -> float:
    if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number ≥ 0, got {value!r}.")
    return float(value)


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
        rank_rule: ``"input"`` (SPEC §2 input-rank rule: κ over the top ``rank(X_batch)``
            eigenvalues; linear extractors), ``"tolerance"``, or ``"auto"`` (``input`` for a
            :class:`LinearExtractor`, else ``tolerance``).
        covariance: ``"batch"`` (the paper: each step's global batch, ``S = ZᵀZ/B``) or
            ``"ema"``: ``S = β·S_run + (1−β)·ZᵀZ/B`` with ``S_run`` the running estimate
            (``β = ema_decay``; the first step uses the batch alone). Only the current batch
            carries the gradient, so small batches (64 against 768 features) still see a
            full-rank covariance. ``ema`` works on the K×K covariance (no Gram route) with the
            tolerance rule for κ; its running estimate is saved in checkpoints.
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
        self.lambda_pretrain = _check_lambda("lambda_pretrain", lambda_pretrain)
        if covariance not in COVARIANCE_ESTIMATORS:
            raise ValueError(
                f"Unknown covariance estimator {covariance!r}; expected one of "
                f"{COVARIANCE_ESTIMATORS}."
            )
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay!r}.")
        self.covariance = covariance
        self.ema_decay = float(ema_decay)
        self._running: dict[str, Tensor] = {}
        self.lambda_harmful = _check_lambda("lambda_harmful", lambda_harmful)
        if preconditioner != "auto":
            check_mode(preconditioner)
        if rank_rule not in ("auto", "input", "tolerance"):
            raise ValueError(
                f"Unknown rank_rule {rank_rule!r}; expected 'auto', 'input' or 'tolerance'."
            )
        if not ridge > 0:
            raise ValueError(f"ridge must be > 0, got {ridge!r}.")
        self.preconditioner = preconditioner
        self.ridge = float(ridge)
        self.rank_rule = rank_rule
        self._flat_warned: set[str] = set()

    # -- resolved settings ------------------------------------------------------------------

    def prepare(self, module: ImmunizationModule) -> None:
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
        rule = self.rank_rule
        if rule == "auto":
            rule = "input" if isinstance(extractor, LinearExtractor) else "tolerance"
        if rule == "tolerance":
            return None
        rank = min(data_rank(x.reshape(x.shape[0], -1)), x.shape[0], width)
        if rank == 0:
            raise ValueError(f"the input batch of shape {tuple(x.shape)} has rank 0.")
        return rank

    # -- the step ---------------------------------------------------------------------------

    def terms(self) -> list[tuple[str, str, float]]:
        """``(side, regularizer, λ)`` of the active terms."""
        terms = [
            ("pretrain", "r_min", self.lambda_pretrain),
            ("harmful", "r_max", self.lambda_harmful),
        ]
        return [t for t in terms if t[2] > 0]

    def backward(self, module: ImmunizationModule, batch: Mapping[str, Any]) -> ObjectiveOutput:
        """Eq. 11 by Algorithm 1: task loss + regularizers on the *global* batch (all ranks'
        features, SPEC §9), each side's batch forwarded once.

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
        module: ImmunizationModule,
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
                regularizer * _loss_scale(module), params, retain_graph=True, allow_unused=True
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
        self, module: ImmunizationModule, side: str, value: Tensor, kappa: Tensor
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
            f"{module._step_label()}: the kept spectrum of the feature covariance is flat "
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
        module: ImmunizationModule,
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
        alpha = 2.0 * lam * _loss_scale(module)
        if weight.grad is None:
            weight.grad = (alpha * update).to(weight.dtype)
        else:  # in place: no 784×784 temporaries on the hot path
            weight.grad.add_(update.to(weight.dtype), alpha=alpha)
        return value


class RMaxOnlyObjective(ConditionNumberObjective):
    """Baseline ``rmax_only`` (SPEC §7): ``L(D_P) + λ_H·R_max(S_H)``, i.e. ours with λ_P = 0."""

    name = "rmax_only"

    def __init__(
        self,
        lambda_harmful: float = 1.0,
        preconditioner: str = "auto",
        ridge: float = 1e-3,
        rank_rule: str = "auto",
        covariance: str = "batch",
        ema_decay: float = 0.9,
    ) -> None:
        super().__init__(
            0.0, lambda_harmful, preconditioner, ridge, rank_rule, covariance, ema_decay
        )


class ConditionNumberOptObjective(Objective):
    r"""Baseline ``opt`` (SPEC §7): ``L(D_P) + λ·(log κ(S_P) − log κ(S_H))``, differentiated
    directly through ``eigvalsh`` with autograd (no surrogate, no preconditioning).

    κ by the same rank rule as ours (input rank of the batch for a linear extractor).
    """

    name = "opt"

    def __init__(self, lambda_: float = 1.0, rank_rule: str = "auto") -> None:
        self.lambda_ = _check_lambda("lambda_", lambda_)
        self._ranks = ConditionNumberObjective(rank_rule=rank_rule)
        self.rank_rule = rank_rule

    def hyperparameters(self) -> dict[str, Any]:
        return {"lambda_": self.lambda_, "rank_rule": self.rank_rule}

    def backward(self, module: ImmunizationModule, batch: Mapping[str, Any]) -> ObjectiveOutput:
        x = {side: batch[side][0] for side in SIDES}
        z = {side: module.features(x[side], side=side) for side in SIDES}
        loss = module.task_loss(z["pretrain"], batch["pretrain"][1])
        width = z["pretrain"].shape[-1]
        kappa = {}
        for side in SIDES:
            x_all = gather_rows(x[side], differentiable=False)
            rank = self._ranks.rank_for(module.extractor, x_all, width)
            zs = gather_rows(z[side].reshape(z[side].shape[0], -1))
            kappa[side] = feature_condition_number(zs, rank=rank)
        log_kappa = {side: torch.log(kappa[side]) for side in SIDES}
        log_gap = log_kappa["pretrain"] - log_kappa["harmful"]
        # κ = inf (a zero eigenvalue among the kept ones) makes this gradient NaN; the module
        # refuses such a step before optimizer.step(), naming the term.
        module.manual_backward(loss + self.lambda_ * log_gap)
        return ObjectiveOutput(
            loss=loss.detach(),
            logs={
                "task_loss": loss.detach(),
                "log_kappa_gap": log_gap.detach(),
                "kappa_pretrain": kappa["pretrain"].detach(),
                "kappa_harmful": kappa["harmful"].detach(),
            },
            terms={
                "log κ(S_P)": log_kappa["pretrain"].detach(),
                "log κ(S_H)": log_kappa["harmful"].detach(),
            },
        )


class IMMAObjective(Objective):
    r"""Baseline ``imma`` (Zheng & Yeh 2024; SPEC §7), bi-level.

    Inner loop: ``inner_steps`` differentiable gradient steps (lr ``inner_lr``) of a linear
    probe ``w`` (a fresh copy of the head's shape, zero-initialised) on the D_H batch's
    features with the head's loss, giving ``w_H(θ)``. Outer step: minimise
    ``L(D_P) − λ·L(D_H; w_H(θ), θ)``, back-propagating through the inner steps.
    """

    name = "imma"

    def __init__(self, lambda_: float = 1.0, inner_steps: int = 5, inner_lr: float = 0.1) -> None:
        self.lambda_ = _check_lambda("lambda_", lambda_)
        if inner_steps < 1:
            raise ValueError(f"inner_steps must be ≥ 1, got {inner_steps!r}.")
        if not inner_lr > 0:
            raise ValueError(f"inner_lr must be > 0, got {inner_lr!r}.")
        self.inner_steps = int(inner_steps)
        self.inner_lr = float(inner_lr)

    def backward(self, module: ImmunizationModule, batch: Mapping[str, Any]) -> ObjectiveOutput:
        z_p = module.features(batch["pretrain"][0], side="pretrain")
        loss = module.task_loss(z_p, batch["pretrain"][1])
        x_h, y_h = batch["harmful"][0], gather_rows(batch["harmful"][1], differentiable=False)
        z_h = gather_rows(module.features(x_h, side="harmful").reshape(x_h.shape[0], -1))
        head = module.head
        weight = torch.zeros_like(head.linear.weight, requires_grad=True)
        bias = torch.zeros_like(head.linear.bias, requires_grad=True)
        for _ in range(self.inner_steps):
            inner = self._probe_loss(head, z_h, y_h, weight, bias)
            g_w, g_b = torch.autograd.grad(inner, (weight, bias), create_graph=True)
            weight, bias = weight - self.inner_lr * g_w, bias - self.inner_lr * g_b
        harmful_loss = self._probe_loss(head, z_h, y_h, weight, bias)
        module.manual_backward(loss - self.lambda_ * harmful_loss)
        return ObjectiveOutput(
            loss=loss.detach(),
            logs={"task_loss": loss.detach(), "harmful_probe_loss": harmful_loss.detach()},
            terms={"harmful probe loss L(D_H; w_H(θ))": harmful_loss.detach()},
        )

    @staticmethod
    def _probe_loss(head: nn.Module, z: Tensor, y: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        output = torch.nn.functional.linear(z, weight, bias)
        if output.shape[-1] == 1 and y.ndim == 1:
            output = output.squeeze(-1)
        return head.loss(output, y)


#: Objectives selectable by name (``method:`` in configs).
OBJECTIVES: dict[str, Callable[..., Objective]] = {
    "ours": ConditionNumberObjective,
    "rmax_only": RMaxOnlyObjective,
    "opt": ConditionNumberOptObjective,
    "imma": IMMAObjective,
}


def make_objective(method: str, **kwargs: Any) -> Objective:
    """Build the objective registered under ``method`` (see :data:`OBJECTIVES`)."""
    if method not in OBJECTIVES:
        raise ValueError(f"Unknown method {method!r}; expected one of {sorted(OBJECTIVES)}.")
    return OBJECTIVES[method](**kwargs)


#: ``params → Optimizer`` (LightningCLI parses ``class_path: torch.optim.Adam`` into one).
OptimizerFactory = Callable[[Iterable[Any]], torch.optim.Optimizer]
#: ``optimizer → LR scheduler``.
SchedulerFactory = Callable[
    [torch.optim.Optimizer],
    torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau,
]


def _grad_scaler(module: pl.LightningModule) -> Any:
    """The ``GradScaler`` of the trainer's precision plugin (16-bit mixed precision), else None."""
    plugin = getattr(module._trainer, "precision_plugin", None)
    return getattr(plugin, "scaler", None)


def _loss_scale(module: pl.LightningModule) -> float:
    """The factor ``manual_backward`` multiplies the loss by (1 without a ``GradScaler``), so
    gradients an objective adds to ``.grad`` by hand are on the same scale."""
    scaler = _grad_scaler(module)
    return float(scaler.get_scale()) if scaler is not None else 1.0


@contextmanager
def _frozen_running_stats(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers in train mode normalise with batch statistics as usual, but their
    running statistics do not move (momentum 0 for the forward; restoring the buffers
    afterwards would break autograd, which saves them)."""
    saved = [
        (m, m.momentum, m.num_batches_tracked.clone())
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        and m.training
        and m.track_running_stats
        and m.num_batches_tracked is not None
    ]
    for m, _, _ in saved:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum, count in saved:
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)


class ImmunizationModule(pl.LightningModule):
    """Immunize ``extractor`` (with classifier ``head``) by Algorithm 1, manual optimization.

    Args:
        extractor: feature extractor ``f_θ``: inputs (B, ...) → features (B, K).
        head: classifier ``g_ω`` with ``loss(output, target)`` and ``metric(output, target)``
            (a :class:`~lightning_immunize.models.ClassifierHead`); ``None`` takes the
            extractor's own classifier (``extractor.make_head()``, e.g. a timm model's fc).
        objective: an :class:`Objective` (default: ours with λ_P = λ_H = 1).
        optimizer: a factory ``params → Optimizer`` (default ``torch.optim.Adam(lr=1e-3)``);
            it receives two parameter groups, extractor and head.
        extractor_lr / head_lr / extractor_weight_decay / head_weight_decay: per-group
            overrides (``None`` keeps the optimizer's own value).
        scheduler: a factory ``optimizer → LR scheduler`` stepped every ``scheduler_interval``
            (``"step"`` or ``"epoch"``).
        gradient_clip_val: clip the global gradient norm to this value (``None``: no clip).
        label_smoothing: passed to the head's loss.
        method / method_args: shortcut for ``objective``: the name of an objective in
            :data:`OBJECTIVES` (``ours``, ``rmax_only``, ``opt``, ``imma``) and its arguments.
        harmful_bn_stats: whether forwards of harmful batches update BatchNorm running
            statistics. Default ``False``: the released model's running statistics stay those
            of its own task D_P; a D_H forward made only for the regularizer uses the batch
            statistics as usual (same gradients) but leaves the running ones as they were.
    """

    def __init__(
        self,
        extractor: nn.Module,
        head: nn.Module | None = None,
        objective: Objective | None = None,
        optimizer: OptimizerFactory | None = None,
        extractor_lr: float | None = None,
        head_lr: float | None = None,
        extractor_weight_decay: float | None = None,
        head_weight_decay: float | None = None,
        scheduler: SchedulerFactory | None = None,
        scheduler_interval: str = "epoch",
        gradient_clip_val: float | None = None,
        label_smoothing: float = 0.0,
        method: str | None = None,
        method_args: dict[str, Any] | None = None,
        harmful_bn_stats: bool = False,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.harmful_bn_stats = harmful_bn_stats
        if method is not None:
            if objective is not None:
                raise ValueError(
                    f"give either objective or method, not both (got method={method!r} and "
                    f"objective={type(objective).__name__})."
                )
            objective = make_objective(method, **(method_args or {}))
        self.extractor = extractor
        if head is None:
            if not hasattr(extractor, "make_head"):
                raise ValueError(
                    f"head is None but {type(extractor).__name__} has no make_head() to take "
                    "the model's own classifier from; pass a head."
                )
            head = extractor.make_head()
        self.head = head
        self.objective = objective if objective is not None else ConditionNumberObjective()
        if not isinstance(self.objective, Objective):
            raise TypeError(f"objective must be an Objective, got {type(objective).__name__}.")
        self.objective.prepare(self)
        self.optimizer_factory = optimizer
        self.group_options = {
            "extractor": {"lr": extractor_lr, "weight_decay": extractor_weight_decay},
            "head": {"lr": head_lr, "weight_decay": head_weight_decay},
        }
        if scheduler_interval not in ("step", "epoch"):
            raise ValueError(
                f"scheduler_interval must be 'step' or 'epoch', got {scheduler_interval!r}."
            )
        self.scheduler_factory = scheduler
        self.scheduler_interval = scheduler_interval
        if gradient_clip_val is not None and not gradient_clip_val > 0:
            raise ValueError(f"gradient_clip_val must be > 0 or None, got {gradient_clip_val!r}.")
        self.gradient_clip_val = gradient_clip_val
        self.label_smoothing = float(label_smoothing)
        self.save_hyperparameters(
            ignore=["extractor", "head", "objective", "optimizer", "scheduler"]
        )

    # -- model ------------------------------------------------------------------------------

    def features(self, x: Tensor, side: str = "pretrain") -> Tensor:
        """Features ``f_θ(x)`` (B, K); ``side`` names the dataset in error messages.

        Raises ``ValueError`` for a batch of one sample and for NaN/inf in the inputs or the
        features, naming the step, the dataset and the tensor.
        """
        if x.shape[0] < 2:
            raise ValueError(
                f"the {side} batch has {x.shape[0]} sample(s); the regularizers need at least 2."
            )
        self._check_finite(x, side, "inputs")
        if side == "harmful" and not self.harmful_bn_stats:
            with _frozen_running_stats(self.extractor):
                z = self.extractor(x)
        else:
            z = self.extractor(x)
        self._check_finite(z, side, "features")
        return z

    def _step_label(self) -> int | str:
        """The trainer's global step, or ``"?"`` outside a trainer (for messages)."""
        return self._trainer.global_step if self._trainer is not None else "?"

    def _check_finite(self, t: Tensor, side: str, what: str) -> None:
        if t.is_floating_point() and not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(
                f"non-finite {what} (NaN or inf in {bad} of {t.numel()} entries) in the "
                f"{side} dataset's batch at training step {self._step_label()}."
            )

    def _check_step(self, out: ObjectiveOutput) -> None:
        """Refuse, before ``optimizer.step()`` so the parameters stay as they were, a step
        whose task loss, regularizer term (``out.terms``) or parameter gradient is not finite.

        One device sync when all is well. Gradients are not checked under a ``GradScaler``
        (16-bit mixed precision), which skips overflowing steps itself.
        """
        name = self.objective.name
        terms = {k: torch.as_tensor(v) for k, v in out.terms.items()}
        grads: list[tuple[str, Tensor]] = []
        if _grad_scaler(self) is None:
            grads = [(n, p.grad) for n, p in self.named_parameters() if p.grad is not None]
        flags = [torch.isfinite(out.loss).all()]
        flags += [torch.isfinite(v).all() for v in terms.values()]
        flags += [torch.isfinite(g).all() for _, g in grads]
        device = out.loss.device
        if bool(torch.stack([f.to(device) for f in flags]).all()):
            return
        step = self._step_label()
        refused = "The step was refused before optimizer.step(): the parameters were not updated."
        if not torch.isfinite(out.loss).all():
            raise ValueError(
                f"non-finite task loss ({float(out.loss)}) on the pretrain dataset's batch at "
                f"training step {step} (objective {name!r}); expected a finite loss. {refused}"
            )
        bad_terms = [f"{k} = {float(v)}" for k, v in terms.items() if not torch.isfinite(v).all()]
        if bad_terms:
            raise ValueError(
                f"objective {name!r}: non-finite regularizer term {', '.join(bad_terms)} at "
                f"training step {step}; expected a finite value (task loss "
                f"{float(out.loss):.6g}). A degenerate feature spectrum is the usual cause, "
                "e.g. κ = inf from a zero eigenvalue among those the rank rule keeps (dead or "
                f"collapsed features). {refused}"
            )
        bad = [(n, g) for n, g in grads if not torch.isfinite(g).all()]
        n, g = bad[0]
        more = f" (and {len(bad) - 1} more parameter(s))" if len(bad) > 1 else ""
        finite = ", ".join(f"{k} = {float(v):.6g}" for k, v in terms.items()) or "none"
        raise ValueError(
            f"objective {name!r}: non-finite gradient (NaN or inf in "
            f"{int((~torch.isfinite(g)).sum())} of {g.numel()} entries) of {n}{more} at "
            f"training step {step}; expected finite gradients (the task loss "
            f"{float(out.loss):.6g} and the regularizer terms [{finite}] are finite). {refused}"
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.extractor(x))

    def task_loss(self, z: Tensor, y: Tensor) -> Tensor:
        output = self.head(z)
        if self.label_smoothing:
            return self.head.loss(output, y, label_smoothing=self.label_smoothing)
        return self.head.loss(output, y)

    # -- optimization -----------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        # Lightning restores checkpoint weights before its precision plugin converts the
        # module: under "64-true" a float64 checkpoint would be rounded through float32
        # parameters on resume (≈1e-7 relative). Converting here, first, keeps it exact.
        trainer = self._trainer
        if trainer is not None and str(trainer.precision).startswith("64"):
            self.to(torch.float64)

    def on_fit_start(self) -> None:
        self.check_data()

    @torch.no_grad()
    def check_data(self) -> None:
        """Refuses, before the first training step, a D_P or D_H whose first batch-worth of
        training samples has NaN/inf inputs, all-zero inputs or all-zero features: a rank-0
        covariance, whose condition number (and so every regularizer) is undefined.

        Looks at the data module's ``pretrain`` / ``harmful`` datasets (any map-style dataset
        of ``(x, y)``); does nothing without them.
        """
        dm = getattr(self._trainer, "datamodule", None)
        param = next(self.extractor.parameters(), None)
        for side in SIDES:
            dataset = getattr(dm, side, None)
            try:
                n = min(len(dataset), max(2, int(getattr(dm, "batch_size", 64))))
            except TypeError:  # no dataset, or an iterable one without a length
                continue
            x = torch.stack([torch.as_tensor(dataset[i][0]) for i in range(n)])
            if param is not None and x.is_floating_point():
                x = x.to(device=param.device, dtype=param.dtype)
            self._check_finite(x, side, "inputs")
            if not bool(x.ne(0).any()):
                raise ValueError(
                    f"the {side} dataset's first {n} training inputs are all zero: their "
                    "covariance has rank 0, so its condition number is undefined. Check the "
                    "data (empty images? a column-selection mistake?)."
                )
            was_training = self.extractor.training
            self.extractor.eval()
            try:
                z = self.extractor(x)
            finally:
                self.extractor.train(was_training)
            self._check_finite(z, side, "features")
            if not bool(z.ne(0).any()):
                raise ValueError(
                    f"the extractor maps the {side} dataset's first {n} training inputs to "
                    "all-zero features: their covariance has rank 0, so its condition number "
                    "is undefined (dead activations? a zero-initialized extractor?)."
                )

    def configure_optimizers(self):
        groups = []
        for name, part in (("extractor", self.extractor), ("head", self.head)):
            params = [p for p in part.parameters() if p.requires_grad]
            if not params:
                continue
            group: dict[str, Any] = {"params": params, "name": name}
            group.update({k: v for k, v in self.group_options[name].items() if v is not None})
            groups.append(group)
        if not groups:
            raise ValueError("the extractor and the head have no trainable parameters.")
        factory = self.optimizer_factory or (lambda p: torch.optim.Adam(p, lr=1e-3))
        optimizer = factory(groups)
        if self.scheduler_factory is None:
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": {
                "scheduler": self.scheduler_factory(optimizer),
                "interval": self.scheduler_interval,
            },
        }

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        optimizer = self.optimizers()
        optimizer.zero_grad()
        for side in SIDES:  # before any objective touches them, so the message names the side
            self._check_finite(batch[side][0], side, "inputs")
        out = self.objective.backward(self, batch)
        self._check_step(out)
        if self.gradient_clip_val is not None:
            self.clip_gradients(optimizer, gradient_clip_val=self.gradient_clip_val)
        optimizer.step()
        if self.scheduler_interval == "step":
            self._step_scheduler()
        batch_size = int(batch["pretrain"][0].shape[0])
        for name, value in out.logs.items():
            self.log(
                f"train/{name}",
                value,
                on_step=True,
                on_epoch=False,
                batch_size=batch_size,
                prog_bar=name in ("task_loss", "kappa_harmful"),
            )
        return out.loss

    def on_train_epoch_end(self) -> None:
        if self.scheduler_interval == "epoch":
            self._step_scheduler()

    def _step_scheduler(self) -> None:
        scheduler = self.lr_schedulers()
        if scheduler is None:
            return
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            # It needs a figure to watch: the latest validation loss, else the task loss.
            metrics = self.trainer.callback_metrics
            value = metrics.get("val/task_loss", metrics.get("train/task_loss"))
            if value is not None:
                scheduler.step(value)
            return
        scheduler.step()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.objective.load_state_dict(checkpoint.get("objective_state", {}))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["objective_state"] = self.objective.state_dict()
        # Plain types only, so the checkpoint still loads with ``weights_only=True``.
        checkpoint["immunization"] = {
            "method": self.objective.name,
            **{
                k: v
                for k, v in self.objective.hyperparameters().items()
                if isinstance(v, int | float | str | bool)
            },
        }

    # -- evaluation -------------------------------------------------------------------------

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        pretrain = batch.get("pretrain")
        if pretrain is None:
            return
        x, y = pretrain[0], pretrain[1]
        output = self(x)
        self.log("val/task_loss", self.head.loss(output, y), batch_size=x.shape[0], prog_bar=True)
        self.log(f"val/{self.head.metric_name}", self.head.metric(output, y), batch_size=x.shape[0])

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        pretrain = batch.get("pretrain")
        if pretrain is None:
            return
        x, y = pretrain[0], pretrain[1]
        output = self(x)
        self.log("test/task_loss", self.head.loss(output, y), batch_size=x.shape[0])
        self.log(
            f"test/{self.head.metric_name}", self.head.metric(output, y), batch_size=x.shape[0]
        )
