"""The attacker search space and the named budgets of a durability card
(``configs/attack.yaml``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_immunize.attacks.attacker import OPTIMIZERS, step_marks
from lightning_immunize.attacks.families import check_family

DEFAULT_BUDGETS = Path(__file__).resolve().parents[2] / "configs" / "attack.yaml"
CONDITIONS = ("resistance", "generalization", "trainability")


@dataclass(frozen=True)
class SearchSpace:
    """What the worst-case search may choose: optimizer, log-uniform learning rate in
    ``[lr_low, lr_high]``, batch size; ``seed`` seeds the sampler and the attackers."""

    optimizers: tuple[str, ...] = OPTIMIZERS
    lr_low: float = 1e-5
    lr_high: float = 1.0
    batch_sizes: tuple[int, ...] = (32, 64, 128)
    seed: int = 0
    startup_trials: int = 2

    def __post_init__(self) -> None:
        unknown = [o for o in self.optimizers if o not in OPTIMIZERS]
        if unknown or not self.optimizers:
            raise ValueError(
                f"search_space.optimizers {list(self.optimizers)}: expected a "
                f"non-empty subset of {list(OPTIMIZERS)}"
            )
        if not 0 < self.lr_low <= self.lr_high:
            raise ValueError(
                f"search_space.lr [{self.lr_low}, {self.lr_high}]: expected 0 < low <= high"
            )
        if not self.batch_sizes or any(int(b) < 1 for b in self.batch_sizes):
            raise ValueError(
                f"search_space.batch_sizes {list(self.batch_sizes)}: expected positive integers"
            )
        if self.startup_trials < 0:
            raise ValueError(f"search_space.startup_trials must be >= 0, got {self.startup_trials}")


@dataclass(frozen=True)
class ConditionPlan:
    """Families and harmful-data budget (``None``: all samples) of one card condition."""

    families: tuple[str, ...]
    data_budget: int | None


@dataclass(frozen=True)
class Budget:
    """A named budget: trials per (model, family), horizon, data budgets, families."""

    name: str
    trials: int
    horizon: int
    data_budgets: tuple[int | None, ...]
    families: dict[str, tuple[str, ...]]
    eval_samples: int | None = None
    generalization: ConditionPlan | None = None
    trainability: ConditionPlan | None = None
    space: SearchSpace = field(default_factory=SearchSpace)

    def __post_init__(self) -> None:
        if self.trials < 1:
            raise ValueError(f"budget {self.name!r}: trials must be >= 1, got {self.trials}")
        try:
            step_marks(self.horizon)
        except ValueError as err:
            raise ValueError(f"budget {self.name!r}: {err}") from None
        for kind, families in self.families.items():
            for family in families:
                check_family(family)
            if not families:
                raise ValueError(f"budget {self.name!r}: no families for {kind} models")


def _data_budget(value: Any, where: str) -> int | None:
    if value in (None, "all"):
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where}: a data budget is a positive integer or 'all', got {value!r}")
    return value


def _condition(spec: Any, where: str) -> ConditionPlan | None:
    if spec is None:
        return None
    for family in spec.get("families", []):
        check_family(family)
    return ConditionPlan(
        tuple(spec.get("families", [])), _data_budget(spec.get("data_budget"), where)
    )


def load_budgets(path: str | Path = DEFAULT_BUDGETS) -> dict[str, Budget]:
    """Every budget of a budgets file, validated."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"attack budgets file {path} does not exist")
    spec = yaml.safe_load(path.read_text()) or {}
    raw_space = spec.get("search_space", {})
    lr = raw_space.get("lr", [1e-5, 1.0])
    space = SearchSpace(
        optimizers=tuple(raw_space.get("optimizers", OPTIMIZERS)),
        lr_low=float(lr[0]),
        lr_high=float(lr[1]),
        batch_sizes=tuple(int(b) for b in raw_space.get("batch_sizes", (32, 64, 128))),
        seed=int(raw_space.get("seed", 0)),
        startup_trials=int(raw_space.get("startup_trials", 2)),
    )
    budgets = {}
    for name, raw in (spec.get("budgets") or {}).items():
        where = f"{path}: budget {name!r}"
        families = raw.get("families", {})
        if not isinstance(families, dict):
            families = {"deep": families, "linear": families}
        budgets[name] = Budget(
            name=name,
            trials=int(raw["trials"]),
            horizon=raw["horizon"],
            data_budgets=tuple(_data_budget(b, where) for b in raw.get("data_budgets", ["all"])),
            families={k: tuple(v) for k, v in families.items()},
            eval_samples=raw.get("eval_samples"),
            generalization=_condition(raw.get("generalization"), where),
            trainability=_condition(raw.get("trainability"), where),
            space=space,
        )
    return budgets


def load_budget(name: str, path: str | Path = DEFAULT_BUDGETS) -> Budget:
    """The budget ``name`` of a budgets file; ``ValueError`` naming the known ones otherwise."""
    budgets = load_budgets(path)
    if name not in budgets:
        raise ValueError(f"unknown attack budget {name!r}; {path} defines {sorted(budgets)}")
    return budgets[name]
