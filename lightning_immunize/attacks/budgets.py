"""The attacker search space and the named budgets of a durability card
(``configs/attack.yaml``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_immunize.attacks.attacker import step_marks
from lightning_immunize.attacks.families import (
    BATCHNORM_CHOICES,
    OPTIMIZERS,
    SCHEDULES,
    check_family,
    family_name,
)
from lightning_immunize.validation import unknown_choice

DEFAULT_BUDGETS = Path(__file__).resolve().parents[2] / "configs" / "attack.yaml"
CONDITIONS = ("resistance", "generalization", "trainability")


@dataclass(frozen=True)
class SearchSpace:
    """What the worst-case search may choose.

    Attributes:
        optimizers: SGD with momentum 0.9 and/or AdamW.
        lr_ranges: ``(optimizer, low, high)`` log-uniform learning-rate range per optimizer.
        lr_low, lr_high: the full-batch families' (``gd``, ``adam``) log-uniform range.
        weight_decay: log-uniform ``(low, high)``.
        schedules: ``constant`` and/or ``warmup-cosine``.
        batch_sizes: the mini-batch families' choices.
        batchnorm: ``keep`` and/or ``recalibrate`` (models with BatchNorm only).
        seed: seeds the designs, the samplers and the attackers.
        startup_trials: the Sobol design's size before TPE refines.
        reduction_factor: successive halving keeps the best ``1/η`` at each step mark
            (``0``: no pruning).
    """

    optimizers: tuple[str, ...] = OPTIMIZERS
    lr_low: float = 1e-5
    lr_high: float = 1.0
    batch_sizes: tuple[int, ...] = (32, 64, 128)
    seed: int = 0
    startup_trials: int = 8
    lr_ranges: tuple[tuple[str, float, float], ...] = (("sgd", 1e-4, 1.0), ("adamw", 1e-5, 1e-2))
    weight_decay: tuple[float, float] = (1e-6, 1e-1)
    schedules: tuple[str, ...] = SCHEDULES
    batchnorm: tuple[str, ...] = BATCHNORM_CHOICES
    reduction_factor: int = 3

    def __post_init__(self) -> None:
        unknown = [o for o in self.optimizers if o not in OPTIMIZERS]
        if unknown or not self.optimizers:
            raise ValueError(
                f"search_space.optimizers must be a non-empty subset of {list(OPTIMIZERS)}, "
                f"got {list(self.optimizers)}."
            )
        for name, low, high in (("full-batch lr", self.lr_low, self.lr_high),
                                *((f"lr of {o}", lo, hi) for o, lo, hi in self.lr_ranges),
                                ("weight_decay", *self.weight_decay)):  # fmt: skip
            if not 0 < low <= high:
                raise ValueError(
                    f"search_space.{name} must be a range [low, high] with 0 < low <= high, "
                    f"got [{low}, {high}]."
                )
        missing = [
            o for o in self.optimizers if o not in dict((o, 0) for o, _, _ in self.lr_ranges)
        ]
        if missing:
            raise ValueError(
                f"search_space.lr has no range for optimizer(s) {missing}; expected a "
                f"[low, high] for every optimizer of {list(self.optimizers)}."
            )
        if not self.batch_sizes or any(int(b) < 1 for b in self.batch_sizes):
            raise ValueError(
                f"search_space.batch_sizes must be a non-empty list of positive integers, got "
                f"{list(self.batch_sizes)}."
            )
        choices = (("schedules", self.schedules, SCHEDULES),
                   ("batchnorm", self.batchnorm, BATCHNORM_CHOICES))  # fmt: skip
        for name, values, allowed in choices:
            if not values or any(v not in allowed for v in values):
                raise ValueError(
                    f"search_space.{name} must be a non-empty subset of {list(allowed)}, got "
                    f"{list(values)}."
                )
        if self.startup_trials < 0:
            raise ValueError(
                f"search_space.startup_trials must be >= 0, got {self.startup_trials}."
            )
        if self.reduction_factor < 0 or self.reduction_factor == 1:
            raise ValueError(
                f"search_space.reduction_factor must be 0 (no pruning) or >= 2, got "
                f"{self.reduction_factor}."
            )

    def lr_range(self, optimizer: str) -> tuple[float, float]:
        """The ``(low, high)`` learning-rate range of ``optimizer``."""
        for name, low, high in self.lr_ranges:
            if name == optimizer:
                return low, high
        raise ValueError(
            f"search_space.lr has no range for optimizer {optimizer!r}; expected one of "
            f"{[name for name, _, _ in self.lr_ranges]}."
        )


@dataclass(frozen=True)
class ConditionPlan:
    """Families and harmful-data budget (``None``: all samples) of one card condition."""

    families: tuple[str, ...]
    data_budget: int | None


@dataclass(frozen=True)
class Budget:
    """A named budget: trials per (model, family), horizon, data budgets, families;
    ``reseeds`` re-runs of each study's best configuration give its worst case."""

    name: str
    trials: int
    horizon: int
    data_budgets: tuple[int | None, ...]
    families: dict[str, tuple[str, ...]]
    eval_samples: int | None = None
    generalization: ConditionPlan | None = None
    trainability: ConditionPlan | None = None
    space: SearchSpace = field(default_factory=SearchSpace)
    reseeds: int = 3

    @property
    def unseen_samples(self) -> int | None:
        """Harmful samples the generalization attacker needs to train on (its data budget,
        and at least the largest batch); ``None`` without a generalization condition."""
        if self.generalization is None:
            return None
        return max(self.generalization.data_budget or 0, max(self.space.batch_sizes))

    def __post_init__(self) -> None:
        if self.trials < 1:
            raise ValueError(f"budget {self.name!r}: trials must be >= 1, got {self.trials}.")
        if self.reseeds < 1:
            raise ValueError(f"budget {self.name!r}: reseeds must be >= 1, got {self.reseeds}.")
        try:
            step_marks(self.horizon)
        except ValueError as err:
            raise ValueError(f"budget {self.name!r}: {err}") from None
        for kind, families in self.families.items():
            for family in families:
                check_family(family)
            if not families:
                raise ValueError(
                    f"budget {self.name!r} lists no families for {kind} models; expected at "
                    "least one."
                )


