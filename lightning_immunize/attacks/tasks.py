"""The data and models of a card, from a paired data module and a released model.

- resistance: the attacker trains on D_H's training split (the samples the immunization saw);
  D_H's held-out samples are split in two disjoint halves: the *selection* split the search
  scores its trials on, and the *scoring* split the chosen attacker is re-run and reported on;
- generalization: it trains on D_H samples the immunization never saw — the data module's
  ``withheld_harmful`` samples when it withheld some, else the other part of the held-out
  split — scored on the same samples;
- trainability: a benign task — D_P's images relabelled by the parity of their class for
  multi-class D_P (a new task on the defender's data), else D_P's own task;
- a data module without a held-out split: 20 % of each side's training samples (seeded)
  score the attacker, who trains on the rest; generalization is then not measured;
- the ``scratch`` model: the architecture of θ_0 with freshly initialised weights;
- the ``ceiling`` model: θ_0 with the blocks the immunization trains taken from scratch.
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


def _stack(dataset) -> tuple[Tensor, Tensor]:
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))), strict=True)
    return torch.stack([torch.as_tensor(x) for x in xs]), torch.stack(
        [torch.as_tensor(y) for y in ys]
    )


def _num_outputs(task: str, num_classes: int | None) -> int:
    if task == "multiclass":
        if not num_classes or num_classes < 2:
            raise ValueError(f"a multiclass task needs num_classes >= 2, got {num_classes!r}.")
        return int(num_classes)
    return 1


def _halves(
    x: Tensor, y: Tensor, cap: int | None
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """``(selection x, y, scoring x, y)``: the first half (at most ``cap``) selects, every
    other sample scores; one sample: it selects and nothing scores."""
    n_select = max(1, x.shape[0] // 2)
    if cap is not None:
        n_select = min(n_select, cap)
    if n_select >= x.shape[0]:
        return x, y, None, None
    return x[:n_select], y[:n_select], x[n_select:], y[n_select:]


def attack_tasks(
    datamodule: Any,
    eval_samples: int | None = None,
    seed: int = 0,
    stability: dict[str, float] | None = None,
    unseen_samples: int | None = None,
) -> AttackTasks:
    """The card's data from a paired data module (its ``full_tensors`` train and val splits).

    Each side's held-out samples (a ``seed``-ed permutation) are split into a selection half
    (at most ``eval_samples``) and a scoring split (every other sample). ``unseen_samples``:
    how many held-out D_H samples train the generalization attacker when the data module
    withheld none (default: half of them); the rest select and score.
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
        n_unseen = xv_h.shape[0] // 2 if unseen_samples is None else unseen_samples
        n_unseen = min(n_unseen, xv_h.shape[0] - 2)
        score_idx = order[n_unseen:]
        unseen = (xv_h[order[:n_unseen]], yv_h[order[:n_unseen]])
    select_x, select_y, score_x, score_y = _halves(xv_h[score_idx], yv_h[score_idx], eval_samples)
    task_h = task
    if task == "binary" and y_h.unique().numel() == 1:
        # A digit pair's D_H is one digit with one label: accuracy is 1 for any attacker.
        task_h, y_h, select_y = "regression", 2.0 * y_h - 1.0, 2.0 * select_y - 1.0
        score_y = None if score_y is None else 2.0 * score_y - 1.0
        unseen = None if unseen is None else (unseen[0], 2.0 * unseen[1] - 1.0)
        notes.append(
            "D_H's samples all have one label, so accuracy would be 1 for any attacker: the "
            "attacker fits the ±1 targets by squared loss and is scored by held-out MSE (the "
            "loss of the paper's attacker, Eq. 16)"
        )
    splits = (select_x, select_y, task_h, outputs_h, score_x, score_y)
    harmful = AttackData("harmful", x_h, y_h, *splits)
    if unseen is not None:
        harmful_unseen = AttackData("harmful-unseen", *unseen, *splits)

    classes_p = getattr(datamodule, "num_classes_pretrain", None)
    order_p = torch.randperm(xv_p.shape[0], generator=generator)
    bx, by, sx, sy = _halves(xv_p[order_p], yv_p[order_p], eval_samples)
    if task == "multiclass" and classes_p and classes_p >= 3:
        parity = None if sy is None else (sy % 2).float()
        benign = AttackData("benign-parity", x_p, (y_p % 2).float(), bx, (by % 2).float(),
                            "binary", 1, sx, parity)  # fmt: skip
    elif task == "binary" and y_p.unique().numel() == 1:  # D_P of a digit pair, as D_H
        signs = None if sy is None else 2.0 * sy - 1.0
        benign = AttackData("benign-pretrain", x_p, 2.0 * y_p - 1.0, bx, 2.0 * by - 1.0,
                            "regression", 1, sx, signs)  # fmt: skip
    else:
        benign = AttackData("benign-pretrain", x_p, y_p, bx, by, task,
                            _num_outputs(task, classes_p), sx, sy)  # fmt: skip
    return AttackTasks(harmful, harmful_unseen, benign, stability, tuple(notes))


def ceiling_weights(theta_0: nn.Module, scratch: nn.Module, trained: nn.Module) -> nn.Module:
    """A copy of ``theta_0`` whose modules that own a parameter ``trained`` trains
    (``requires_grad``; the blocks an immunization changes) take ``scratch``'s parameters and
    buffers (BatchNorm statistics included): how much of θ_0's head start lives in those
    blocks."""
    ceiling = copy.deepcopy(theta_0)
    owners = {n.rsplit(".", 1)[0] if "." in n else "" for n, p in trained.named_parameters()
              if p.requires_grad}  # fmt: skip
    fresh = scratch.state_dict()
    state = {k: (fresh[k] if (k.rsplit(".", 1)[0] if "." in k else "") in owners else v)
             for k, v in ceiling.state_dict().items()}  # fmt: skip
    ceiling.load_state_dict(state)
    return ceiling


def released_models(
    immunized: nn.Module,
    theta_0: nn.Module | None,
    seed: int = 0,
    control: nn.Module | None = None,
) -> dict[str, nn.Module]:
    """The models a card compares: ``immunized``; ``reference`` (θ_0, or for a linear
    extractor the identity of its width, float64); deep nets only: ``scratch`` (θ_0's
    architecture with random weights), ``ceiling`` (:func:`ceiling_weights`) and, when given,
    ``control`` (θ_0 trained as the immunized model with every immunization term off)."""
    from lightning_immunize.models import LinearExtractor

    if isinstance(immunized, LinearExtractor):
        width = immunized.linear.in_features
        reference = LinearExtractor(width, width, init="identity").to(torch.float64)
        return {"immunized": immunized, "reference": reference}
    if theta_0 is None:
        raise ValueError(
            "a deep extractor's card needs θ_0 (the extractor before immunization), got None."
        )
    scratch = random_weights(theta_0, seed)
    models = {
        "immunized": immunized,
        "reference": theta_0,
        "scratch": scratch,
        "ceiling": ceiling_weights(theta_0, scratch, immunized),
    }
    if control is not None:
        models["control"] = control
    return models
