"""Worst-case attacker search: an Optuna study per (model, family, data), stored in an RDB
(SQLite by default) so an interrupted sweep resumes without repeating a finished trial.

- The first ``space.startup_trials`` trials are a scrambled Sobol design over the family's
  hyperparameters, seeded by the study's *group* (condition, data budget, family): the models
  of one group get the same configurations (a paired comparison), other groups other ones.
- TPE (multivariate) refines after it; trial ``k``'s sampler is seeded by the group and ``k``
  and sees only finished trials.
- :class:`FinishedTrialsHalving` prunes on the step marks (successive halving over the trials
  finished before, so a resumed study decides what an uninterrupted one would have).
- :func:`confirm_worst_case` re-runs the best configuration (chosen on the selection split)
  with fresh attacker seeds and data subsets, scored on the separate scoring split.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from lightning_immunize.attacks.attacker import Attacker, AttackResult, mean_score
from lightning_immunize.attacks.budgets import SearchSpace
from lightning_immunize.attacks.families import get_family
from lightning_immunize.validation import unwritable_folder


def trial_seed(space_seed: int, index: int) -> int:
    """The attacker seed of trial ``index`` (the same for every model compared)."""
    return 1_000 * space_seed + index


def confirm_seed(space_seed: int, rerun: int) -> int:
    """The attacker seed (and data-subset seed) of the worst case's re-run ``rerun``: fresh,
    never a search trial's."""
    return 1_000_000 + 1_000 * space_seed + rerun


def group_seed(space_seed: int, group: str) -> int:
    """A seed for the studies of one group (condition, data budget, family) — the same for
    every model of the group, different between groups."""
    digest = hashlib.sha256(f"{space_seed}|{group}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


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
        open_storage(url)
    except Exception as err:  # noqa: BLE001 - SQLAlchemy and drivers raise many types
        first = next((ln for ln in str(err).splitlines() if ln.strip()), type(err).__name__)
        raise ValueError(
            f"--storage {url}: cannot be opened ({first.strip()}); expected an Optuna storage "
            "URL such as sqlite:///studies.db."
        ) from err


#: Seconds an SQLite writer waits for another process's lock before failing.
SQLITE_TIMEOUT = 120


def open_storage(url: str):
    """An Optuna ``RDBStorage`` at ``url``. For SQLite, the schema is created under a file
    lock (two workers starting at once on a new file would both create it: ``IntegrityError``
    on ``alembic_version``) and writers wait for each other's locks."""
    import optuna

    if not url.startswith(SQLITE_PREFIX):
        return optuna.storages.RDBStorage(url)
    path = Path(url[len(SQLITE_PREFIX) :])
    kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT}}
    with _file_lock(path.with_name(path.name + ".lock")):
        return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)


@contextlib.contextmanager
def _file_lock(path: Path):
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@dataclass(frozen=True)
class TrialRecord:
    """A finished trial: its index within the study, attacker, scores and objective (NaN
    for a pruned trial)."""

    index: int
    attacker: Attacker
    result: AttackResult
    objective: float

    @property
    def pruned(self) -> bool:
        return self.result.pruned_at is not None


def search_objective(result: AttackResult, higher_is_better: bool) -> float:
    """The value the attacker optimises: :func:`running_mean` over all the trial's marks."""
    return running_mean(result.scores, higher_is_better)


class _DesignTrial:
    """Stands in for an Optuna trial: each ``suggest_*`` call takes the next coordinate of
    a unit-cube point (categorical: equal bins; float: uniform, or log-uniform)."""

    def __init__(self, point) -> None:
        self.point, self.used, self.params = list(point), 0, {}

    def _next(self) -> float:
        u = self.point[self.used] if self.used < len(self.point) else 0.5
        self.used += 1
        return float(u)

    def suggest_categorical(self, name: str, choices):
        value = choices[min(int(self._next() * len(choices)), len(choices) - 1)]
        self.params[name] = value
        return value

    def suggest_float(self, name: str, low: float, high: float, log: bool = False) -> float:
        u = self._next()
        if log:
            value = math.exp(math.log(low) + u * (math.log(high) - math.log(low)))
        else:
            value = low + u * (high - low)
        self.params[name] = min(max(value, low), high)
        return self.params[name]


