"""Immunization objectives: ours (Eq. 11 by Algorithm 1), the baselines of Section 5 and the
attacker-aware methods, each one :class:`Objective`, all in one registry
(:data:`OBJECTIVES`, :func:`make_objective`).

* :mod:`~lightning_immunize.objectives.base`: :class:`Objective` and :class:`ObjectiveHost`,
  what an objective may ask of the module;
* :mod:`~lightning_immunize.objectives.ours`, :mod:`~lightning_immunize.objectives.baselines`,
  :mod:`~lightning_immunize.objectives.attacker_aware`,
  :mod:`~lightning_immunize.objectives.layerwise`, :mod:`~lightning_immunize.objectives.erasure`:
  the methods (the last two look inside the extractor through
  :mod:`~lightning_immunize.objectives.taps`);
* :mod:`~lightning_immunize.objectives.registry`: the method names.
"""

from lightning_immunize.objectives.attacker_aware import (
    AttackerAwareConditionNumberObjective,
    SimulatedAttack,
    SimulatedAttackObjective,
    TamperResistanceObjective,
)
from lightning_immunize.objectives.base import (
    Objective,
    ObjectiveHost,
    ObjectiveOutput,
)
from lightning_immunize.objectives.baselines import (
    ConditionNumberOptObjective,
    IMMAObjective,
    RMaxOnlyObjective,
)
from lightning_immunize.objectives.erasure import BlockErasureObjective
from lightning_immunize.objectives.layerwise import LayerwiseConditionNumberObjective
from lightning_immunize.objectives.ours import ConditionNumberObjective, input_rank
from lightning_immunize.objectives.registry import (
    METHODS,
    OBJECTIVES,
    REFERENCE,
    make_objective,
    register_objective,
    unregister_objective,
)

__all__ = [
    "Objective",
    "ObjectiveHost",
    "ObjectiveOutput",
    "ConditionNumberObjective",
    "RMaxOnlyObjective",
    "ConditionNumberOptObjective",
    "IMMAObjective",
    "SimulatedAttack",
    "SimulatedAttackObjective",
    "TamperResistanceObjective",
    "AttackerAwareConditionNumberObjective",
    "LayerwiseConditionNumberObjective",
    "BlockErasureObjective",
    "OBJECTIVES",
    "METHODS",
    "REFERENCE",
    "make_objective",
    "register_objective",
    "unregister_objective",
    "input_rank",
]
