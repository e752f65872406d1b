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
    # preconditioning
    "preconditioned_gradient": "preconditioning",
    "ridge_solve": "preconditioning",
    "input_covariance": "preconditioning",
    "PreconditionedLinear": "preconditioning",
    "preconditioned_linear": "preconditioning",
    "preconditioning": "preconditioning",
    "convert_linear_layers": "preconditioning",
    # models
    "LinearExtractor": "models",
    "ClassifierHead": "models",
    "TimmBackbone": "models",
    "linear_head": "models",
    "bce_head": "models",
    "cross_entropy_head": "models",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_immunize' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"lightning_immunize.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
