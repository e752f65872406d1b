"""A durability sweep: every (condition, data budget, model, family) study of a budget, run
as worst-case searches into one Optuna storage, with ``trials.csv`` written as trials finish.

Models are named ``immunized``, ``reference`` (θ_0, or the identity for linear models) and,
for deep nets, ``scratch`` (the same architecture, random weights).
"""

from __future__ import annotations

import csv
import hashlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from lightning_immunize.attacks.attacker import (
    AttackData,
    full_batch_note,
    run_attack,
    step_marks,
)
from lightning_immunize.attacks.budgets import Budget
from lightning_immunize.attacks.families import DETERMINISTIC_FAMILIES, check_supported
from lightning_immunize.attacks.search import (
    TrialRecord,
    finished_trials,
    sqlite_url,
    worst_case_search,
)
from lightning_immunize.fingerprints import fingerprint
from lightning_immunize.pretraining import state_fingerprint

MODEL_NAMES = ("immunized", "reference", "scratch")
STUDIES_NAME = "studies.db"
TRIALS_NAME = "trials.csv"


@dataclass(frozen=True)
class AttackTasks:
    """The data of a card's conditions.

    ``harmful``: D_H samples the immunization saw (training) and held-out ones (scoring);
    ``harmful_unseen``: D_H samples the immunization never saw, same scoring samples (or
    ``None``); ``benign``: a task the defender wants to stay easy (or ``None``);
    ``stability``: D_P held-out metric per model name; ``notes``: how the data were drawn,
    for the card.
    """

    harmful: AttackData
    harmful_unseen: AttackData | None = None
    benign: AttackData | None = None
    stability: dict[str, float] | None = None
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Study:
    condition: str
    data_budget: int | None
    model: str
    family: str
    data: AttackData

    def trials(self, budget: Budget) -> int:
        """The budget's trial count; one for a family with nothing to search."""
        return 1 if self.family in DETERMINISTIC_FAMILIES else budget.trials

    @property
    def name(self) -> str:
        return f"{self.condition}/n={budget_label(self.data_budget)}/{self.model}/{self.family}"


def budget_label(data_budget: int | None) -> str:
    return "all" if data_budget is None else str(data_budget)


def plan_studies(
    models: dict[str, nn.Module],
    tasks: AttackTasks,
    budget: Budget,
    families: Sequence[str],
    notes: list[str] | None = None,
) -> list[Study]:
    """Every study of ``budget``, checked before any trial runs.

    Conditions whose data cannot support the budget (too few unseen samples) are left out
    with a line in ``notes``; a family a model cannot support or a data budget larger than
    the data raises ``ValueError``.
    """
    notes = notes if notes is not None else []
    notes.extend(tasks.notes)
    seed = budget.space.seed
    studies: list[Study] = []

    def add(condition: str, data: AttackData, data_budget: int | None, fams: Sequence[str]):
        subset = data.subset(data_budget, seed)
        for model in models:
            for family in fams:
                studies.append(Study(condition, data_budget, model, family, subset))

    data_budgets = list(budget.data_budgets)
    gen = budget.generalization
    if gen is not None and tasks.harmful_unseen is not None:
        available = tasks.harmful_unseen.train_x.shape[0]
        needed = max(gen.data_budget or 0, max(budget.space.batch_sizes))
        if available < needed:
            notes.append(
                f"generalization not measured: {available} unseen harmful samples, fewer than "
                f"the {needed} the budget needs (data budget and largest batch)"
            )
            gen = None
        elif gen.data_budget not in data_budgets:
            data_budgets.append(gen.data_budget)
    elif gen is not None:
        notes.append("generalization not measured: no harmful samples the immunization never saw")
        gen = None
    for data_budget in data_budgets:
        add("resistance", tasks.harmful, data_budget, families)
    if gen is not None:
        add(
            "generalization",
            tasks.harmful_unseen,
            gen.data_budget,
            [f for f in gen.families if f in families],
        )
    train = budget.trainability
    if train is not None and tasks.benign is not None:
        add(
            "trainability",
            tasks.benign,
            train.data_budget,
            [f for f in train.families if f in families],
        )
    elif train is not None:
        notes.append("trainability not measured: no benign task for this data")
    for study in studies:
        check_supported(models[study.model], study.family, study.model)
        note = full_batch_note(study.data, budget.space.batch_sizes, study.family)
        if note is not None and note not in notes:
            notes.append(note)
    return studies