def startup_design(
    family: str, space: SearchSpace, batchnorm: bool, seed: int, n: int
) -> list[dict[str, Any]]:
    """The first ``n`` configurations of a study: Optuna parameters from a scrambled Sobol
    sequence seeded by ``seed`` (a deterministic family: its grid of BatchNorm choices).

    Example:
        >>> space = SearchSpace()
        >>> a = startup_design("probe", space, True, seed=7, n=4)
        >>> a == startup_design("probe", space, True, seed=7, n=4), a == startup_design(
        ...     "probe", space, True, seed=8, n=4)
        (True, False)
        >>> sorted(a[0])
        ['batch_size', 'batchnorm', 'lr_adamw', 'optimizer', 'schedule', 'weight_decay']
    """
    chosen = get_family(family)
    if chosen.deterministic:
        return [{"batchnorm": b} for b in space.batchnorm] if batchnorm else [{}]
    counter = _DesignTrial([])
    chosen.suggest(counter, space, batchnorm)
    if n <= 0:
        return []
    from scipy.stats import qmc

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a sample size that is not a power of 2
        points = qmc.Sobol(max(counter.used, 1), scramble=True, seed=seed).random(n)
    designs = []
    for point in points:
        trial = _DesignTrial(point)
        chosen.suggest(trial, space, batchnorm)
        designs.append(trial.params)
    return designs


def study_trials(family: str, space: SearchSpace, batchnorm: bool, trials: int) -> int:
    """Trials of a study: the budget's, or a deterministic family's grid (BatchNorm kept,
    recalibrated)."""
    if get_family(family).deterministic:
        return len(startup_design(family, space, batchnorm, 0, 0))
    return trials


def suggest_attacker(trial, space: SearchSpace, family: str, horizon: int, seed: int,
                     batchnorm: bool = False) -> Attacker:  # fmt: skip
    """The attacker an Optuna ``trial`` proposes in ``space`` (what is searched is the
    family's :meth:`~lightning_immunize.attacks.families.AttackerFamily.suggest`)."""
    params = get_family(family).suggest(trial, space, batchnorm)
    params.setdefault("batch_size", max(space.batch_sizes))
    return Attacker(family=family, horizon=horizon, seed=seed, **params)


def _record(t) -> TrialRecord:
    attacker = Attacker(**t.user_attrs["attacker"])
    result = AttackResult(**t.user_attrs["result"])
    value = t.value if t.value is not None else math.nan
    return TrialRecord(t.user_attrs["index"], attacker, result, value)


def finished_trials(storage, study_name: str) -> list[TrialRecord]:
    """The finished (complete or pruned) trials of a study, in order (an absent study has
    none)."""
    import optuna

    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        return []
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    records = [_record(t) for t in study.get_trials(deepcopy=False, states=states)
               if "result" in t.user_attrs]  # fmt: skip
    records.sort(key=lambda rec: rec.index)
    seen, unique = set(), []
    for rec in records:  # two workers may finish the same index: keep the first
        if rec.index not in seen:
            seen.add(rec.index)
            unique.append(rec)
    return unique


