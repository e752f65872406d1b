"""One attacker, one trial: a copy of a released model with a fresh linear head, trained on a
harmful split and scored on a held-out split at log-spaced step marks.

The attacker of the paper (Section 3) is a linear probe trained by gradient descent on
frozen features; :func:`run_attack` generalises it to the families of :mod:`.families`
(fine-tuning, LoRA, whitened probes) with any optimizer, learning rate and batch size.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_immunize.attacks.families import (
    FULL_BATCH_FAMILIES,
    PROBE_FAMILIES,
    check_family,
    prepare_features,
    prepare_network,
)
from lightning_immunize.evaluation.study import probe_targets
from lightning_immunize.models import LinearHead, keep_frozen_in_eval
from lightning_immunize.probing import gd_exact_line_search

#: Optimizers an attacker may use (SGD with momentum 0.9, or AdamW with torch's defaults).
OPTIMIZERS = ("sgd", "adamw")
#: Momentum of the ``sgd`` attacker.
SGD_MOMENTUM = 0.9
#: Samples per forward pass when scoring (memory only; the score does not depend on it).
EVAL_CHUNK = 512


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
        raise ValueError(f"horizon must be an integer >= 1 (the first step mark), got {horizon!r}")
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
    ``"regression"``: floats). ``name`` identifies the split in feature caches and tables.
    """

    name: str
    train_x: Tensor
    train_y: Tensor
    eval_x: Tensor
    eval_y: Tensor
    task: str
    num_outputs: int

    def __post_init__(self) -> None:
        if self.task not in LinearHead.TASKS:
            raise ValueError(f"unknown task {self.task!r}; expected one of {LinearHead.TASKS}")
        for split, x, y in (
            ("train", self.train_x, self.train_y),
            ("eval", self.eval_x, self.eval_y),
        ):
            if x.shape[0] != y.shape[0] or x.shape[0] == 0:
                raise ValueError(
                    f"attack data {self.name!r}: {split} split has {x.shape[0]} inputs and "
                    f"{y.shape[0]} targets; expected the same positive number"
                )

    @property
    def higher_is_better(self) -> bool:
        """Accuracy (classification) is maximised by the attacker, MSE (regression) minimised."""
        return self.task != "regression"

    @property
    def metric_name(self) -> str:
        return "mse" if self.task == "regression" else "accuracy"

    def subset(self, n: int | None, seed: int) -> AttackData:
        """The first ``n`` training samples of a ``seed``-ed permutation (``None``: all)."""
        total = self.train_x.shape[0]
        if n is None or n == total:
            return self
        if not 1 <= n <= total:
            raise ValueError(
                f"data budget {n} is not in 1..{total}, the number of training samples of "
                f"{self.name!r}"
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
        )


@dataclass(frozen=True)
class Attacker:
    """An attacker: (family, optimizer, learning rate, batch size, horizon) and its seed.

    ``seed`` fixes the fresh head's initial weights and the batch order, so a trial is
    reproducible from its row in ``trials.csv``. Full-batch families (``gd``, ``adam``)
    ignore ``batch_size`` and ``optimizer`` (plain GD and Adam on every sample); ``gd-exact``
    ignores ``lr`` too (its step is the exact line search's).
    """

    family: str
    optimizer: str
    lr: float
    batch_size: int
    horizon: int
    seed: int = 0

    def __post_init__(self) -> None:
        check_family(self.family)
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; expected one of {OPTIMIZERS}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"learning rate must be a positive number, got {self.lr!r}")
        if isinstance(self.batch_size, bool) or not int(self.batch_size) >= 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        step_marks(self.horizon)

    @property
    def marks(self) -> list[int]:
        return step_marks(self.horizon)


@dataclass(frozen=True)
class AttackResult:
    """The metric at each step mark (NaN from the step the attacker diverged) and seconds."""

    marks: list[int]
    scores: list[float]
    seconds: float
    diverged_at: int | None = None


def mean_score(
    scores: Sequence[float], higher_is_better: bool, all_diverged: float = math.nan
) -> float:
    """The mean score over the step marks, a diverged (NaN) mark counted as the worst score:
    0 accuracy, or the largest MSE among the marks (``all_diverged`` when there is none)."""
    finite = [s for s in scores if math.isfinite(s)]
    worst = 0.0 if higher_is_better else max(finite, default=all_diverged)
    return sum(s if math.isfinite(s) else worst for s in scores) / len(scores)