def study_key(study: Study, model_fingerprint: str, budget: Budget) -> str:
    """The study's name in the storage: :attr:`Study.name` plus a fingerprint of what decides
    its trials — the model's weights and trainable set, the attack data, the horizon and the
    search space. Cards sharing a storage (``--storage``) reuse a study only when all of these
    agree (θ_0's and scratch's searches when several immunized models face the same θ_0)."""
    data = study.data
    tensors = [data.train_x, data.train_y, data.eval_x, data.eval_y]
    data_fp = fingerprint(*tensors)
    settings = f"{model_fingerprint}|{data_fp}|{data.task}|{data.num_outputs}|"
    settings += f"{budget.horizon}|{budget.space!r}"
    digest = hashlib.sha256(settings.encode()).hexdigest()[:16]
    return f"{study.name}@{digest}"


def model_fingerprint(model: nn.Module) -> str:
    """Fingerprint of a model's parameters and buffers, and which parameters are trainable."""
    trainable = ",".join(n for n, p in model.named_parameters() if p.requires_grad)
    return f"{state_fingerprint(model)}|trainable:{trainable}"


def trial_row(study: Study, record: TrialRecord) -> dict[str, object]:
    """One ``trials.csv`` row: the study, every hyperparameter, the score at each mark."""
    a = record.attacker
    row: dict[str, object] = {
        "condition": study.condition,
        "data_budget": budget_label(study.data_budget),
        "model": study.model,
        "family": study.family,
        "trial": record.index,
        "seed": a.seed,
        "optimizer": a.optimizer,
        "lr": a.lr,
        "batch_size": a.batch_size,
        "horizon": a.horizon,
        "objective": record.objective,
        "seconds": record.result.seconds,
        "diverged_at": record.result.diverged_at or "",
    }
    for mark, score in zip(record.result.marks, record.result.scores, strict=True):
        row[f"at_{mark}"] = score
    return row


def write_trials(path: Path, rows: list[dict[str, object]], horizon: int) -> Path:
    columns = [
        "condition",
        "data_budget",
        "model",
        "family",
        "trial",
        "seed",
        "optimizer",
        "lr",
        "batch_size",
        "horizon",
        "objective",
        "seconds",
        "diverged_at",
    ] + [f"at_{m}" for m in step_marks(horizon)]
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)
    return path


def run_studies(
    models: dict[str, nn.Module],
    studies: list[Study],
    budget: Budget,
    out: str | Path,
    storage: str | None = None,
    progress: bool = True,
) -> dict[str, list[TrialRecord]]:
    """Run every study to ``budget.trials`` finished trials (resuming what the storage
    holds); ``<out>/trials.csv`` is rewritten after each trial. Returns records by study name.
    """
    import optuna

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = storage or sqlite_url(out / STUDIES_NAME)
    store = optuna.storages.RDBStorage(url)
    model_fps = {name: model_fingerprint(models[name]) for name in {s.model for s in studies}}
    keys = {s.name: study_key(s, model_fps[s.model], budget) for s in studies}
    records: dict[str, list[TrialRecord]] = {
        s.name: finished_trials(store, keys[s.name])[: s.trials(budget)] for s in studies
    }
    cache: dict = {}

    def rewrite() -> None:
        rows = [trial_row(s, r) for s in studies for r in records[s.name]]
        write_trials(out / TRIALS_NAME, rows, budget.horizon)

    done = sum(len(r) for r in records.values())
    from tqdm.auto import tqdm

    total = sum(s.trials(budget) for s in studies)
    if done:
        tqdm.write(f"resuming: {done} of {total} trials done (in {url})", file=sys.stderr)
    with tqdm(total=total, initial=done, disable=not progress, desc="attack trials",
              unit="trial", dynamic_ncols=True) as bar:  # fmt: skip
        for study in studies:
            if len(records[study.name]) >= study.trials(budget):
                continue
            bar.set_postfix_str(study.name)

            def finished(record: TrialRecord, study: Study = study) -> None:
                records[study.name].append(record)
                rewrite()
                bar.update(1)

            model = models[study.model]
            records[study.name] = worst_case_search(
                store,
                keys[study.name],
                lambda attacker, model=model, data=study.data: run_attack(
                    model, data, attacker, cache
                ),
                budget.space,
                study.family,
                budget.horizon,
                study.trials(budget),
                study.data.higher_is_better,
                on_trial=finished,
            )
    rewrite()
    return records
