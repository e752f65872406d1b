"""Worst-case attacker search: a seeded Optuna TPE study per (model, family), stored in an
RDB (SQLite by default) so an interrupted sweep resumes without repeating a finished trial.

Trial ``k`` of every study draws from a sampler seeded with ``space.seed + k`` over the
study's ``k`` finished trials, and its attacker's seed is :func:`trial_seed` ``(space.seed,
k)``: a study resumed after an interruption proposes what an uninterrupted one would have.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from lightning_immunize.attacks.attacker import Attacker, AttackResult, mean_score
from lightning_immunize.attacks.budgets import SearchSpace
from lightning_immunize.attacks.families import DETERMINISTIC_FAMILIES, FULL_BATCH_FAMILIES
from lightning_immunize.validation import unwritable_folder


def trial_seed(space_seed: int, index: int) -> int:
    """The attacker seed of trial ``index`` (the same for every model compared)."""
    return 1_000 * space_seed + index


SQLITE_PREFIX = "sqlite:///"
SQLITE_HEADER = b"SQLite format 3\x00"


def sqlite_url(path) -> str:
    """An SQLAlchemy URL for an SQLite file."""
    return f"{SQLITE_PREFIX}{path}"


def check_storage(url: str) -> None:
    """Opens the Optuna storage at ``url`` once, before any work, so that a bad one is an
    error naming it instead of a database traceback mid-sweep.

    Raises:
        ValueError: an SQLite path that is not a database, or cannot be created; any other
            storage that cannot be opened (the driver's first line is kept).
    """
    import optuna

    if url.startswith(SQLITE_PREFIX):
        path = Path(url[len(SQLITE_PREFIX) :])
        if path.is_dir():
            raise ValueError(f"--storage {url}: {path} is a folder; expected an SQLite file.")
        if path.is_file() and path.stat().st_size:
            with path.open("rb") as f:
                if f.read(len(SQLITE_HEADER)) != SQLITE_HEADER:
                    raise ValueError(
                        f"--storage {url}: {path} is not an SQLite database; expected an "
                        "Optuna SQLite file, or a path where one can be created."
                    )
        elif (folder := unwritable_folder(path)) is not None:
            raise ValueError(
                f"--storage {url}: {path} cannot be created ({folder} is not a writable folder)."
            )
    try:
        optuna.storages.RDBStorage(url)
    except Exception as err:  # noqa: BLE001 - SQLAlchemy and drivers raise many types
        first = next((ln for ln in str(err).splitlines() if ln.strip()), type(err).__name__)
        raise ValueError(f"--storage {url}: cannot be opened ({first.strip()}).") from err


@dataclass(frozen=True)
class TrialRecord:
    """A finished trial: its index within the study, attacker and scores."""

    index: int
    attacker: Attacker
    result: AttackResult
    objective: float


def search_objective(result: AttackResult, higher_is_better: bool) -> float:
    """The value the attacker optimises: :func:`mean_score` of the trial, 1e30 when every
    mark of an MSE trial diverged (Optuna needs a finite value)."""
    return mean_score(result.scores, higher_is_better, all_diverged=1e30)


def suggest_attacker(trial, space: SearchSpace, family: str, horizon: int, seed: int) -> Attacker:
    """The attacker an Optuna ``trial`` proposes in ``space`` (full-batch families search
    the learning rate only, ``gd-exact`` nothing)."""
    if family in DETERMINISTIC_FAMILIES:
        return Attacker(family, space.optimizers[0], 1.0, max(space.batch_sizes), horizon, seed)
    lr = trial.suggest_float("lr", space.lr_low, space.lr_high, log=True)
    if family in FULL_BATCH_FAMILIES:
        return Attacker(family, space.optimizers[0], lr, max(space.batch_sizes), horizon, seed)
    optimizer = trial.suggest_categorical("optimizer", list(space.optimizers))
    batch_size = trial.suggest_categorical("batch_size", list(space.batch_sizes))
    return Attacker(family, optimizer, lr, int(batch_size), horizon, seed)


def finished_trials(storage, study_name: str) -> list[TrialRecord]:
    """The finished trials of a study, in order (an absent study has none)."""
    import optuna

    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        return []
    records = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        attacker = Attacker(**t.user_attrs["attacker"])
        result = AttackResult(**t.user_attrs["result"])
        records.append(TrialRecord(t.user_attrs["index"], attacker, result, t.value))
    records.sort(key=lambda rec: rec.index)
    seen, unique = set(), []
    for rec in records:  # two machines may finish the same index: keep the first
        if rec.index not in seen:
            seen.add(rec.index)
            unique.append(rec)
    return unique


def worst_case_search(
    storage,
    study_name: str,
    attack: Callable[[Attacker], AttackResult],
    space: SearchSpace,
    family: str,
    horizon: int,
    trials: int,
    higher_is_better: bool,
    on_trial: Callable[[TrialRecord], None] | None = None,
) -> list[TrialRecord]:
    """Run the study ``study_name`` until it holds ``trials`` finished trials.

    Args:
        storage: an Optuna storage or its URL (``sqlite:///…``, ``postgresql://…``).
        attack: runs one attacker (:func:`~lightning_immunize.attacks.attacker.run_attack`
            bound to a model and its data).
        on_trial: called after each new finished trial (progress bars).

    Returns:
        The first ``trials`` finished trials, in index order.
    """
    import optuna

    if isinstance(storage, str):
        storage = optuna.storages.RDBStorage(storage)
    direction = "maximize" if higher_is_better else "minimize"
    while True:
        done = finished_trials(storage, study_name)
        if len(done) >= trials:
            return done[:trials]
        index = len(done)
        # No constant liar: a trial left RUNNING by a killed process must not change what
        # later trials draw, or a resumed study would differ from an uninterrupted one.
        sampler = optuna.samplers.TPESampler(
            seed=space.seed + index, n_startup_trials=space.startup_trials, constant_liar=False
        )
        study = optuna.create_study(
            study_name=study_name,
            storage=storage,
            sampler=sampler,
            direction=direction,
            load_if_exists=True,
        )
        trial = study.ask()
        attacker = suggest_attacker(trial, space, family, horizon, trial_seed(space.seed, index))
        result = attack(attacker)
        value = search_objective(result, higher_is_better)
        trial.set_user_attr("index", index)
        trial.set_user_attr("attacker", asdict(attacker))
        trial.set_user_attr("result", asdict(result))
        study.tell(trial, value)
        if on_trial is not None:
            on_trial(TrialRecord(index, attacker, result, value))
