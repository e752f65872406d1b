"""The attacker's training loop: a copy of a released model (what its family trains) with a
fresh linear head, trained on the attacker's samples and scored at each step mark."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from lightning_immunize.attacks.attacker import (
    AttackData,
    Attacker,
    AttackResult,
    batch_size_for,
    per_sample_metric,
)
from lightning_immunize.attacks.families import get_family, lr_factor
from lightning_immunize.models import LinearHead, keep_frozen_in_eval

#: Samples per forward pass when scoring (memory only; the score does not depend on it).
EVAL_CHUNK = 512

#: Called after each step mark with (mark index, score); returning True stops the trial
#: there (the search's pruner).
Report = Callable[[int, float], bool]


def run_attack(
    extractor: nn.Module,
    data: AttackData,
    attacker: Attacker,
    feature_cache: dict | None = None,
    split: str = "selection",
    report: Report | None = None,
    per_sample: bool = False,
) -> AttackResult:
    """Train a copy of ``extractor`` (per ``attacker.family``) with a fresh linear head on
    ``data``'s training split; score ``split`` (``"selection"``: ``data.eval_*``;
    ``"scoring"``: ``data.score_*``) after each step mark.

    Args:
        feature_cache: a dict owned by the caller that keeps what a family computes once
            (frozen features, a frozen prefix's outputs, recalibrated BatchNorm) between
            trials of the same extractor and data.
        report: the search's pruner hook (:data:`Report`).
        per_sample: keep each scored sample's metric at each mark (``AttackResult.per_sample``).

    Returns:
        :class:`AttackResult`: the metric (accuracy in [0, 1], or MSE) at ``attacker.marks``.

    Raises:
        ValueError: the family does not fit the extractor, or ``data`` has no such split.
    """
    family = get_family(attacker.family)
    family.check(extractor)
    data.scoring(split)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(attacker.seed)
        done = family.run(extractor, data, attacker, feature_cache, split, per_sample)
        if done is not None:
            return done
        return _train(family, extractor, data, attacker, feature_cache, split, report, per_sample)


def _train(family, extractor, data, attacker, cache, split, report, per_sample) -> AttackResult:
    start = time.perf_counter()
    prepared = family.prepare(extractor, data, attacker, cache)
    body, train_x = prepared.body, prepared.train_x
    eval_x = prepared.eval_x if split == "selection" else prepared.score_x
    eval_y = data.scoring(split)[1]
    dtype = next((p.dtype for p in body.parameters()), train_x.dtype)
    head = LinearHead(_width(body, train_x[:2]), data.num_outputs, data.task).to(dtype)
    model = nn.Sequential(body, head)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = family.optimizer(attacker, params)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    generator = torch.Generator().manual_seed(attacker.seed)
    n = train_x.shape[0]
    batches = _batches(n, batch_size_for(n, attacker.batch_size, attacker.family), generator)
    marks, scores, samples = attacker.marks, [], []
    diverged = pruned = None
    next_mark = 0
    keep_frozen_in_eval(model.train())
    for step in range(1, attacker.horizon + 1):
        if diverged is None:
            factor = lr_factor(step, attacker.horizon, attacker.schedule)
            for group, lr in zip(optimizer.param_groups, base_lrs, strict=True):
                group["lr"] = lr * factor
            idx = next(batches)
            loss = head.loss(model(train_x[idx].to(dtype)), data.train_y[idx])
            if not torch.isfinite(loss):
                diverged = step
            else:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        if step == marks[next_mark]:
            values = None if diverged else _outputs_metric(model, eval_x, eval_y, data.task, dtype)
            scores.append(math.nan if values is None else float(values.mean()))
            if per_sample:
                samples.append(_worst_values(values, eval_y.shape[0], data.task))
            if math.isnan(scores[-1]) and diverged is None:
                diverged = step
            keep_frozen_in_eval(model.train())  # scoring left it in eval mode
            if report is not None and step < attacker.horizon and report(next_mark, scores[-1]):
                pruned = step
                break
            next_mark += 1
    return AttackResult(
        marks,
        scores,
        time.perf_counter() - start,
        diverged,
        pruned,
        samples if per_sample else None,
    )


def _batches(n: int, batch_size: int, generator: torch.Generator):
    """Indices of successive batches: reshuffled epochs, the last incomplete batch dropped."""
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


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
def _outputs_metric(
    model: nn.Module, x: Tensor, y: Tensor, task: str, dtype: torch.dtype
) -> Tensor | None:
    """Each sample's metric (:func:`per_sample_metric`); ``None`` when an output is not finite."""
    model.eval()
    outputs = torch.cat(
        [model(x[i : i + EVAL_CHUNK].to(dtype)) for i in range(0, len(x), EVAL_CHUNK)]
    )
    if not torch.isfinite(outputs).all():
        return None
    return per_sample_metric(task, outputs, y)


def _worst_values(values: Tensor | None, n: int, task: str) -> list[float]:
    """Per-sample values of a mark; a diverged mark counts as every sample wrong (accuracy)
    or infinite error (MSE)."""
    if values is None:
        return [0.0 if task != "regression" else math.inf] * n
    return [round(v, 7) for v in values.tolist()]
