r"""Remove the harmful task's linear information at every depth.

Conditioning (Eq. 11) slows an attacker who fine-tunes with plain gradient steps; one who can
precondition — a whitening probe, Adam — undoes it (Section 4's analysis assumes plain
gradient descent). What no preconditioner undoes is the *absence* of information: if no
linear read-out of a block's output predicts D_H's labels, neither a probe on that block nor
a head fine-tuned on it starts ahead. This objective measures, at each chosen block, how much
of D_H's labels a linear probe fitted on half of the batch explains on the other half, and
trains that to 0 while the task loss keeps D_P.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_immunize.distributed import gather_rows
from lightning_immunize.objectives.base import (
    ObjectiveHost,
    ObjectiveOutput,
    check_lambda,
)
from lightning_immunize.objectives.taps import (
    HEAD_INPUT,
    LayerChoice,
    LayeredObjective,
    batchnorm_mode,
    check_batchnorm_modes,
    layer_root,
    recording,
    tapped_layers,
)

__all__ = ["BlockErasureObjective", "held_out_r2", "label_matrix", "pooled"]


def pooled(h: Tensor) -> Tensor:
    """A block's output as one row per sample: ``(B, C, *spatial)`` averaged over the
    spatial positions (global average pooling), ``(B, C)`` as is. Token outputs
    ``(B, T, C)`` are averaged over tokens."""
    if h.ndim == 2:
        return h
    if h.ndim == 3:
        return h.mean(dim=1)
    return h.flatten(2).mean(dim=-1)


def label_matrix(y: Tensor) -> Tensor:
    """Targets as a float64 matrix ``(B, K)``: class labels one-hot over the classes present
    in the batch; real-valued targets ``(B,)`` or ``(B, K)`` as they are.

    Example:
        >>> label_matrix(torch.tensor([7, 5, 7])).tolist()
        [[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]
    """
    if y.dtype.is_floating_point:
        return y.reshape(y.shape[0], -1).to(torch.float64)
    _, index = torch.unique(y, return_inverse=True)
    return torch.nn.functional.one_hot(index.reshape(-1)).to(torch.float64)


def _ridge_predict(h_fit: Tensor, y_fit: Tensor, h_new: Tensor, ridge: float) -> Tensor:
    """Predictions on ``h_new`` of the ridge probe fitted on ``(h_fit, y_fit)``, centred on
    the fitting rows' means; the ridge is ``ridge·tr(HᵀH)/C`` (relative, scale-free). Solved
    in the dual when there are fewer rows than features."""
    mu, y_mu = h_fit.mean(dim=0), y_fit.mean(dim=0)
    H, Y = h_fit - mu, y_fit - y_mu
    n, c = H.shape
    gram_trace = H.square().sum()
    lam = ridge * gram_trace / c + torch.finfo(H.dtype).tiny
    if n < c:  # W = Hᵀ(HHᵀ + λI)⁻¹Y
        K = H @ H.mT + lam * torch.eye(n, dtype=H.dtype, device=H.device)
        W = H.mT @ torch.linalg.solve(K, Y)
    else:  # W = (HᵀH + λI)⁻¹HᵀY
        K = H.mT @ H + lam * torch.eye(c, dtype=H.dtype, device=H.device)
        W = torch.linalg.solve(K, H.mT @ Y)
    return (h_new - mu) @ W + y_mu


def held_out_r2(h: Tensor, y: Tensor, ridge: float = 0.1) -> Tensor:
    r"""Held-out ``R²`` of a ridge probe from features ``h`` (B, C) to targets ``y`` (B, K):
    fitted on the first ``⌊B/2⌋`` rows and scored on the rest, and the other way round,
    ``R² = 1 − ‖Y − Ŷ‖² / ‖Y − Ȳ‖²`` averaged over the two directions that have target
    variance (0 when neither has). Float64; differentiable in ``h``.

    1 means the labels are read linearly from ``h``; 0, no better than the mean; below 0,
    worse.

    Example:
        >>> h = torch.tensor([[1.0], [-1.0], [1.0], [-1.0]])
        >>> y = torch.tensor([[1.0], [0.0], [1.0], [0.0]])
        >>> round(float(held_out_r2(h, y, ridge=1e-9)), 6)
        1.0
    """
    h64, y64 = h.to(torch.float64), y.to(torch.float64)
    half = h64.shape[0] // 2
    scores = []
    for fit, new in ((slice(0, half), slice(half, None)), (slice(half, None), slice(0, half))):
        y_new = y64[new]
        spread = (y_new - y_new.mean(dim=0)).square().sum()
        if h64[fit].shape[0] < 2 or not spread > 0:
            continue
        error = (y_new - _ridge_predict(h64[fit], y64[fit], h64[new], ridge)).square().sum()
        scores.append(1.0 - error / spread)
    if not scores:
        return h64.sum() * 0.0
    return torch.stack(scores).mean()


def trainable_blocks(extractor: nn.Module) -> list[str]:
    """The top-level children of the model (:func:`~.taps.layer_root`) that hold a trainable
    parameter, then :data:`~.taps.HEAD_INPUT`: the default blocks of ``erasure``."""
    root = layer_root(extractor)
    names = [n for n, child in root.named_children()
             if any(p.requires_grad for p in child.parameters())]  # fmt: skip
    return [*names, HEAD_INPUT]


class BlockErasureObjective(LayeredObjective):
    r"""Linear erasure at every depth (``"erasure"``): ``L(D_P) + λ_H·Σ_b w_b
    max(R²_b, 0) / Σ_b w_b``, ``R²_b`` the held-out ``R²`` (:func:`held_out_r2`) of a ridge
    probe from block ``b``'s pooled output on the D_H batch to D_H's labels. Gradients reach
    every trainable layer below each block; the task loss on D_P keeps the released task.

    The probe is refitted in closed form at every step on the current features, so it is the
    best linear read-out of this batch, not a slowly trained adversary; scoring it on held-out
    rows measures what generalizes, not what ``C`` features can memorise of ``B/2`` rows.

    Args:
        lambda_harmful: ``λ_H ≥ 0``.
        blocks: block names whose outputs are probed (as
            :class:`~lightning_immunize.models.TimmBackbone`'s ``trainable``: ``"layer3"``),
            plus ``"head"`` for the features; ``None``: the top-level children of the model
            that have a trainable parameter, then ``"head"``.
        block_weights: ``{name: w_b ≥ 0}``, 1 for a block not given.
        ridge: relative ridge of the probe (``ridge·tr(HᵀH)/C``), > 0.
        batchnorm: how BatchNorm normalises the D_H forward (one forward each, the term
            averaged): ``"batch"`` (its own statistics: an attacker who recalibrates
            BatchNorm on harmful images) and/or ``"running"`` (D_P's: one who keeps them).

    Raises:
        ValueError: for a negative λ or weight, ``ridge ≤ 0``, or an unknown block (when the
            module is built).

    Example:
        >>> BlockErasureObjective(lambda_harmful=1.0, blocks=["layer4", "head"]).blocks
        ['layer4', 'head']
    """

    name = "erasure"

    def __init__(
        self,
        lambda_harmful: float = 1.0,
        blocks: Sequence[str] | None = None,
        block_weights: Mapping[str, float] | None = None,
        ridge: float = 0.1,
        batchnorm: Sequence[str] | str = ("batch", "running"),
    ) -> None:
        self.lambda_harmful = check_lambda("lambda_harmful", lambda_harmful)
        self._choice = LayerChoice("blocks", "block_weights", blocks, block_weights)
        self.blocks, self.block_weights = self._choice.names, self._choice.weights
        if not (isinstance(ridge, int | float) and ridge > 0):
            raise ValueError(f"ridge must be a number > 0, got {ridge!r}.")
        self.ridge = float(ridge)
        self.batchnorm = list(check_batchnorm_modes(batchnorm))

    def default_layers(self, extractor: nn.Module) -> list[str]:
        """:func:`trainable_blocks`."""
        return trainable_blocks(extractor)

    def backward(self, module: ObjectiveHost, batch: Mapping[str, Any]) -> ObjectiveOutput:
        """The D_P task loss, and (λ_H > 0) one D_H forward per BatchNorm mode with the blocks'
        outputs recorded; one backward of the sum."""
        z_p = module.features(batch["pretrain"][0], side="pretrain")
        loss = module.task_loss(z_p, batch["pretrain"][1])
        logs: dict[str, Tensor | float] = {"task_loss": loss.detach()}
        values: dict[str, Tensor] = {}
        regularizer: Tensor | float = 0.0
        if self.lambda_harmful > 0:
            names = self.chosen_layers(module)
            inner = tapped_layers(module.extractor, names)
            x_h, y_h = batch["harmful"]
            y = label_matrix(gather_rows(y_h, differentiable=False))
            fractions = self._choice.fractions(names)
            term: Tensor | float = 0.0
            for mode in self.batchnorm:
                with batchnorm_mode(module.extractor, mode), recording(inner, "output") as seen:
                    z_h = module.features(x_h, side="harmful")
                outputs = {n: seen[n] for n in inner}
                if HEAD_INPUT in names:
                    outputs[HEAD_INPUT] = z_h
                single = len(self.batchnorm) == 1
                for n in names:
                    r2 = held_out_r2(gather_rows(pooled(outputs[n])), y, self.ridge)
                    label = "" if single else f" ({mode} BatchNorm)"
                    values[f"held-out R² of block {n} on harmful{label}"] = r2.detach()
                    logs[f"r2_{n}" if single else f"r2_{n}_{mode}"] = r2.detach()
                    term = term + fractions[n] * r2.clamp(min=0.0) / len(self.batchnorm)
            logs["erasure"] = term.detach() if isinstance(term, Tensor) else term
            regularizer = self.lambda_harmful * term
        module.manual_backward(loss + regularizer)
        return ObjectiveOutput(loss=loss.detach(), logs=logs, terms=values)
