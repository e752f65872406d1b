r"""What every immunization objective is, and what it may ask of the module.

An :class:`Objective` owns the maths of one training step of
:class:`~lightning_immunize.module.ImmunizationModule` (Algorithm 1): the task loss on the D_P
batch and every regularizer term, each regularizer's gradient preconditioned by its own
dataset's input covariance. It talks to the module only through :class:`ObjectiveHost`, so no
objective depends on the module's internals and the module may import the objectives freely.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

__all__ = [
    "Objective",
    "ObjectiveHost",
    "ObjectiveOutput",
    "check_lambda",
    "warn_lambda_renamed",
]


@runtime_checkable
class ObjectiveHost(Protocol):
    """What an :class:`Objective` may ask of the module that trains with it.

    :class:`~lightning_immunize.module.ImmunizationModule` implements it; a test may pass any
    object that does.

    Attributes:
        extractor: the feature extractor ``f_θ`` being immunized.
        head: the classifier on top of the features (it owns the task loss).
    """

    extractor: nn.Module
    head: nn.Module

    def features(self, x: Tensor, side: str = "pretrain") -> Tensor:
        """Features ``f_θ(x)`` (B, K), checked finite; ``side`` names the dataset."""
        ...

    def task_loss(self, z: Tensor, y: Tensor) -> Tensor:
        """The head's loss on features ``z`` (B, K) and targets ``y`` (B,) (a scalar)."""
        ...

    def manual_backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        """Backpropagate ``loss`` (scaled as the trainer's precision needs)."""
        ...

    def step_label(self) -> int | str:
        """The training step, for messages (``"?"`` outside a trainer)."""
        ...

    def loss_scale(self) -> float:
        """The factor :meth:`manual_backward` multiplies a loss by (1 without a
        ``GradScaler``), so gradients added to ``.grad`` by hand are on the same scale."""
        ...


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
    #: Whether it simulates fine-tuning of the extractor's blocks, which means little for a
    #: one-layer linear extractor (the CLI warns).
    simulates_fine_tuning: bool = False

    def prepare(self, module: ObjectiveHost) -> None:
        """Adapt the model once, when the module is built (default: nothing)."""

    def state_dict(self) -> dict[str, Tensor]:
        """Running state to keep in checkpoints (default: none)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def hyperparameters(self) -> dict[str, Any]:
        """The objective's settings, for logs and exported metadata."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def backward(self, module: ObjectiveHost, batch: Mapping[str, Any]) -> ObjectiveOutput:
        raise NotImplementedError


def warn_lambda_renamed(method: str, new: str) -> None:
    """Warn that ``method``'s ``lambda_`` argument is deprecated in favour of ``new``."""
    warnings.warn(
        f"{method}: 'lambda_' is deprecated, use {new} (the same names as ours for the same "
        "role); 'lambda_' goes away in the next release.",
        DeprecationWarning,
        stacklevel=3,
    )


def check_lambda(name: str, value: float) -> float:
    """``value`` as a float; a ``ValueError`` naming ``name`` unless it is finite and ≥ 0."""
    if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number ≥ 0, got {value!r}.")
    return float(value)
