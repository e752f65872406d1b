"""lightning_immunize: model immunization from a condition-number perspective.

The public API is re-exported here lazily (PEP 562), so ``import lightning_immunize`` and the
CLI's start-up stay fast: torch, Lightning and timm load only when a name that needs them is
first used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    # the Lightning pieces
    "ImmunizationModule": "module",
    "Objective": "objectives",
    "ObjectiveOutput": "objectives",
    "ConditionNumberObjective": "objectives",
    "RMaxOnlyObjective": "objectives",
    "ConditionNumberOptObjective": "objectives",
    "IMMAObjective": "objectives",
    "ObjectiveHost": "objectives",
    "SimulatedAttackObjective": "objectives",
    "TamperResistanceObjective": "objectives",
    "AttackerAwareConditionNumberObjective": "objectives",
    "LayerwiseConditionNumberObjective": "objectives",
    "BlockErasureObjective": "objectives",
    "OBJECTIVES": "objectives",
    "METHODS": "objectives",
    "make_objective": "objectives",
    "register_objective": "objectives",
    "PairedDataModule": "datamodules",
    "DigitsPairDataModule": "datamodules",
    "MNISTPairDataModule": "datamodules",
    "MNISTHalvesDataModule": "datamodules",
    "HousePricesDataModule": "datamodules",
    "ImagePairDataModule": "datamodules",
    "ImmunizationReport": "callbacks",
    "RIRCallback": "callbacks",
    "ConditionNumberMonitor": "callbacks",
    "ProbingCallback": "callbacks",
    "PretrainFromScratch": "callbacks",
    "Theta0Setup": "callbacks",
    "DurabilityCard": "callbacks",
    "LastCheckpoint": "callbacks",
    # θ_0 as configuration
    "AsBuilt": "theta0",
    "FromScratch": "theta0",
    "FromCheckpoint": "theta0",
    # the durability card
    "AttackerFamily": "attacks.families",
    "register_family": "attacks.families",
    # metrics
    "RelativeImmunizationRatio": "metrics",
    "DeepRelativeImmunizationRatio": "metrics",
    "ConditionNumber": "metrics",
    "FeatureCovariance": "metrics",
    "linear_immunization_ratios": "metrics",
    # measurement
    "immunization_report": "evaluation",
    "probing_study": "evaluation",
    "ProbingStudy": "evaluation",
    # conditioning
    "condition_number": "conditioning",
    "data_rank": "conditioning",
    "r_min": "conditioning",
    "r_max": "conditioning",
    "feature_condition_number": "conditioning",
    "feature_r_min": "conditioning",
    "feature_r_max": "conditioning",
    "spectral_gradient": "conditioning",
    "feature_spectral_gradient": "conditioning",
    # preconditioning (the submodule itself is ``lightning_immunize.preconditioning``)
    "preconditioned_gradient": "preconditioning",
    "ridge_solve": "preconditioning",
    "input_covariance": "preconditioning",
    "PreconditionedLinear": "preconditioning",
    "preconditioned_linear": "preconditioning",
    "preconditioning_enabled": "preconditioning",
    "convert_linear_layers": "preconditioning",
    # models
    "LinearExtractor": "models",
    "LinearHead": "models",
    "ClassifierHead": "models",
    "TimmBackbone": "models",
    "linear_head": "models",
    "bce_head": "models",
    "cross_entropy_head": "models",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name == "preconditioning":  # always the submodule, whatever was imported first
        return importlib.import_module("lightning_immunize.preconditioning")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_immunize' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"lightning_immunize.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
