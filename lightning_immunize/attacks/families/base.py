"""What an attacker family is, and the one registry of them.

A family says what of the released model an attacker trains. Each is one class that answers:
which models it can attack (:meth:`AttackerFamily.check`), which hyperparameters the
worst-case search gives it (:meth:`AttackerFamily.suggest`), what it computes once before
training (:meth:`AttackerFamily.prepare`), and whether it is full-batch or has nothing to
search (class attributes). :func:`register_family` adds one, in the manner of Optuna's
samplers or peft's tuner registry: the search, the sweep and the card read everything from it.

Example:
    >>> @register_family
    ... class Frozen(AttackerFamily):
    ...     name = "doctest-frozen"
    ...     def prepare(self, extractor, data, attacker, cache):
    ...         return Prepared(extractor, data.train_x, data.eval_x)
    >>> get_family("doctest-frozen").full_batch
    False
    >>> unregister_family("doctest-frozen")
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from lightning_immunize.models import LinearExtractor
from lightning_immunize.validation import unknown_choice

#: Optimizers an attacker may use (SGD with momentum 0.9, or AdamW).
OPTIMIZERS = ("sgd", "adamw")
#: Momentum of the ``sgd`` attacker.
SGD_MOMENTUM = 0.9
#: Learning-rate schedules: constant, or linear warm-up over the first
#: :data:`WARMUP_FRACTION` of the horizon then cosine decay to 0.
SCHEDULES = ("constant", "warmup-cosine")
WARMUP_FRACTION = 0.1
#: What the attacker does with the model's BatchNorm statistics before training: keep the
#: released ones, or recompute them on its own training samples (a cheap adaptive attack).
BATCHNORM_CHOICES = ("keep", "recalibrate")
#: The BatchNorm layers whose running statistics an attacker may recompute.
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@dataclass(frozen=True)
class Prepared:
    """What a family trains: ``body`` (a module whose trainable parameters the attacker
    updates, ``nn.Identity`` for a probe) and the inputs it takes, ``train_x`` ``(N, …)``,
    ``eval_x`` ``(M, …)`` and ``score_x`` (the scoring split, or ``None``)."""

    body: nn.Module
    train_x: Tensor
    eval_x: Tensor
    score_x: Tensor | None = None


class AttackerFamily:
    """One attacker family. Subclasses set ``name`` and implement :meth:`prepare`.

    Attributes:
        name: the family's name in budgets, ``--families`` and the card.
        full_batch: trains on every sample each step (the batch size is not searched).
        deterministic: nothing to search but the BatchNorm choice (e.g. exact line search).
        network: trains network weights, so needs an extractor with conv/linear layers.
        optimizers: the optimizers it may search (``None``: the search space's).
    """

    name: ClassVar[str] = ""
    full_batch: ClassVar[bool] = False
    deterministic: ClassVar[bool] = False
    network: ClassVar[bool] = False
    optimizers: ClassVar[tuple[str, ...] | None] = None

    def check(self, extractor: nn.Module, name: str = "given") -> None:
        """Raise ``ValueError`` when this family cannot attack ``extractor`` (the ``name``
        model). Network families refuse linear extractors."""
        if self.network and isinstance(extractor, LinearExtractor):
            raise ValueError(
                f"attacker family {self.name!r} cannot attack the {name} model "
                f"({type(extractor).__name__}); it supports "
                f"{list(supported_families(extractor))}."
            )

    def suggest(self, trial: Any, space: Any, batchnorm: bool) -> dict[str, Any]:
        """The hyperparameters an Optuna ``trial`` proposes in ``space``
        (:class:`~lightning_immunize.attacks.budgets.SearchSpace`) — keyword arguments of
        :class:`~lightning_immunize.attacks.attacker.Attacker` besides family, horizon and
        seed. ``batchnorm``: the models have BatchNorm layers, so keep/recalibrate is searched.
        """
        params: dict[str, Any] = {}
        if batchnorm:
            params["batchnorm"] = trial.suggest_categorical("batchnorm", list(space.batchnorm))
        if self.deterministic:
            return {"optimizer": space.optimizers[0], "lr": 1.0, **params}
        params["schedule"] = trial.suggest_categorical("schedule", list(space.schedules))
        if self.full_batch:  # plain GD or Adam on every sample: the step size only
            low, high = space.lr_low, space.lr_high
            lr = trial.suggest_float("lr", low, high, log=True)
            return {"optimizer": space.optimizers[0], "lr": lr, **params}
        optimizers = [o for o in space.optimizers if o in (self.optimizers or OPTIMIZERS)]
        optimizer = trial.suggest_categorical("optimizer", optimizers)
        low, high = space.lr_range(optimizer)
        params["optimizer"] = optimizer
        params["lr"] = trial.suggest_float(f"lr_{optimizer}", low, high, log=True)
        low, high = space.weight_decay
        params["weight_decay"] = trial.suggest_float("weight_decay", low, high, log=True)
        params["batch_size"] = int(trial.suggest_categorical("batch_size", list(space.batch_sizes)))
        return params

    def prepare(
        self, extractor: nn.Module, data: Any, attacker: Any, cache: dict | None
    ) -> Prepared:
        """The body to train and its inputs, for ``data``
        (:class:`~lightning_immunize.attacks.attacker.AttackData`); ``extractor`` is not
        modified. ``cache`` (owned by the caller) keeps what does not change between trials."""
        raise NotImplementedError

    def optimizer(self, attacker: Any, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        """The attacker's optimizer over ``params``: SGD with momentum 0.9, or AdamW."""
        if attacker.optimizer == "sgd":
            return fused(torch.optim.SGD, params, lr=attacker.lr, momentum=SGD_MOMENTUM,
                         weight_decay=attacker.weight_decay)  # fmt: skip
        return fused(torch.optim.AdamW, params, lr=attacker.lr, weight_decay=attacker.weight_decay)

    def run(self, extractor: nn.Module, data: Any, attacker: Any, cache: dict | None,
            split: str, per_sample: bool = False) -> Any | None:  # fmt: skip
        """A whole trial done by the family itself (an
        :class:`~lightning_immunize.attacks.attacker.AttackResult`), or ``None`` for the
        shared training loop (:func:`~lightning_immunize.attacks.training.run_attack`)."""
        return None


def fused(optimizer: type[torch.optim.Optimizer], params: list[nn.Parameter], **kwargs: Any):
    """``optimizer(params, fused=True, **kwargs)`` where torch has a fused kernel for these
    parameters (on CPU, AdamW's is ≈ 5× faster than its per-tensor loop for a ResNet's blocks,
    which bounds a fine-tuning step at small inputs), else the default implementation."""
    try:
        return optimizer(params, fused=True, **kwargs)
    except (RuntimeError, ValueError, TypeError):
        return optimizer(params, **kwargs)


def lr_factor(step: int, horizon: int, schedule: str) -> float:
    """The learning-rate multiplier of step ``step`` (1-based) of ``horizon``.

    Example:
        >>> [round(lr_factor(s, 20, "warmup-cosine"), 3) for s in (1, 2, 3, 11, 20)]
        [0.5, 1.0, 0.992, 0.5, 0.0]
        >>> lr_factor(7, 20, "constant")
        1.0
    """
    if schedule == "constant":
        return 1.0
    warmup = max(1, round(WARMUP_FRACTION * horizon))
    if step <= warmup:
        return step / warmup
    progress = (step - warmup) / max(1, horizon - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


FAMILY_REGISTRY: dict[str, AttackerFamily] = {}


def register_family(cls: type[AttackerFamily]) -> type[AttackerFamily]:
    """Class decorator: add ``cls`` (an :class:`AttackerFamily` with a ``name``) to the
    registry, so budgets, ``--families`` and the card accept it.

    Raises:
        ValueError: no name, or a name registered by another class.
    """
    if not cls.name:
        raise ValueError(f"{cls.__name__}.name must be a non-empty family name, got {cls.name!r}.")
    existing = FAMILY_REGISTRY.get(cls.name)
    if existing is not None and type(existing) is not cls:
        raise ValueError(
            f"attacker family {cls.name!r} is registered by {type(existing).__name__} already; "
            "expected a name no other family uses."
        )
    FAMILY_REGISTRY[cls.name] = cls()
    return cls


def unregister_family(name: str) -> None:
    """Remove a family (tests that register their own)."""
    FAMILY_REGISTRY.pop(name, None)


def family_names() -> tuple[str, ...]:
    """Every registered family, in registration order."""
    return tuple(FAMILY_REGISTRY)


def family_name(name: str) -> str:
    """The registered spelling of ``name``, reading ``_`` as ``-``: ``gd_exact`` (the probing
    attacker's spelling) selects the family ``gd-exact``. Unknown names come back unchanged.

    Example:
        >>> family_name("gd_exact"), family_name("finetune_all"), family_name("nope")
        ('gd-exact', 'finetune-all', 'nope')
    """
    if name in FAMILY_REGISTRY:
        return name
    hyphenated = name.replace("_", "-")
    return hyphenated if hyphenated in FAMILY_REGISTRY else name


def check_family(family: str) -> None:
    """A ``ValueError`` naming the registered families unless ``family`` is one of them."""
    if family not in FAMILY_REGISTRY:
        raise unknown_choice("attacker family", family, FAMILY_REGISTRY)


def get_family(family: str) -> AttackerFamily:
    """The registered family ``family``; ``ValueError`` naming the known ones otherwise."""
    check_family(family)
    return FAMILY_REGISTRY[family]


def supported_families(extractor: nn.Module) -> tuple[str, ...]:
    """Families that apply to ``extractor``: network families need a non-linear extractor."""
    linear = isinstance(extractor, LinearExtractor)
    return tuple(n for n, f in FAMILY_REGISTRY.items() if not (linear and f.network))


def check_supported(extractor: nn.Module, family: str, name: str = "given") -> None:
    """Raise ``ValueError`` when ``family`` cannot attack ``extractor`` (the ``name`` model)."""
    get_family(family).check(extractor, name)


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` has BatchNorm layers with running statistics."""
    return any(isinstance(m, BATCHNORMS) and m.track_running_stats for m in model.modules())