def _optimizer(attacker: Attacker, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if attacker.family in FULL_BATCH_FAMILIES:
        if attacker.family == "gd":
            return torch.optim.SGD(params, lr=attacker.lr)
        return torch.optim.Adam(params, lr=attacker.lr)
    if attacker.optimizer == "sgd":
        return torch.optim.SGD(params, lr=attacker.lr, momentum=SGD_MOMENTUM)
    return torch.optim.AdamW(params, lr=attacker.lr)


def _batches(n: int, batch_size: int, generator: torch.Generator):
    """Indices of successive batches: reshuffled epochs, the last incomplete batch dropped."""
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


def batch_size_for(n: int, batch_size: int, family: str) -> int:
    """The batch an attacker trains on: every sample for full-batch families and for a batch
    size larger than the ``n`` training samples (as a data loader that keeps its last batch
    would), else ``batch_size``."""
    return n if family in FULL_BATCH_FAMILIES else min(int(batch_size), n)


def full_batch_note(data: AttackData, batch_sizes: Sequence[int], family: str) -> str | None:
    """A card note when some of ``batch_sizes`` exceed ``data``'s training split (those trials
    train on every sample each step), else ``None``."""
    if family in FULL_BATCH_FAMILIES:
        return None
    n = data.train_x.shape[0]
    too_big = sorted(b for b in batch_sizes if b > n)
    if not too_big:
        return None
    return (
        f"{data.name} with {n} training samples: the search space's batch size(s) {too_big} "
        f"exceed them, so those trials train on all {n} samples each step"
    )


def run_attack(
    extractor: nn.Module,
    data: AttackData,
    attacker: Attacker,
    feature_cache: dict | None = None,
) -> AttackResult:
    """Train a copy of ``extractor`` (per ``attacker.family``) with a fresh linear head on
    ``data``'s training split; score the held-out split after each step mark.

    ``extractor`` is not modified. ``feature_cache`` (a dict owned by the caller) keeps the
    frozen features of probe families between trials of the same extractor and data.

    Returns:
        :class:`AttackResult`: the metric (accuracy in [0, 1], or MSE) at ``attacker.marks``.

    Raises:
        ValueError: the family does not fit the extractor.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(attacker.seed)
        return _attack(extractor, data, attacker, feature_cache)


def _attack(
    extractor: nn.Module, data: AttackData, attacker: Attacker, feature_cache: dict | None
) -> AttackResult:
    start = time.perf_counter()
    if attacker.family == "gd-exact":
        return _exact_line_search(extractor, data, attacker, feature_cache, start)
    if attacker.family in PROBE_FAMILIES:
        body, train_x, eval_x = prepare_features(extractor, data, attacker.family, feature_cache)
    else:
        body = prepare_network(extractor, attacker.family)
        train_x, eval_x = data.train_x, data.eval_x
    dtype = next((p.dtype for p in body.parameters()), train_x.dtype)
    width = _width(body, train_x[:2])
    head = LinearHead(width, data.num_outputs, data.task).to(dtype)
    model = nn.Sequential(body, head)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(attacker, params)
    generator = torch.Generator().manual_seed(attacker.seed)
    n = train_x.shape[0]
    batch = batch_size_for(n, attacker.batch_size, attacker.family)
    batches = _batches(n, batch, generator)
    marks, scores, diverged = attacker.marks, [], None
    next_mark = 0
    keep_frozen_in_eval(model.train())
    for step in range(1, attacker.horizon + 1):
        if diverged is None:
            idx = next(batches)
            loss = head.loss(model(train_x[idx].to(dtype)), data.train_y[idx])
            if not torch.isfinite(loss):
                diverged = step
            else:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        if step == marks[next_mark]:
            scores.append(math.nan if diverged else _score(model, head, eval_x, data.eval_y, dtype))
            if math.isnan(scores[-1]) and diverged is None:
                diverged = step
            keep_frozen_in_eval(model.train())  # _score left it in eval mode
            next_mark += 1
    return AttackResult(marks, scores, time.perf_counter() - start, diverged)


def _exact_line_search(
    extractor: nn.Module, data: AttackData, attacker: Attacker, cache: dict | None, start: float
) -> AttackResult:
    """The paper's attacker (Eq. 16) on frozen features, scored with the task's metric:
    squared loss on probe targets (±1 for binary, one-hot for multiclass), float64."""
    _, z_train, z_eval = prepare_features(extractor, data, "probe", cache)
    targets = probe_targets(data.train_y, data.task)
    trajectory = gd_exact_line_search(
        z_train.double(), targets, steps=attacker.horizon, keep_iterates=True
    )
    head = LinearHead(z_train.shape[1], data.num_outputs, data.task)
    scores = []
    for mark in attacker.marks:
        output = z_eval.double() @ trajectory.iterates[mark]
        finite = bool(torch.isfinite(output).all())
        scores.append(float(head.metric(output, data.eval_y)) if finite else math.nan)
    return AttackResult(attacker.marks, scores, time.perf_counter() - start)


def _width(body: nn.Module, x: Tensor) -> int:
    if isinstance(body, nn.Identity):
        return int(x.reshape(x.shape[0], -1).shape[1])
    with torch.no_grad():
        was = body.training
        body.eval()
        width = int(body(x).reshape(x.shape[0], -1).shape[1])
        body.train(was)
    return width


@torch.no_grad()
def _score(model: nn.Module, head: LinearHead, x: Tensor, y: Tensor, dtype: torch.dtype) -> float:
    model.eval()
    outputs = torch.cat(
        [model(x[i : i + EVAL_CHUNK].to(dtype)) for i in range(0, len(x), EVAL_CHUNK)]
    )
    if not torch.isfinite(outputs).all():
        return math.nan
    return float(head.metric(outputs, y))