class FinishedTrialsHalving:
    """Successive halving on the step marks, decided against the trials *finished before*
    this one (complete or pruned, lower index): at each mark from ``min_mark`` on (the last
    excepted), a trial goes on while its running mean score is within the best
    ``1/reduction_factor`` of those trials' running means there, and at least
    ``reduction_factor`` of them reached that mark. Optuna's own halving pruners also count
    trials still running, which a killed worker leaves behind; a resumed study would then
    prune differently."""

    def __init__(self, reduction_factor: int, min_mark: int = 2) -> None:
        self.reduction_factor = reduction_factor
        self.min_mark = min_mark

    def keep(self, own: float, others: list[float], higher_is_better: bool) -> bool:
        """Whether a running mean ``own`` is within the best share of ``others`` + itself.

        Example:
            >>> FinishedTrialsHalving(3).keep(0.5, [0.9, 0.8, 0.1], True)
            False
            >>> FinishedTrialsHalving(3).keep(0.95, [0.9, 0.8, 0.1], True)
            True
        """
        if self.reduction_factor < 2 or len(others) < self.reduction_factor:
            return True
        values = sorted([*others, own], reverse=higher_is_better)
        kept = max(1, len(values) // self.reduction_factor)
        threshold = values[kept - 1]
        return own >= threshold if higher_is_better else own <= threshold

    def should_stop(self, mark: int, own: float, previous: list[TrialRecord],
                    higher_is_better: bool) -> bool:  # fmt: skip
        if mark < self.min_mark:
            return False
        if not math.isfinite(own):
            return True
        others = [running_mean(r.result.scores[: mark + 1], higher_is_better)
                  for r in previous if len(r.result.scores) > mark]  # fmt: skip
        return not self.keep(own, others, higher_is_better)


def running_mean(scores: list[float], higher_is_better: bool) -> float:
    """The mean score over the marks reached so far (the search objective so far):
    :func:`mean_score`, 1e30 when every mark of an MSE trial diverged (Optuna needs a finite
    value)."""
    return mean_score(scores, higher_is_better, all_diverged=1e30)


def worst_case_search(
    storage,
    study_name: str,
    attack: Callable[..., AttackResult],
    space: SearchSpace,
    family: str,
    horizon: int,
    trials: int,
    higher_is_better: bool,
    on_trial: Callable[[TrialRecord], None] | None = None,
    group: str = "",
    batchnorm: bool = False,
) -> list[TrialRecord]:
    """Run the study ``study_name`` until it holds ``trials`` finished trials.

    Args:
        storage: an Optuna storage or its URL (``sqlite:///…``, ``postgresql://…``).
        attack: runs one attacker, ``attack(attacker, report)``
            (:func:`~lightning_immunize.attacks.training.run_attack` bound to a model and its
            data; ``report`` is the pruner's hook).
        on_trial: called after each new finished trial (progress bars).
        group: the study's group (condition, data budget, family): it seeds the start-up
            design and the sampler, so every model of a group gets the same design.
        batchnorm: the models have BatchNorm (keep/recalibrate is searched).

    Returns:
        The first ``trials`` finished trials, in index order.
    """
    import optuna

    if isinstance(storage, str):
        storage = open_storage(storage)
    direction = "maximize" if higher_is_better else "minimize"
    seed = group_seed(space.seed, group)
    design = startup_design(family, space, batchnorm, seed, min(space.startup_trials, trials))
    if get_family(family).deterministic:
        trials = len(design)
    pruner = FinishedTrialsHalving(space.reduction_factor)
    while True:
        done = finished_trials(storage, study_name)
        if len(done) >= trials:
            return done[:trials]
        index = len(done)
        # No constant liar: a trial left RUNNING by a killed process must not change what
        # later trials draw, or a resumed study would differ from an uninterrupted one.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            sampler: Any = optuna.samplers.TPESampler(
                seed=(seed + index) % 2**32, n_startup_trials=len(design),
                multivariate=True, group=True, constant_liar=False,
            )  # fmt: skip
            if index < len(design):
                sampler = optuna.samplers.PartialFixedSampler(design[index], sampler)
        study = optuna.create_study(study_name=study_name, storage=storage, sampler=sampler,
                                    direction=direction, load_if_exists=True)  # fmt: skip
        trial = study.ask()
        trial.set_user_attr("index", index)
        attacker = suggest_attacker(
            trial, space, family, horizon, trial_seed(space.seed, index), batchnorm
        )
        scores: list[float] = []

        def report(mark: int, score: float, trial=trial, scores=scores, done=done) -> bool:
            scores.append(score)
            own = running_mean(scores, higher_is_better)
            if math.isfinite(own):
                trial.report(own, mark)
            return pruner.should_stop(mark, own, done, higher_is_better)

        result = attack(attacker, report)
        trial.set_user_attr("attacker", asdict(attacker))
        trial.set_user_attr("result", asdict(result))
        if result.pruned_at is not None:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            value = math.nan
        else:
            value = search_objective(result, higher_is_better)
            study.tell(trial, value)
        if on_trial is not None:
            on_trial(TrialRecord(index, attacker, result, value))


def best_trial(records: list[TrialRecord], higher_is_better: bool) -> TrialRecord:
    """The complete trial with the best objective (ties: the lowest index)."""
    complete = [r for r in records if not r.pruned and math.isfinite(r.objective)]
    if not complete:
        complete = list(records)
    sign = -1.0 if higher_is_better else 1.0
    return min(complete, key=lambda r: (sign * _finite(r.objective, higher_is_better), r.index))


def _finite(value: float, higher_is_better: bool) -> float:
    if math.isfinite(value):
        return value
    return -math.inf if higher_is_better else math.inf


def confirm_worst_case(
    storage,
    study_name: str,
    attack: Callable[[Attacker, int], AttackResult],
    best: TrialRecord,
    space_seed: int,
    reseeds: int,
    on_run: Callable[[TrialRecord], None] | None = None,
) -> list[TrialRecord]:
    """Re-run the ``best`` configuration ``reseeds`` times with fresh attacker seeds
    (:func:`confirm_seed`; ``attack(attacker, rerun)`` also redraws the attacker's data
    subset from it), stored as the study ``<study_name>/confirm``; resumable.

    Returns:
        The re-runs in order, their ``result.per_sample`` on the scoring split.
    """
    import optuna

    if isinstance(storage, str):
        storage = open_storage(storage)
    name = f"{study_name}/confirm"
    while True:
        done = finished_trials(storage, name)
        if len(done) >= reseeds:
            return done[:reseeds]
        rerun = len(done)
        attacker = replace(best.attacker, seed=confirm_seed(space_seed, rerun))
        study = optuna.create_study(study_name=name, storage=storage, load_if_exists=True,
                                    direction="maximize")  # fmt: skip
        trial = study.ask()
        trial.set_user_attr("index", rerun)
        trial.set_user_attr("source_trial", best.index)
        result = attack(attacker, rerun)
        trial.set_user_attr("attacker", asdict(attacker))
        trial.set_user_attr("result", asdict(result))
        study.tell(trial, 0.0)
        if on_run is not None:
            on_run(TrialRecord(rerun, attacker, result, math.nan))
