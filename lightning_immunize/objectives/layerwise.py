r"""Eq. 11 on every layer: the condition number of each layer's K-FAC activation factor,
with the diagonal divided out so that a per-coordinate optimizer (Adam) cannot undo it.

K-FAC (Martens & Grosse, ICML 2015) approximates the Gauss–Newton block of a layer ``l`` by
``A_l ⊗ G_l``: ``A_l = E[a aᵀ]``, the second moment of the layer's input ``a``, and ``G_l``
that of the gradient at its output, so ``κ(block) = κ(A_l)·κ(G_l)``. The paper's feature
covariance ``S = ZᵀZ/B`` (Definition 3.1, Eq. 11) is ``A`` of the classifier: its input is
the features. A preconditioner that rescales coordinates — Adam's — removes the part of the
ill-conditioning that lies on the diagonal; what it leaves is that of the *correlation*
``C_l = D^{-1/2} A_l D^{-1/2}``, ``D = diag(A_l)``. Since ``tr C_l = dim C_l``, ``R_min`` and
``R_max`` of a correlation matrix do not depend on the activations' scale either.

**Convolutions.** An input ``(B, C, H, W)`` gives ``B·H·W`` rows of ``C`` channels: the
channel factor of K-FAC for convolutions (Grosse & Martens, ICML 2016) without the kernel
offsets, whose full factor has ``C·k²`` rows (``4608`` for a ResNet18 ``layer4`` conv).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_immunize.conditioning import feature_regularizer
from lightning_immunize.distributed import gather_rows
from lightning_immunize.objectives.base import (
    ObjectiveHost,
    ObjectiveOutput,
    check_lambda,
)
from lightning_immunize.objectives.ours import eq11_terms
from lightning_immunize.objectives.taps import (
    HEAD_INPUT,
    LayerChoice,
    LayeredObjective,
    batchnorm_mode,
    check_batchnorm_modes,
    layer_root,
    recording,
    tapped_layers,
    trainable_layers,
)

__all__ = [
    "LayerwiseConditionNumberObjective",
    "activation_rows",
    "correlation_rows",
    "input_width",
]

#: Layers whose input is channels-first.
CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def activation_rows(a: Tensor, channels_first: bool) -> Tensor:
    """A layer's input as the rows of its K-FAC activation factor, ``(N, C)``.

    ``channels_first`` (convolutions): ``(B, C, *spatial)`` gives ``B·prod(spatial)`` rows;
    otherwise (linear layers) the last dimension is the channel one, ``(B, T, C)`` giving
    ``B·T`` rows and ``(B, C)`` ``B`` rows.

    Example:
        >>> tuple(activation_rows(torch.zeros(2, 3, 4, 5), channels_first=True).shape)
        (40, 3)
    """
    if channels_first and a.ndim > 2:
        return a.movedim(1, -1).reshape(-1, a.shape[1])
    return a.reshape(-1, a.shape[-1])


def input_width(layer: nn.Module) -> int | None:
    """The number of input channels (convolutions) or features (linear layers) of ``layer``,
    ``None`` for another kind of module.

    Example:
        >>> input_width(nn.Conv2d(1, 8, 3)), input_width(nn.Linear(4, 2)), input_width(nn.ReLU())
        (1, 4, None)
    """
    if isinstance(layer, CONVOLUTIONS):
        return layer.in_channels
    if isinstance(layer, nn.Linear):
        return layer.in_features
    return None


def correlation_rows(rows: Tensor, eps: float = 1e-6) -> Tensor:
    r"""Rows ``R`` (N, C) scaled so that ``RᵀR`` is the correlation matrix
    ``D^{-1/2} A D^{-1/2}`` of ``A = XᵀX/N``, in float64.

    ``D = diag(A) + eps·mean(diag(A))``: a channel that is zero on the batch (a dead ReLU)
    stays zero instead of dividing by zero, and the rank rule drops it.

    Example:
        >>> X = torch.tensor([[2.0, 0.0], [0.0, 4.0]])
        >>> R = correlation_rows(X, eps=0.0)
        >>> (R.T @ R).tolist()
        [[1.0, 0.0], [0.0, 1.0]]
    """
    x = rows.to(torch.float64)
    second = x.square().mean(dim=0)
    scale = second + eps * second.mean()
    return x / torch.sqrt(scale * x.shape[0])


class LayerwiseConditionNumberObjective(LayeredObjective):
    r"""Ours on every layer (``"ours_kfac"``): ``L(D_P) + Σ_l w_l [λ_P·R_min(C_l^P) +
    λ_H·R_max(C_l^H)] / Σ_l w_l``, ``C_l`` the correlation matrix of layer ``l``'s input on
    each side's batch (module docstring); ``R_min``, ``R_max`` as in Eq. 11, in float64 with
    the numerical-rank rule. Gradients reach every trainable layer below ``l``.

    With ``layers=["head"]`` and no diagonal (a whitened input) this is Eq. 11 itself; the
    correlation makes it invariant to rescaling each feature.

    Args:
        lambda_pretrain: ``λ_P ≥ 0``, keeps D_P's correlations well conditioned.
        lambda_harmful: ``λ_H ≥ 0``, makes D_H's ill-conditioned.
        layers: layer names (as :class:`~lightning_immunize.models.TimmBackbone`'s
            ``trainable``: ``"layer4.0.conv1"``), plus ``"head"`` for the classifier's input;
            ``None``: every convolution and linear layer of the extractor whose weight is
            trainable and whose input has at least two channels, then ``"head"``.
        layer_weights: ``{name: w_l ≥ 0}``, 1 for a layer not given (per-layer λ: the early
            layers feed D_P too).
        eps: relative floor of the diagonal (dead channels).
        batchnorm: how BatchNorm normalises the D_H forward (one forward each, the D_H term
            averaged): ``"batch"`` (an attacker who recalibrates BatchNorm on harmful images)
            and/or ``"running"`` (one who keeps D_P's statistics). D_P's forward is the
            training one.

    Raises:
        ValueError: for a negative λ or weight, an unknown layer or one of a single input
            channel (when the module is built), or weights naming a layer not regularized.

    Example:
        >>> objective = LayerwiseConditionNumberObjective(lambda_harmful=10.0, layers=["head"])
        >>> objective.name
        'ours_kfac'
    """

    name = "ours_kfac"

    def __init__(
        self,
        lambda_pretrain: float = 1.0,
        lambda_harmful: float = 1.0,
        layers: Sequence[str] | None = None,
        layer_weights: Mapping[str, float] | None = None,
        eps: float = 1e-6,
        batchnorm: Sequence[str] | str = ("batch", "running"),
    ) -> None:
        self.lambda_pretrain = check_lambda("lambda_pretrain", lambda_pretrain)
        self.lambda_harmful = check_lambda("lambda_harmful", lambda_harmful)
        self._choice = LayerChoice("layers", "layer_weights", layers, layer_weights)
        self.layers, self.layer_weights = self._choice.names, self._choice.weights
        if not (isinstance(eps, int | float) and eps >= 0):
            raise ValueError(f"eps must be a number ≥ 0, got {eps!r}.")
        self.eps = float(eps)
        self.batchnorm = list(check_batchnorm_modes(batchnorm))

    def default_layers(self, extractor: nn.Module) -> list[str]:
        """Every trainable convolution and linear layer of the extractor with at least two
        input channels, then the head's input. A one-channel input (a grayscale stem) has a
        1×1 correlation matrix: κ = 1 whatever the weights, nothing to condition."""
        root = dict(layer_root(extractor).named_modules())
        return [n for n in trainable_layers(extractor) if input_width(root[n]) > 1] + [HEAD_INPUT]

    def resolved_layers(self, module: ObjectiveHost) -> list[str]:
        """The layers, each checked to have at least two input channels.

        Raises:
            ValueError: for a layer of one input channel (its κ is 1 by construction).
        """
        names = super().resolved_layers(module)
        for name, layer in tapped_layers(module.extractor, names).items():
            if input_width(layer) == 1:
                raise ValueError(
                    f"layer {name!r} has one input channel: its correlation matrix is 1×1 and "
                    "its condition number 1 whatever the weights; expected layers with at "
                    "least two input channels."
                )
        return names

    def terms(self) -> list[tuple[str, str, float]]:
        """``(side, regularizer, λ)`` of the active terms."""
        return eq11_terms(self.lambda_pretrain, self.lambda_harmful)

    def backward(self, module: ObjectiveHost, batch: Mapping[str, Any]) -> ObjectiveOutput:
        """One forward of D_P and one of D_H per BatchNorm mode, the layers' inputs recorded,
        then one backward of the task loss plus every layer's terms."""
        names = self.chosen_layers(module)
        inner = tapped_layers(module.extractor, names)
        forwards = [("pretrain", "batch")]
        if self.lambda_harmful > 0:
            forwards += [("harmful", mode) for mode in self.batchnorm]
        rows: dict[tuple[str, str], dict[str, Tensor]] = {}
        features: dict[str, Tensor] = {}
        for side, mode in forwards:
            with batchnorm_mode(module.extractor, mode), recording(inner, "input") as seen:
                z = module.features(batch[side][0], side=side)
            features.setdefault(side, z)
            rows[side, mode] = {
                n: activation_rows(seen[n], isinstance(m, CONVOLUTIONS)) for n, m in inner.items()
            }
            if HEAD_INPUT in names:
                rows[side, mode][HEAD_INPUT] = z.reshape(z.shape[0], -1)
        loss = module.task_loss(features["pretrain"], batch["pretrain"][1])
        fractions = self._choice.fractions(names)
        regularizer: Tensor | float = 0.0
        values: dict[str, Tensor] = {}
        logs: dict[str, Tensor | float] = {"task_loss": loss.detach()}
        for side, kind, lam in self.terms():
            modes = [mode for s, mode in forwards if s == side]
            side_term: Tensor | float = 0.0
            log_kappa = 0.0
            for mode in modes:
                label = "" if len(modes) == 1 else f" ({mode} BatchNorm)"
                for n in names:
                    r = correlation_rows(gather_rows(rows[side, mode][n]), self.eps)
                    value, kappa = feature_regularizer(r, kind)  # one eigh for both
                    values[f"{kind} of layer {n} on {side}{label}"] = value.detach()
                    side_term = side_term + fractions[n] * value / len(modes)
                    log_kappa += float(torch.log(kappa))
            regularizer = regularizer + lam * side_term
            logs[kind] = side_term.detach() if isinstance(side_term, Tensor) else side_term
            logs[f"mean_log_kappa_{side}"] = log_kappa / (len(names) * len(modes))
        module.manual_backward(loss + regularizer)
        return ObjectiveOutput(loss=loss.detach(), logs=logs, terms=values)
