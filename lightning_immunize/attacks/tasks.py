"""The data and models of a card, from a paired data module and a released model.

- resistance: the attacker trains on D_H's training split (the samples the immunization saw)
  and is scored on part of D_H's held-out split;
- generalization: it trains on D_H samples the immunization never saw — the data module's
  ``withheld_harmful`` samples when it withheld some, else the other part of the held-out
  split — scored on the same samples;
- trainability: a benign task — D_P's images relabelled by the parity of their class for
  multi-class D_P (a new task on the defender's data), else D_P's own task;
- a data module without a held-out split: 20 % of each side's training samples (seeded)
  score the attacker, who trains on the rest; generalization is then not measured;
- the ``scratch`` model: the architecture of θ_0 with freshly initialised weights.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from lightning_immunize.attacks.attacker import AttackData
from lightning_immunize.attacks.sweep import AttackTasks


def random_weights(model: nn.Module, seed: int = 0) -> nn.Module:
    """A copy of ``model`` re-initialised as its architecture is at creation, seeded: every
    layer's ``reset_parameters`` (BatchNorm: affine and running statistics), then the
    ``init_weights`` of each outermost timm model inside (e.g. ResNet's fan-out normal
    convolutions and zeroed last BatchNorm of every block), which a generic reset would
    miss. Which parameters are trainable is kept."""
    fresh = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in fresh.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
        done: list[str] = []
        for name, module in fresh.named_modules():
            if any(name.startswith(f"{d}.") or d == "" for d in done):
                continue  # inside a model initialised already
            init = getattr(module, "init_weights", None)
            if callable(init) and type(module).__module__.startswith("timm."):
                init()
                done.append(name)
    return fresh


#: Share of a side's training samples kept for scoring when a data module has no held-out split.
CARVED_FRACTION = 0.2


def _carve(
    x: Tensor, y: Tensor, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_train, y_train, x_score, y_score)``: a seeded split of one side's samples."""
    order = torch.randperm(x.shape[0], generator=generator)
    n_score = max(1, round(CARVED_FRACTION * x.shape[0]))
    score, train = order[:n_score], order[n_score:]
    return x[train], y[train], x[score], y[score]


def _limit(x: Tensor, y: Tensor, n: int | None) -> tuple[Tensor, Tensor]:
    return (x, y) if n is None else (x[:n], y[:n])


def _stack(dataset) -> tuple[Tensor, Tensor]:
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))), strict=True)
    return torch.stack([torch.as_tensor(x) for x in xs]), torch.stack(
        [torch.as_tensor(y) for y in ys]
    )


def _num_outputs(task: str, num_classes: int | None) -> int:
    if task == "multiclass":
        if not num_classes or num_classes < 2:
            raise ValueError(f"a multiclass task needs num_classes >= 2, got {num_classes!r}")
        return int(num_classes)
    return 1


def attack_tasks(
    datamodule: Any,
    eval_samples: int | None = None,
    seed: int = 0,
    stability: dict[str, float] | None = None,
) -> AttackTasks:
    """The card's data from a paired data module (its ``full_tensors`` train and val splits).

    ``eval_samples`` caps the scoring samples (first ones of a ``seed``-ed permutation).
    """
    datamodule.setup("fit")
    x_p, y_p, x_h, y_h = datamodule.full_tensors("train")
    task = datamodule.task
    generator = torch.Generator().manual_seed(seed)
    notes: list[str] = []
    try:
        xv_p, yv_p, xv_h, yv_h = datamodule.full_tensors("val")
    except ValueError:
        (x_p, y_p, xv_p, yv_p), (x_h, y_h, xv_h, yv_h) = (
            _carve(x_p, y_p, generator),
            _carve(x_h, y_h, generator),
        )
        notes.append(
            f"{type(datamodule).__name__} has no held-out split: each side's training samples "
            f"were split {1 - CARVED_FRACTION:.0%}/{CARVED_FRACTION:.0%} (seeded), the attacker "
            "scored on the smaller part — samples the immunization saw"
        )
    order = torch.randperm(xv_h.shape[0], generator=generator)
    withheld = getattr(datamodule, "withheld_harmful", None)
    harmful_unseen = None
    outputs_h = _num_outputs(task, getattr(datamodule, "num_classes_harmful", None))
    if withheld is not None and len(withheld) > 0:
        score_idx, unseen = order, _stack(withheld)
    elif notes:
        score_idx, unseen = order, None
    else:
        half = xv_h.shape[0] // 2
        score_idx = order[:half]
        unseen = (xv_h[order[half:]], yv_h[order[half:]])
    score_x, score_y = _limit(xv_h[score_idx], yv_h[score_idx], eval_samples)
    task_h = task
    if task == "binary" and y_h.unique().numel() == 1:
        # A digit pair's D_H is one digit with one label: accuracy is 1 for any attacker.
        task_h, y_h, score_y = "regression", 2.0 * y_h - 1.0, 2.0 * score_y - 1.0
        unseen = None if unseen is None else (unseen[0], 2.0 * unseen[1] - 1.0)
        notes.append(
            "D_H's samples all have one label, so accuracy would be 1 for any attacker: the "
            "attacker fits the ±1 targets by squared loss and is scored by held-out MSE (the "
            "loss of the paper's attacker, Eq. 16)"
        )
    harmful = AttackData("harmful", x_h, y_h, score_x, score_y, task_h, outputs_h)
    if unseen is not None:
        harmful_unseen = AttackData("harmful-unseen", *unseen, score_x, score_y, task_h, outputs_h)

    classes_p = getattr(datamodule, "num_classes_pretrain", None)
    order_p = torch.randperm(xv_p.shape[0], generator=generator)
    bx, by = _limit(xv_p[order_p], yv_p[order_p], eval_samples)
    if task == "multiclass" and classes_p and classes_p >= 3:
        benign = AttackData(
            "benign-parity", x_p, (y_p % 2).float(), bx, (by % 2).float(), "binary", 1
        )
    elif task == "binary" and y_p.unique().numel() == 1:  # D_P of a digit pair, as D_H
        benign = AttackData(
            "benign-pretrain", x_p, 2.0 * y_p - 1.0, bx, 2.0 * by - 1.0, "regression", 1
        )
    else:
        benign = AttackData(
            "benign-pretrain", x_p, y_p, bx, by, task, _num_outputs(task, classes_p)
        )
    return AttackTasks(harmful, harmful_unseen, benign, stability, tuple(notes))


def released_models(
    immunized: nn.Module, theta_0: nn.Module | None, seed: int = 0
) -> dict[str, nn.Module]:
    """The models a card compares: ``immunized``; ``reference`` (θ_0, or for a linear
    extractor the identity of its width, float64); ``scratch`` (θ_0's architecture with
    random weights; deep nets only)."""
    from lightning_immunize.models import LinearExtractor

    if isinstance(immunized, LinearExtractor):
        width = immunized.linear.in_features
        reference = LinearExtractor(width, width, init="identity").to(torch.float64)
        return {"immunized": immunized, "reference": reference}
    if theta_0 is None:
        raise ValueError("a deep extractor's card needs θ_0 (the extractor before immunization)")
    return {
        "immunized": immunized,
        "reference": theta_0,
        "scratch": random_weights(theta_0, seed),
    }
