r"""The baselines of Section 5: ``rmax_only``, ``opt`` (the condition number differentiated
directly) and ``imma`` (IMMA's bi-level probe)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_immunize.conditioning import feature_condition_number
from lightning_immunize.distributed import gather_rows
from lightning_immunize.objectives.base import (
    Objective,
    ObjectiveHost,
    ObjectiveOutput,
    check_lambda,
    warn_lambda_renamed,
)
from lightning_immunize.objectives.ours import ConditionNumberObjective, check_rank_rule, input_rank
from lightning_immunize.sides import SIDES

__all__ = ["RMaxOnlyObjective", "ConditionNumberOptObjective", "IMMAObjective"]


class RMaxOnlyObjective(ConditionNumberObjective):
    """Baseline ``rmax_only`` (Section 5): ``L(D_P) + λ_H·R_max(S_H)``, i.e. ours with λ_P = 0.

    Args:
        lambda_harmful: ``λ_H ≥ 0``, the weight of ``R_max(S_H)``.
        preconditioner: ``"exact"``, ``"ridge"``, ``"none"`` or ``"auto"``, as for
            :class:`ConditionNumberObjective`.
        ridge: relative ridge ``ρ`` of the ``ridge`` preconditioner.
        rank_rule: ``"input"``, ``"tolerance"`` or ``"auto"``, as for
            :class:`ConditionNumberObjective`.
        covariance: ``"batch"`` (each step's global batch) or ``"ema"`` (running estimate).
        ema_decay: ``β ∈ [0, 1)`` of the ``ema`` covariance.
    """

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
    r"""Baseline ``opt`` (Section 5): ``L(D_P) + λ_P·log κ(S_P) − λ_H·log κ(S_H)``,
    differentiated directly through ``eigvalsh`` with autograd (no surrogate, no
    preconditioning). The paper's single λ is ``λ_P = λ_H = λ``.

    κ by the same rank rule as ours (input rank of the batch for a linear extractor).

    Args:
        lambda_pretrain: ``λ_P ≥ 0``, the weight of ``log κ(S_P)`` (same role as ours').
        lambda_harmful: ``λ_H ≥ 0``, the weight of ``−log κ(S_H)``.
        rank_rule: ``"input"``, ``"tolerance"`` or ``"auto"``, as for
            :class:`ConditionNumberObjective` (see :func:`input_rank`).
        lambda_: deprecated: sets both λ (the old single-λ argument).
    """

    name = "opt"

    def __init__(
        self,
        lambda_pretrain: float = 1.0,
        lambda_harmful: float = 1.0,
        rank_rule: str = "auto",
        lambda_: float | None = None,
    ) -> None:
        if lambda_ is not None:
            warn_lambda_renamed("opt", "lambda_pretrain and lambda_harmful")
            lambda_pretrain = lambda_harmful = lambda_
        self.lambda_pretrain = check_lambda("lambda_pretrain", lambda_pretrain)
        self.lambda_harmful = check_lambda("lambda_harmful", lambda_harmful)
        check_rank_rule(rank_rule)
        self.rank_rule = rank_rule

    def backward(self, module: ObjectiveHost, batch: Mapping[str, Any]) -> ObjectiveOutput:
        x = {side: batch[side][0] for side in SIDES}
        z = {side: module.features(x[side], side=side) for side in SIDES}
        loss = module.task_loss(z["pretrain"], batch["pretrain"][1])
        width = z["pretrain"].shape[-1]
        kappa = {}
        for side in SIDES:
            x_all = gather_rows(x[side], differentiable=False)
            rank = input_rank(module.extractor, x_all, width, self.rank_rule)
            zs = gather_rows(z[side].reshape(z[side].shape[0], -1))
            kappa[side] = feature_condition_number(zs, rank=rank)
        log_kappa = {side: torch.log(kappa[side]) for side in SIDES}
        log_gap = log_kappa["pretrain"] - log_kappa["harmful"]
        # κ = inf (a zero eigenvalue among the kept ones) makes this gradient NaN; the module
        # refuses such a step before optimizer.step(), naming the term.
        module.manual_backward(
            loss
            + self.lambda_pretrain * log_kappa["pretrain"]
            - self.lambda_harmful * log_kappa["harmful"]
        )
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
    r"""Baseline ``imma`` (Zheng & Yeh 2024; Section 5), bi-level.

    Inner loop: ``inner_steps`` differentiable gradient steps (lr ``inner_lr``) of a linear
    probe ``w`` (a fresh copy of the head's shape, zero-initialised) on the D_H batch's
    features with the head's loss, giving ``w_H(θ)``. Outer step: minimise
    ``L(D_P) − λ_H·L(D_H; w_H(θ), θ)``, back-propagating through the inner steps.

    Args:
        lambda_harmful: ``λ_H ≥ 0``, the weight of the harmful term (same role as ours').
        inner_steps: differentiable probe steps of the inner loop.
        inner_lr: learning rate of the inner loop's probe steps.
        lambda_: deprecated name of ``lambda_harmful``.
    """

    name = "imma"

    def __init__(
        self,
        lambda_harmful: float = 1.0,
        inner_steps: int = 5,
        inner_lr: float = 0.1,
        lambda_: float | None = None,
    ) -> None:
        if lambda_ is not None:
            warn_lambda_renamed("imma", "lambda_harmful")
            lambda_harmful = lambda_
        self.lambda_harmful = check_lambda("lambda_harmful", lambda_harmful)
        if inner_steps < 1:
            raise ValueError(f"inner_steps must be ≥ 1, got {inner_steps!r}.")
        if not inner_lr > 0:
            raise ValueError(f"inner_lr must be > 0, got {inner_lr!r}.")
        self.inner_steps = int(inner_steps)
        self.inner_lr = float(inner_lr)

    def backward(self, module: ObjectiveHost, batch: Mapping[str, Any]) -> ObjectiveOutput:
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
        module.manual_backward(loss - self.lambda_harmful * harmful_loss)
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
