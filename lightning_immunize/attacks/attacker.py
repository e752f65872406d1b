"""One attacker, one trial, described: the attacker's data (a training split, a held-out
*selection* split the search scores on and a separate *scoring* split the worst case is
reported on), its hyperparameters and its result at log-spaced step marks.

The attacker of the paper (Section 3) is a linear probe trained by gradient descent on
frozen features; :func:`~lightning_immunize.attacks.training.run_attack` generalises it to
the families of :mod:`.families` with any optimizer, learning rate, weight decay, schedule,
batch size and BatchNorm choice.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_immunize.attacks.families.base import (
    BATCHNORM_CHOICES,
    OPTIMIZERS,
    SCHEDULES,
    check_family,
    get_family,
)
from lightning_immunize.models import LinearHead
from lightning_immunize.validation import unknown_choice

__all__ = [
    "OPTIMIZERS", "step_marks", "AttackData", "Attacker", "AttackResult", "mean_score",
    "batch_size_for", "full_batch_note", "per_sample_metric",
]  # fmt: skip


def step_marks(horizon: int) -> list[int]:
    """Log-spaced step marks ``1, 3, 10, 30, 100, …`` up to ``horizon`` (included).

    Raises:
        ValueError: ``horizon`` is below the first mark (1).

    Example:
        >>> step_marks(300)
        [1, 3, 10, 30, 100, 300]
        >>> step_marks(50)
        [1, 3, 10, 30, 50]
    """
    if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
        raise ValueError(f"horizon must be an integer >= 1 (the first step mark), got {horizon!r}.")
    marks, k = [], 0
    while True:
        mark = 10 ** (k // 2) * (1 if k % 2 == 0 else 3)
        if mark >= horizon:
            break
        marks.append(mark)
        k += 1
    return marks + [horizon]


@dataclass(frozen=True)
class AttackData:
    """The attacker's training samples and the held-out samples it is scored on.

    ``x`` are inputs as the extractor takes them (``(N, *sample_shape)``), ``y`` targets of
    ``task`` (``"multiclass"``: int64 labels in ``[0, num_outputs)``; ``"binary"``: {0, 1};
    ``"regression"``: floats). ``eval_*`` is the selection split the search scores trials on;
    ``score_*`` (optional) a disjoint split the chosen attacker is re-run and reported on.
    ``name`` identifies the data in tables.
    """

    name: str
    train_x: Tensor
    train_y: Tensor
    eval_x: Tensor
    eval_y: Tensor
    task: str
    num_outputs: int
    score_x: Tensor | None = None
    score_y: Tensor | None = None

    def __post_init__(self) -> None:
        if self.task not in LinearHead.TASKS:
            raise unknown_choice("task", self.task, LinearHead.TASKS)
        for split, x, y in (
            ("train", self.train_x, self.train_y),
            ("eval", self.eval_x, self.eval_y),
            ("score", self.score_x, self.score_y),
        ):
            if x is None and y is None and split == "score":
                continue
            if x is None or y is None or x.shape[0] != y.shape[0] or x.shape[0] == 0:
                raise ValueError(
                    f"attack data {self.name!r}: {split} split has {x.shape[0]} inputs and "
                    f"{y.shape[0]} targets; expected the same positive number."
                )

    @property
    def higher_is_better(self) -> bool:
        """Accuracy (classification) is maximised by the attacker, MSE (regression) minimised."""
        return self.task != "regression"

    @property
    def metric_name(self) -> str:
        return "mse" if self.task == "regression" else "accuracy"

    def scoring(self, split: str) -> tuple[Tensor, Tensor]:
        """Inputs and targets of the ``"selection"`` or ``"scoring"`` split."""
        if split == "selection":
            return self.eval_x, self.eval_y
        if split != "scoring" or self.score_x is None:
            raise ValueError(
                f"attack data {self.name!r} has no {split!r} split; expected 'selection', or "
                "'scoring' when it holds scoring data."
            )
        return self.score_x, self.score_y

    def subset(self, n: int | None, seed: int) -> AttackData:
        """The first ``n`` training samples of a ``seed``-ed permutation (``None``: all)."""
        total = self.train_x.shape[0]
        if n is None or n == total:
            return self
        if not 1 <= n <= total:
            raise ValueError(
                f"data budget must be in 1..{total}, the number of training samples of "
                f"{self.name!r}, got {n}."
            )
        idx = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n]
        return AttackData(
            f"{self.name}[{n}]",
            self.train_x[idx],
            self.train_y[idx],
            self.eval_x,
            self.eval_y,
            self.task,
            self.num_outputs,
            self.score_x,
            self.score_y,
        )


@dataclass(frozen=True)
class Attacker:
    """An attacker: family, optimizer, learning rate, batch size, horizon, seed, weight
    decay, learning-rate schedule and what it does with BatchNorm statistics.

    ``seed`` fixes the fresh head's initial weights and the batch order, so a trial is
    reproducible from its row in ``trials.csv``. Full-batch families (``gd``, ``adam``)
    ignore ``batch_size``, ``optimizer`` and ``weight_decay`` (plain GD and Adam on every
    sample); ``gd-exact`` ignores ``lr`` and ``schedule`` too (its step is the exact line
    search's). ``batchnorm="recalibrate"``: every BatchNorm's running statistics are
    recomputed on the attacker's training samples before it trains.
    """

    family: str
    optimizer: str
    lr: float
    batch_size: int
    horizon: int
    seed: int = 0
    weight_decay: float = 0.0
    schedule: str = "constant"
    batchnorm: str = "keep"

    def __post_init__(self) -> None:
        check_family(self.family)
        if self.optimizer not in OPTIMIZERS:
            raise unknown_choice("optimizer", self.optimizer, OPTIMIZERS)
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"learning rate must be a positive number, got {self.lr!r}.")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be a number >= 0, got {self.weight_decay!r}.")
        if self.schedule not in SCHEDULES:
            raise unknown_choice("schedule", self.schedule, SCHEDULES)
        if self.batchnorm not in BATCHNORM_CHOICES:
            raise unknown_choice("batchnorm choice", self.batchnorm, BATCHNORM_CHOICES)
        if isinstance(self.batch_size, bool) or not int(self.batch_size) >= 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {self.batch_size!r}.")
        step_marks(self.horizon)

    @property
    def marks(self) -> list[int]:
        return step_marks(self.horizon)


def _count(t: Tensor | None) -> int | None:
    return None if t is None else t.shape[0]


@dataclass(frozen=True)
class AttackResult:
    """The metric at each step mark reached (NaN from the step the attacker diverged; fewer
    scores than marks when the search pruned the trial at ``pruned_at``) and seconds.
    ``per_sample``: per mark, each scored sample's metric (correct 0/1, or squared error),
    when asked for (the worst case's re-runs, for intervals)."""

    marks: list[int]
    scores: list[float]
    seconds: float
    diverged_at: int | None = None
    pruned_at: int | None = None
    per_sample: list[list[float]] | None = None


def mean_score(
    scores: Sequence[float], higher_is_better: bool, all_diverged: float = math.nan
) -> float:
    """The mean score over the step marks, a diverged (NaN) mark counted as the worst score:
    0 accuracy, or the largest MSE among the marks (``all_diverged`` when there is none)."""
    finite = [s for s in scores if math.isfinite(s)]
    worst = 0.0 if higher_is_better else max(finite, default=all_diverged)
    return sum(s if math.isfinite(s) else worst for s in scores) / len(scores)


def batch_size_for(n: int, batch_size: int, family: str) -> int:
    """The batch an attacker trains on: every sample for full-batch families and for a batch
    size larger than the ``n`` training samples (as a data loader that keeps its last batch
    would), else ``batch_size``."""
    return n if get_family(family).full_batch else min(int(batch_size), n)


def full_batch_note(data: AttackData, batch_sizes: Sequence[int], family: str) -> str | None:
    """A card note when some of ``batch_sizes`` exceed ``data``'s training split (those trials
    train on every sample each step), else ``None``."""
    if get_family(family).full_batch:
        return None
    n = data.train_x.shape[0]
    too_big = sorted(b for b in batch_sizes if b > n)
    if not too_big:
        return None
    return (
        f"{data.name} with {n} training samples: the search space's batch size(s) {too_big} "
        f"exceed them, so those trials train on all {n} samples each step"
    )


def per_sample_metric(task: str, output: Tensor, target: Tensor) -> Tensor:
    """Each sample's metric ``(N,)``, whose mean is :meth:`LinearHead.metric`: 1.0/0.0 for a
    correct/wrong prediction (``multiclass``, ``binary``), the squared error averaged over
    outputs (``regression``).

    Example:
        >>> per_sample_metric("multiclass", torch.tensor([[2.0, 1.0], [0.0, 3.0]]),
        ...                   torch.tensor([0, 0])).tolist()
        [1.0, 0.0]
    """
    if task == "multiclass":
        return (output.argmax(dim=-1) == target.reshape(-1).long()).double()
    target = target.reshape(output.shape).to(output.dtype)
    if task == "binary":
        return ((output > 0) == (target > 0.5)).double()
    return (output.double() - target.double()).pow(2).reshape(output.shape[0], -1).mean(1)


def __getattr__(name: str):
    if name == "run_attack":  # moved to .training (it needs the families): the old path warns
        import warnings

        from lightning_immunize.attacks.training import run_attack

        warnings.warn(
            "lightning_immunize.attacks.attacker.run_attack is deprecated: import it from "
            "lightning_immunize.attacks.training; the old path goes away in the next release.",
            DeprecationWarning,
            stacklevel=2,
        )
        return run_attack
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
