"""End-of-fit immunization report, written to ``immunization.json`` in the run's log folder.

A thin adapter over :func:`lightning_immunize.evaluation.immunization_report`. Contract with
the model: it has an ``extractor`` (inputs → features) and, for the task metric, a ``head``
with ``metric(output, target)`` and ``metric_name``; the datamodule has
``full_tensors(split)`` returning ``(X_P, y_P, X_H, y_H)``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from lightning_immunize.callbacks.reference import ReferenceKeeper
from lightning_immunize.evaluation.report import (
    NO_STEP_NOTE,
    REPORT_NAME,
    format_report,
    task_metric,
)

__all__ = ["ImmunizationReport"]


class ImmunizationReport(ReferenceKeeper):
    """Writes ``immunization.json`` into ``trainer.log_dir`` (or ``dirpath``) at the end of fit
    and logs the table (:func:`immunization_report`; deep models: ``num_groups`` ×
    ``group_size`` against θ_0 as it was at fit start).

    Args:
        dirpath: folder of ``immunization.json`` (default: ``trainer.log_dir``, else
            ``trainer.default_root_dir``).
        split: the data module's split the ratios are computed on (``"train"``, ``"val"``
            or ``"test"``).
        num_groups: deep (non-linear) extractors: number of sample groups of the RIR
            (Eq. 17); unused for a linear extractor.
        group_size: deep extractors: samples per group (fewer when a side is smaller).
    """

    def __init__(
        self,
        dirpath: str | None = None,
        split: str = "train",
        num_groups: int = 20,
        group_size: int = 100,
    ) -> None:
        self.dirpath = dirpath
        self.split = split
        self.num_groups, self.group_size = num_groups, group_size
        self._start: float | None = None
        self._elapsed = 0.0
        self._before: dict[str, Any] = {}
        self.reference = None
        self.report: dict[str, Any] | None = None

    @property
    def state_key(self) -> str:
        # Two reports in one trainer (another split, another folder) keep their own state.
        # The default report keeps the class name, the key of checkpoints written before.
        if (self.dirpath, self.split, self.num_groups, self.group_size) == (None, "train", 20, 100):
            return type(self).__qualname__
        return self._generate_state_key(
            dirpath=self.dirpath,
            split=self.split,
            num_groups=self.num_groups,
            group_size=self.group_size,
        )

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and not self._before:
            # Before a checkpoint is restored: a resumed run reports the metric of the model
            # it started from, not of the checkpoint.
            self._before = task_metric(pl_module, trainer.datamodule, self.split)
        self._start = time.perf_counter()

    def state_dict(self) -> dict[str, Any]:
        elapsed = self._elapsed + (
            time.perf_counter() - self._start if self._start is not None else 0.0
        )
        return {"before": dict(self._before), "seconds": elapsed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._before = dict(state_dict.get("before", {}))
        self._elapsed = float(state_dict.get("seconds", 0.0))
        self._start = time.perf_counter()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        report = self.compute_report(trainer, pl_module)
        if self._start is not None:
            # Training time, summed over the interrupted parts of a resumed run.
            report["seconds"] = self._elapsed + time.perf_counter() - self._start
        if "task_metric" in self._before:
            report["task_metric_before"] = self._before["task_metric"]
        report["steps"] = trainer.global_step
        if trainer.global_step == 0:
            report["note"] = NO_STEP_NOTE
        self.report = report
        # ``trainer.log_dir`` broadcasts under DDP: every rank must ask, only rank 0 writes.
        self._write(Path(self.dirpath or trainer.log_dir or trainer.default_root_dir), report)

    @staticmethod
    @rank_zero_only
    def _write(directory: Path, report: dict[str, Any]) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / REPORT_NAME
        path.write_text(json.dumps(report, indent=2, default=float) + "\n")
        rank_zero_info(f"Immunization report ({path}):\n{format_report(report)}")
