"""Callbacks that measure immunization in any Lightning pipeline.

Their one contract: the LightningModule has an ``extractor`` attribute (inputs → features
``(B, K)``); the end-of-fit ones also need a datamodule with ``full_tensors(split)``.
Imported lazily so ``import lightning_immunize.callbacks`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ImmunizationReport": "report",
    "ReferenceKeeper": "report",
    "immunization_report": "report",
    "RIRCallback": "rir",
    "ConditionNumberMonitor": "monitor",
    "ProbingCallback": "probing",
    "probing_study": "probing",
    "plot_norm_ratio": "plots",
    "plot_attackers": "plots",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lightning_immunize.callbacks' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
