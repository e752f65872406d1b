"""Probe families: a linear head on the released model's frozen features.

- ``probe``: the paper's attacker (Section 3), with a searched optimizer;
- ``probe-whitened``: the same on features whitened by the attacker's own covariance
  estimate of its training features — adaptive to a conditioning defence, which changes the
  features' condition number (Definition 3.1) and nothing a whitening attacker cannot undo;
- ``gd`` / ``adam``: full-batch gradient descent / Adam probes with a searched step size;
- ``gd-exact``: the paper's attacker itself (Eq. 16): gradient descent with exact line search
  on the squared loss of a linear probe, from zero weights — nothing to search.
"""

from __future__ import annotations

import math
import time
from typing import ClassVar

import torch
from torch import Tensor, nn

from lightning_immunize.attacks.families.base import (
    AttackerFamily,
    Prepared,
    fused,
    register_family,
)
from lightning_immunize.attacks.families.preparation import cached_features
from lightning_immunize.evaluation.study import probe_targets
from lightning_immunize.models import LinearHead
from lightning_immunize.probing import gd_exact_line_search

#: The whitening attacker keeps the directions of its covariance estimate whose eigenvalue
#: exceeds this fraction of the largest (an estimate from few samples is rank-deficient, and
#: whitening its null space would only amplify noise).
WHITENING_FLOOR = 1e-6


def whitening(z: Tensor) -> tuple[Tensor, Tensor]:
    """``(mean, W)`` such that ``(z − mean) @ W`` has identity covariance on the span of the
    attacker's own samples ``z`` ``(N, K)``; ``W`` is ``(K, r)``, ``r`` the number of
    covariance eigenvalues above ``WHITENING_FLOOR`` × the largest (float64).

    Example:
        >>> scale = torch.tensor([10.0, 1.0, 0.1, 0.0], dtype=torch.float64)
        >>> z = torch.randn(50, 4, dtype=torch.float64) * scale
        >>> mean, w = whitening(z)
        >>> cov = torch.cov(((z - mean) @ w).T)
        >>> w.shape[1], bool(torch.allclose(cov, torch.eye(3, dtype=torch.float64), atol=1e-8))
        (3, True)
    """
    z64 = z.double()
    mean = z64.mean(0)
    centered = z64 - mean
    cov = centered.T @ centered / max(z64.shape[0] - 1, 1)
    evals, evecs = torch.linalg.eigh(cov)
    keep = evals > WHITENING_FLOOR * evals.max().clamp_min(torch.finfo(torch.float64).tiny)
    if not keep.any():  # constant features: one direction, scaled by 1 (nothing to learn)
        return mean.to(z.dtype), evecs[:, -1:].to(z.dtype)
    w = evecs[:, keep] * evals[keep].rsqrt()
    return mean.to(z.dtype), w.to(z.dtype)


@register_family
class Probe(AttackerFamily):
    """A linear head trained on frozen features by a searched mini-batch optimizer."""

    name = "probe"

    def prepare(self, extractor, data, attacker, cache) -> Prepared:
        z_train, z_eval, z_score = cached_features(extractor, data, attacker.batchnorm, cache)
        return Prepared(nn.Identity(), z_train, z_eval, z_score)


@register_family
class WhitenedProbe(Probe):
    """A probe on features whitened by the attacker's estimate from its training features."""

    name = "probe-whitened"

    def prepare(self, extractor, data, attacker, cache) -> Prepared:
        p = super().prepare(extractor, data, attacker, cache)
        mean, w = whitening(p.train_x)
        score = None if p.score_x is None else (p.score_x - mean) @ w
        return Prepared(p.body, (p.train_x - mean) @ w, (p.eval_x - mean) @ w, score)


class FullBatchProbe(Probe):
    """A probe trained on every sample each step by ``step_rule`` (the step size searched)."""

    full_batch = True
    step_rule: ClassVar[type[torch.optim.Optimizer]] = torch.optim.SGD

    def optimizer(self, attacker, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return fused(self.step_rule, params, lr=attacker.lr)


@register_family
class FullBatchGD(FullBatchProbe):
    """Full-batch gradient descent on a probe."""

    name = "gd"


@register_family
class FullBatchAdam(FullBatchProbe):
    """Full-batch Adam on a probe."""

    name = "adam"
    step_rule = torch.optim.Adam


@register_family
class ExactLineSearch(Probe):
    """The paper's attacker (Eq. 16) on frozen features, scored with the task's metric:
    squared loss on probe targets (±1 for binary, one-hot for multiclass), float64."""

    name = "gd-exact"
    full_batch = True
    deterministic = True

    def run(self, extractor, data, attacker, cache, split, per_sample=False):
        from lightning_immunize.attacks.attacker import AttackResult, per_sample_metric

        start = time.perf_counter()
        p = self.prepare(extractor, data, attacker, cache)
        z_eval, y_eval = (p.eval_x, data.eval_y) if split == "selection" else (
            p.score_x, data.score_y)  # fmt: skip
        targets = probe_targets(data.train_y, data.task)
        trajectory = gd_exact_line_search(
            p.train_x.double(), targets, steps=attacker.horizon, keep_iterates=True
        )
        head = LinearHead(p.train_x.shape[1], data.num_outputs, data.task)
        scores, samples = [], []
        for mark in attacker.marks:
            output = z_eval.double() @ trajectory.iterates[mark]
            finite = bool(torch.isfinite(output).all())
            scores.append(float(head.metric(output, y_eval)) if finite else math.nan)
            if per_sample:
                values = per_sample_metric(data.task, head_output(output, data), y_eval)
                samples.append([round(v, 7) for v in values.tolist()])
        return AttackResult(
            attacker.marks, scores, time.perf_counter() - start,
            per_sample=samples if per_sample else None,
        )  # fmt: skip


def head_output(output: Tensor, data) -> Tensor:
    """A probe's ``(N, 1)`` output as :class:`LinearHead` returns it for one output: ``(N,)``."""
    return output.squeeze(1) if data.task != "multiclass" and output.shape[-1] == 1 else output
