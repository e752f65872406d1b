"""Callbacks that measure immunization in any Lightning pipeline — thin adapters over
:mod:`lightning_immunize.evaluation`.

Their one contract: the LightningModule has an ``extractor`` attribute (inputs → features
``(B, K)``); the end-of-fit ones also need a datamodule with ``full_tensors(split)``.
Imported lazily so ``import lightning_immunize.callbacks`` stays cheap.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

_EXPORTS = {
    "ImmunizationReport": "report",
    "ReferenceKeeper": "reference",
    "RIRCallback": "rir",
    "ConditionNumberMonitor": "monitor",
    "ProbingCallback": "probing",
    "PretrainFromScratch": "pretrain",
    "Theta0Setup": "theta0",
    "LastCheckpoint": "last_checkpoint",
    "DurabilityCard": "durability",
}
#: Functions this package exported before they moved to ``lightning_immunize.evaluation``;
#: still reachable here, with a DeprecationWarning, until the next release.
_MOVED = {
    "immunization_report": "lightning_immunize.evaluation.report",
    "probing_study": "lightning_immunize.evaluation.study",
    "plot_norm_ratio": "lightning_immunize.evaluation.plots",
    "plot_attackers": "lightning_immunize.evaluation.plots",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    if name in _MOVED:
        warnings.warn(
            f"lightning_immunize.callbacks.{name} moved to {_MOVED[name]}; the old name is "
            "deprecated and goes away in the next release.",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module 'lightning_immunize.callbacks' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
