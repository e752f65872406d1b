"""A durability report card from models and data: plan, run the worst-case searches and the
re-runs of their best configurations, write ``trials.csv``, ``confirm.csv``, ``card.json``,
``card.md``, ``effort.png`` and ``search.png``."""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from lightning_immunize.attacks.budgets import Budget
from lightning_immunize.attacks.card import build_card, card_markdown
from lightning_immunize.attacks.families import family_name
from lightning_immunize.attacks.figures import plot_effort, plot_search
from lightning_immunize.attacks.intervals import mean_over_marks
from lightning_immunize.attacks.sweep import (
    CONFIRM_NAME,
    TRIALS_NAME,
    AttackTasks,
    budget_label,
    plan_studies,
    run_studies,
)
from lightning_immunize.models import LinearExtractor

CARD_NAME = "card.md"


def default_families(model: nn.Module, budget: Budget) -> tuple[str, ...]:
    """The budget's families for this kind of model (``deep`` or ``linear``)."""
    kind = "linear" if isinstance(model, LinearExtractor) else "deep"
    if kind not in budget.families:
        raise ValueError(
            f"budget {budget.name!r} lists no families for {kind} models; expected a "
            f"{kind!r} entry in its families."
        )
    return budget.families[kind]


def read_trials(path: str | Path) -> list[dict[str, Any]]:
    with Path(path).open(newline="") as f:
        return list(csv.DictReader(f))


def durability_card(
    models: dict[str, nn.Module],
    tasks: AttackTasks,
    budget: Budget,
    out: str | Path,
    families: Sequence[str] | None = None,
    storage: str | None = None,
    progress: bool = True,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run ``budget``'s worst-case searches on ``models`` and write the card into ``out``.

    Args:
        models: ``{"immunized": θ_I, "reference": θ_0, "scratch": random weights,
            "ceiling": …, "control": …}`` extractors (all but the first two optional:
            linear protocols have none).
        tasks: the conditions' data (:class:`AttackTasks`).
        families: attacker families (default: the budget's for this kind of model).
        storage: an Optuna RDB URL shared by several machines (default: SQLite in ``out``).
        meta: extra fields for ``card.json`` (config, checkpoint, command).

    Returns:
        The card (also in ``<out>/card.json``).

    Raises:
        ValueError: before any trial, for a family a model cannot support, a data budget
            larger than the data, or a split smaller than a batch size of the search space.
    """
    if "immunized" not in models or "reference" not in models:
        raise ValueError(f"models must hold 'immunized' and 'reference', got {sorted(models)}.")
    families = tuple(map(family_name, families or default_families(models["immunized"], budget)))
    notes: list[str] = []
    studies = plan_studies(models, tasks, budget, families, notes)
    out = Path(out)
    start = time.perf_counter()
    records = run_studies(models, studies, budget, out, storage=storage, progress=progress)
    seconds = time.perf_counter() - start
    rows = read_trials(out / TRIALS_NAME)
    confirm_rows = read_trials(out / CONFIRM_NAME)
    samples = {
        (s.condition, budget_label(s.data_budget), s.family, s.model): mean_over_marks(
            [r.result.per_sample for r in records.confirms[s.name]]
        )
        for s in studies
        if records.confirms.get(s.name)
        and all(r.result.per_sample for r in records.confirms[s.name])
    }
    metrics = {"resistance": tasks.harmful.metric_name}
    if tasks.harmful_unseen is not None:
        metrics["generalization"] = tasks.harmful_unseen.metric_name
    if tasks.benign is not None:
        metrics["trainability"] = tasks.benign.metric_name
    info = {
        "budget": budget.name,
        "trials_per_study": budget.trials,
        "reseeds": budget.reseeds,
        "horizon": budget.horizon,
        "search_space": budget.space.__dict__,
        "reference": "θ_0" if "scratch" in models else "identity",
        **(meta or {}),
    }
    card = build_card(rows, metrics, tasks.stability, notes, info, confirm_rows, samples)
    (out / "card.json").write_text(json.dumps(card, indent=2, default=str) + "\n")
    figures = {}
    if plot_effort(card, out / "effort.png") is not None:
        figures["Worst-case harmful score against attacker steps"] = "effort.png"
    higher = tasks.harmful.higher_is_better
    if plot_search(rows, out / "search.png", higher, card) is not None:
        figures["Best-so-far search objective (selection split) against trial"] = "search.png"
    timing = {
        "seconds": seconds,
        "trial_seconds": sum(float(r["seconds"]) for r in rows + confirm_rows),
        "trial_count": len(rows) + len(confirm_rows),
    }
    card_md = card_markdown({**card, **timing}, figures)
    (out / CARD_NAME).write_text(card_md + "\n")
    return card
