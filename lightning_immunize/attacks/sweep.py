"""A durability sweep: every (condition, data budget, model, family) study of a budget, run
as a worst-case search then re-runs of its best configuration, into one Optuna storage, with
``trials.csv`` and ``confirm.csv`` written as they finish.

Models are named ``immunized``, ``reference`` (θ_0, or the identity for linear models) and,
for deep nets, ``scratch`` (the same architecture, random weights), ``ceiling`` (θ_0 with
the immunized blocks re-initialised as scratch's) and ``control`` (θ_0 trained as the
immunized model with every immunization term off), when given.
"""

from __future__ import annotations

import csv
import hashlib
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from lightning_immunize.attacks.attacker import AttackData, full_batch_note, step_marks
from lightning_immunize.attacks.budgets import Budget
from lightning_immunize.attacks.claims import StudyClaims
from lightning_immunize.attacks.families import check_supported, get_family, has_batchnorm
from lightning_immunize.attacks.search import (
    TrialRecord,
    best_trial,
    confirm_seed,
    confirm_worst_case,
    finished_trials,
    open_storage,
    sqlite_url,
    study_trials,
    worst_case_search,
)
from lightning_immunize.attacks.training import run_attack
from lightning_immunize.fingerprints import fingerprint
from lightning_immunize.pretraining import state_fingerprint

MODEL_NAMES = ("immunized", "reference", "scratch", "ceiling", "control")
#: Models measured only where the issue of a fair baseline lives: the network families at
#: the smallest resistance data budget.
PARTIAL_MODELS = ("ceiling", "control")
STUDIES_NAME = "studies.db"
TRIALS_NAME = "trials.csv"
CONFIRM_NAME = "confirm.csv"
#: Seconds a worker waits between looks at studies other workers hold.
POLL_SECONDS = 5.0


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
    """One worst-case search: a model, a family, the attacker's data (``data``: the subset of
    ``source`` the search trains on; the re-runs redraw it from ``source``)."""

    condition: str
    data_budget: int | None
    model: str
    family: str
    data: AttackData
    source: AttackData | None = None
    batchnorm: bool = False

    def trials(self, budget: Budget) -> int:
        """The budget's trial count; a deterministic family's grid."""
        return study_trials(self.family, budget.space, self.batchnorm, budget.trials)

    @property
    def group(self) -> str:
        """The studies every model shares configurations within."""
        return f"{self.condition}/n={budget_label(self.data_budget)}/{self.family}"

    @property
    def name(self) -> str:
        return f"{self.condition}/n={budget_label(self.data_budget)}/{self.model}/{self.family}"

    def rerun_data(self, rerun: int, seed: int) -> AttackData:
        """The attacker's data of re-run ``rerun``: a fresh subset (the same for every model)."""
        if self.data_budget is None or self.source is None:
            return self.data
        return self.source.subset(self.data_budget, confirm_seed(seed, rerun))


def budget_label(data_budget: int | None) -> str:
    return "all" if data_budget is None else str(data_budget)


#: The note of a card whose immunization trains every block of θ_0.
CEILING_IS_SCRATCH = (
    "ceiling not searched: the immunization trains every block, so θ_0 with those blocks "
    "from scratch is the scratch model (a perfect immunization removes all of θ_0's head start)"
)


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
    skipped = set()
    if (
        "ceiling" in models
        and "scratch" in models
        and state_fingerprint(models["ceiling"]) == state_fingerprint(models["scratch"])
    ):
        skipped.add("ceiling")
        notes.append(CEILING_IS_SCRATCH)
    batchnorm = any(has_batchnorm(m) for m in models.values())
    smallest = min(budget.data_budgets, key=lambda b: float("inf") if b is None else b)

    def add(condition: str, data: AttackData, data_budget: int | None, fams: Sequence[str]):
        subset = data.subset(data_budget, seed)
        for family in fams:
            for model in models:
                if model in skipped:
                    continue
                if model in PARTIAL_MODELS and not (
                    condition == "resistance"
                    and data_budget == smallest
                    and get_family(family).network
                ):
                    continue
                study = Study(condition, data_budget, model, family, subset, data, batchnorm)
                studies.append(study)

    data_budgets = list(budget.data_budgets)
    gen = budget.generalization
    if gen is not None and tasks.harmful_unseen is not None:
        available = tasks.harmful_unseen.train_x.shape[0]
        needed = budget.unseen_samples
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
        if study.data.score_x is None:
            note = (f"{study.data.name}: no separate scoring split, so the worst case's "
                    "re-runs are scored on the samples that selected it (optimistic for the "
                    "attacker)")  # fmt: skip
            if note not in notes:
                notes.append(note)
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
    settings += f"{budget.horizon}|{budget.space!r}|{study.group}"
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
        "weight_decay": a.weight_decay,
        "schedule": a.schedule,
        "batchnorm": a.batchnorm,
        "horizon": a.horizon,
        "objective": record.objective,
        "seconds": record.result.seconds,
        "diverged_at": record.result.diverged_at or "",
        "pruned_at": record.result.pruned_at or "",
    }
    for mark, score in zip(record.result.marks, record.result.scores, strict=False):
        row[f"at_{mark}"] = score
    return row


