"""Measurement as plain functions (no Lightning hooks): the immunization report, probing
studies, markdown tables and figures. Callbacks and the CLI are thin adapters over these.

Imported lazily, so ``import lightning_immunize.evaluation`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "REPORT_NAME": "report",
    "format_report": "report",
    "immunization_report": "report",
    "task_metric": "report",
    "MODELS": "study",
    "PROBE_OPTIMIZERS": "study",
    "ProbingStudy": "study",
    "probe_accuracy_curves": "study",
    "probe_targets": "study",
    "probing_study": "study",
    "read_probes": "study",
    "METHODS": "tables",
    "deep_summary_table": "tables",
    "evaluation_markdown": "tables",
    "method_order": "tables",
    "probe_table": "tables",
    "summary_table": "tables",
    "plot_attackers": "plots",
    "plot_heatmap": "plots",
    "plot_method_curves": "plots",
    "plot_norm_ratio": "plots",
    "plot_probe_accuracy": "plots",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lightning_immunize.evaluation' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return sorted(__all__)
