"""Deprecated: the ``reproduce``, ``evaluate`` and ``attack`` logic lives in
:mod:`lightning_immunize.commands` (one file a command); this module hands the old names on,
with a warning, and goes away in the next release."""

from __future__ import annotations

import importlib
import warnings
from typing import Any

_MOVED = {
    "evaluate_checkpoint": "commands.evaluate",
    "attack_checkpoint": "commands.attack",
    **dict.fromkeys(("probe_table", "summary_table", "deep_summary_table"), "evaluation.tables"),
    **dict.fromkeys(
        (
            "PROTOCOLS",
            "DEEP_PROTOCOLS",
            "RUN_COLUMNS",
            "DEFAULT_SPEC",
            "Run",
            "load_protocols",
            "plan_runs",
            "read_runs",
            "run_sweep",
            "sweep_command",
            "project_root",
            "write_summary",
        ),
        "commands.reproduce",
    ),
}

__all__ = sorted(_MOVED)


def __getattr__(name: str) -> Any:
    command = _MOVED.get(name)
    if command is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(
        f"lightning_immunize.experiments.{name} is deprecated: import it from "
        f"lightning_immunize.{command}; the old path goes away in the next release.",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(importlib.import_module(f"lightning_immunize.{command}"), name)