TRIAL_COLUMNS = ("condition", "data_budget", "model", "family", "trial", "seed", "optimizer",
                 "lr", "batch_size", "weight_decay", "schedule", "batchnorm", "horizon",
                 "objective", "seconds", "diverged_at", "pruned_at")  # fmt: skip


def write_trials(path: Path, rows: list[dict[str, object]], horizon: int) -> Path:
    """Write ``trials.csv`` (or ``confirm.csv``: the same columns, ``trial`` the re-run)
    atomically."""
    columns = list(TRIAL_COLUMNS) + [f"at_{m}" for m in step_marks(horizon)]
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)
    return path


@dataclass
class SweepRecords:
    """What a sweep holds, by study name: search trials and the best configuration's re-runs."""

    trials: dict[str, list[TrialRecord]]
    confirms: dict[str, list[TrialRecord]]


def run_studies(
    models: dict[str, nn.Module],
    studies: list[Study],
    budget: Budget,
    out: str | Path,
    storage: str | None = None,
    progress: bool = True,
) -> SweepRecords:
    """Run every study — ``budget.trials`` search trials, then ``budget.reseeds`` re-runs of
    its best configuration on the scoring split — resuming what the storage holds.

    Several workers may share ``storage``: each study is claimed by one worker at a time
    (:mod:`.claims`), and each worker returns once every study is done, whoever ran it.
    ``<out>/trials.csv`` and ``<out>/confirm.csv`` are rewritten as trials finish.
    """
    import optuna

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = storage or sqlite_url(out / STUDIES_NAME)
    store = open_storage(url)
    model_fps = {name: model_fingerprint(models[name]) for name in {s.model for s in studies}}
    keys = {s.name: study_key(s, model_fps[s.model], budget) for s in studies}
    records = SweepRecords({}, {})
    per_study = {s.name: s.trials(budget) + budget.reseeds for s in studies}

    def load(study: Study) -> int:
        records.trials[study.name] = finished_trials(store, keys[study.name])[
            : study.trials(budget)
        ]
        confirms = finished_trials(store, f"{keys[study.name]}/confirm")[: budget.reseeds]
        records.confirms[study.name] = confirms
        return len(records.trials[study.name]) + len(confirms)

    def rewrite() -> None:
        rows = [trial_row(s, r) for s in studies for r in records.trials.get(s.name, [])]
        write_trials(out / TRIALS_NAME, rows, budget.horizon)
        rows = [trial_row(s, r) for s in studies for r in records.confirms.get(s.name, [])]
        write_trials(out / CONFIRM_NAME, rows, budget.horizon)

    counts = {s.name: load(s) for s in studies}
    done, total = sum(counts.values()), sum(per_study.values())
    from tqdm.auto import tqdm

    if done:
        tqdm.write(f"resuming: {done} of {total} trials done (in {url})", file=sys.stderr)
    cache: dict = {}
    claims = StudyClaims(store)
    try:
        with tqdm(total=total, initial=done, disable=not progress, desc="attack trials",
                  unit="trial", dynamic_ncols=True) as bar:  # fmt: skip
            pending = [s for s in studies if counts[s.name] < per_study[s.name]]
            while pending:
                for study in pending:
                    if load(study) >= per_study[study.name] or not claims.claim(keys[study.name]):
                        continue
                    bar.set_postfix_str(study.name)
                    _run_study(study, models[study.model], keys[study.name], budget, store,
                               cache, records, rewrite, bar)  # fmt: skip
                    claims.release(keys[study.name])
                pending = [s for s in studies if load(s) < per_study[s.name]]
                if pending:  # held by other workers: wait for them, or for their lease to end
                    bar.set_postfix_str(f"waiting for {len(pending)} studies of other workers")
                    time.sleep(POLL_SECONDS)
                bar.n = sum(len(records.trials[s.name]) + len(records.confirms[s.name])
                            for s in studies)  # fmt: skip
                bar.refresh()
    finally:
        claims.close()
    rewrite()
    return records


def _run_study(study, model, key, budget, store, cache, records, rewrite, bar) -> None:
    """A study's search, then its best configuration's re-runs."""
    space, higher = budget.space, study.data.higher_is_better
    split = "selection" if study.data.score_x is None else "scoring"

    def finished(record: TrialRecord) -> None:
        records.trials[study.name].append(record)
        rewrite()
        bar.update(1)

    def confirmed(record: TrialRecord) -> None:
        records.confirms[study.name].append(record)
        rewrite()
        bar.update(1)

    records.trials[study.name] = worst_case_search(
        store, key,
        lambda attacker, report: run_attack(model, study.data, attacker, cache, report=report),
        space, study.family, budget.horizon, study.trials(budget), higher,
        on_trial=finished, group=study.group, batchnorm=study.batchnorm,
    )  # fmt: skip
    best = best_trial(records.trials[study.name], higher)
    records.confirms[study.name] = confirm_worst_case(
        store, key,
        lambda attacker, rerun: run_attack(model, study.rerun_data(rerun, space.seed), attacker,
                                           cache, split=split, per_sample=True),
        best, space.seed, budget.reseeds, on_run=confirmed,
    )  # fmt: skip