def _data_budget(value: Any, where: str) -> int | None:
    if value in (None, "all"):
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where}: a data budget is a positive integer or 'all', got {value!r}.")
    return value


def _condition(spec: Any, where: str) -> ConditionPlan | None:
    if spec is None:
        return None
    for family in spec.get("families", []):
        check_family(family_name(family))
    families = tuple(map(family_name, spec.get("families", [])))
    return ConditionPlan(families, _data_budget(spec.get("data_budget"), where))


TOP_KEYS = ("search_space", "budgets")
SPACE_KEYS = ("optimizers", "lr", "full_batch_lr", "weight_decay", "schedules", "batchnorm",
              "batch_sizes", "seed", "startup_trials", "reduction_factor")  # fmt: skip
BUDGET_KEYS = ("trials", "horizon", "data_budgets", "eval_samples", "families",
               "generalization", "trainability", "reseeds")  # fmt: skip


def _check_keys(raw: Any, allowed: tuple[str, ...], where: str) -> None:
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must be a mapping, got {raw!r}.")
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise unknown_choice("key", unknown, allowed, where=where)


def _pair(value: Any, where: str) -> tuple[float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ValueError(f"{where} must be a pair [low, high], got {value!r}.")
    return float(value[0]), float(value[1])


def _search_space(raw: dict[str, Any], where: str) -> SearchSpace:
    """A :class:`SearchSpace` from ``search_space:``; ``lr`` is ``{optimizer: [low, high]}``,
    or one ``[low, high]`` for every optimizer (and the full-batch families)."""
    where = f"{where}: search_space"
    _check_keys(raw, SPACE_KEYS, where)
    defaults = SearchSpace()
    lr = raw.get("lr")
    if lr is None:
        ranges = defaults.lr_ranges
    elif isinstance(lr, dict):
        ranges = tuple((o, *_pair(v, f"{where}.lr.{o}")) for o, v in lr.items())
    else:
        low, high = _pair(lr, f"{where}.lr")
        ranges = tuple((o, low, high) for o in OPTIMIZERS)
    if "full_batch_lr" in raw:
        full = _pair(raw["full_batch_lr"], f"{where}.full_batch_lr")
    elif lr is not None and not isinstance(lr, dict):
        full = _pair(lr, f"{where}.lr")
    else:
        full = (defaults.lr_low, defaults.lr_high)
    return SearchSpace(
        optimizers=tuple(raw.get("optimizers", OPTIMIZERS)),
        lr_low=full[0],
        lr_high=full[1],
        batch_sizes=tuple(int(b) for b in raw.get("batch_sizes", defaults.batch_sizes)),
        seed=int(raw.get("seed", 0)),
        startup_trials=int(raw.get("startup_trials", defaults.startup_trials)),
        lr_ranges=ranges,
        weight_decay=_pair(raw.get("weight_decay", defaults.weight_decay), f"{where}.weight_decay"),
        schedules=tuple(raw.get("schedules", SCHEDULES)),
        batchnorm=tuple(raw.get("batchnorm", BATCHNORM_CHOICES)),
        reduction_factor=int(raw.get("reduction_factor", defaults.reduction_factor)),
    )


def load_budgets(path: str | Path = DEFAULT_BUDGETS) -> dict[str, Budget]:
    """Every budget of a budgets file, validated."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"attack budgets file {path} does not exist; expected a YAML file of budgets."
        )
    spec = yaml.safe_load(path.read_text()) or {}
    _check_keys(spec, TOP_KEYS, str(path))
    space = _search_space(spec.get("search_space") or {}, str(path))
    budgets = {}
    for name, raw in (spec.get("budgets") or {}).items():
        where = f"{path}: budget {name!r}"
        _check_keys(raw, BUDGET_KEYS, where)
        families = raw.get("families", {})
        if not isinstance(families, dict):
            families = {"deep": families, "linear": families}
        budgets[name] = Budget(
            name=name,
            trials=int(raw["trials"]),
            horizon=raw["horizon"],
            data_budgets=tuple(_data_budget(b, where) for b in raw.get("data_budgets", ["all"])),
            families={k: tuple(map(family_name, v)) for k, v in families.items()},
            eval_samples=raw.get("eval_samples"),
            generalization=_condition(raw.get("generalization"), where),
            trainability=_condition(raw.get("trainability"), where),
            space=space,
            reseeds=int(raw.get("reseeds", 3)),
        )
    return budgets


def load_budget(name: str, path: str | Path = DEFAULT_BUDGETS) -> Budget:
    """The budget ``name`` of a budgets file; ``ValueError`` naming the known ones otherwise."""
    budgets = load_budgets(path)
    if name not in budgets:
        raise unknown_choice("attack budget", name, sorted(budgets), where=str(path))
    return budgets[name]
