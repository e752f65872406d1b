"""One registry of immunization methods: the reference row and every objective.

``reproduce``, the tables and the figures take their method lists from here, so any
registered method can be fitted (``method:`` in a config) and swept.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lightning_immunize.objectives.attacker_aware import (
    AttackerAwareConditionNumberObjective,
    SimulatedAttackObjective,
    TamperResistanceObjective,
)
from lightning_immunize.objectives.base import Objective
from lightning_immunize.objectives.baselines import (
    ConditionNumberOptObjective,
    IMMAObjective,
    RMaxOnlyObjective,
)
from lightning_immunize.objectives.erasure import BlockErasureObjective
from lightning_immunize.objectives.layerwise import LayerwiseConditionNumberObjective
from lightning_immunize.objectives.ours import ConditionNumberObjective
from lightning_immunize.validation import unknown_choice

__all__ = [
    "LEGACY_METHODS",
    "METHODS",
    "OBJECTIVES",
    "REFERENCE",
    "check_methods",
    "make_objective",
    "register_objective",
    "unregister_objective",
]

#: The row of a sweep that is not immunized: the identity extractor in the linear protocols,
#: θ_0 in the deep one.
REFERENCE = "reference"
#: Old method names, still read (with a deprecation warning where a user typed them).
LEGACY_METHODS = {"identity": REFERENCE}

#: Objectives selectable by name (``method:`` in configs), in table order: the baselines of
#: Section 5, the attacker-aware methods, ours and its attacker-aware variant, then the
#: every-layer methods (ours on each layer's K-FAC factor; linear erasure at every block).
OBJECTIVES: dict[str, Callable[..., Objective]] = {
    "rmax_only": RMaxOnlyObjective,
    "imma": IMMAObjective,
    "opt": ConditionNumberOptObjective,
    "sophon": SimulatedAttackObjective,
    "tar": TamperResistanceObjective,
    "ours": ConditionNumberObjective,
    "ours_sa": AttackerAwareConditionNumberObjective,
    "ours_kfac": LayerwiseConditionNumberObjective,
    "erasure": BlockErasureObjective,
}

#: Every method of a sweep, in table order: the unimmunized reference first. Kept in step
#: with :data:`OBJECTIVES` by :func:`register_objective`.
METHODS: list[str] = [REFERENCE, *OBJECTIVES]


def register_objective(name: str, factory: Callable[..., Objective]) -> None:
    """Make ``factory`` (an :class:`Objective` class, or any callable returning one)
    selectable as ``method: name`` and sweepable by ``reproduce --methods name``.

    Raises:
        ValueError: ``name`` is taken.

    Example:
        >>> class Plain(Objective):
        ...     name = "plain"
        >>> register_objective("plain", Plain)
        >>> make_objective("plain").name
        'plain'
        >>> unregister_objective("plain")
    """
    if name in METHODS:
        raise ValueError(f"The method name {name!r} is taken; choose another name.")
    OBJECTIVES[name] = factory
    METHODS.append(name)


def unregister_objective(name: str) -> None:
    """Undo :func:`register_objective` (tests, notebooks)."""
    OBJECTIVES.pop(name, None)
    if name in METHODS and name != REFERENCE:
        METHODS.remove(name)


def make_objective(method: str, **kwargs: Any) -> Objective:
    """Build the objective registered under ``method`` (see :data:`OBJECTIVES`).

    Raises:
        ValueError: ``method`` is not registered.
    """
    if method not in OBJECTIVES:
        raise unknown_choice("method", method, OBJECTIVES)
    return OBJECTIVES[method](**kwargs)


def check_methods(methods: list[str]) -> None:
    """Raise a ``ValueError`` naming every entry of ``methods`` that is not registered."""
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise unknown_choice("method", bad, METHODS)
