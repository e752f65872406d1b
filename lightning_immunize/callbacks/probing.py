"""How fast a linear-probing attacker converges, before and after immunization, measured at
the end of fit in any Lightning pipeline: a thin adapter over
:func:`lightning_immunize.evaluation.probing_study` that logs steps-to-tolerance and writes a
CSV and PNG curves into the log directory.

Contract with the model: it has an ``extractor`` attribute (inputs → features ``(B, K)``);
the datamodule has ``full_tensors(split)`` returning ``(X_P, y_P, X_H, y_H)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_only

from lightning_immunize.callbacks.reference import ReferenceKeeper
from lightning_immunize.evaluation.study import ProbingStudy, probing_study
from lightning_immunize.models import evaluating
from lightning_immunize.probing import ATTACKERS
from lightning_immunize.validation import unknown_choice

__all__ = ["ProbingCallback"]


class ProbingCallback(ReferenceKeeper):
    """At the end of fit, run the probing attackers on ``D_H`` and ``D_P`` for the reference
    and the trained extractor; log steps-to-tolerance and write ``probing/curves.csv`` and
    ``probing/norm_ratio.png`` + ``probing/attackers.png`` into the log directory.

    Args:
        attackers: names from :data:`lightning_immunize.probing.ATTACKERS` (default: all).
        steps: the cap ``T`` of every attacker.
        tol: the norm-ratio tolerance of steps-to-tolerance.
        split: the datamodule split probed.
        dirpath: where to write (default ``<trainer.log_dir>/probing``).
    """

    def __init__(
        self,
        attackers: Sequence[str] | None = None,
        steps: int = 200,
        tol: float = 1e-3,
        split: str = "train",
        dirpath: str | None = None,
    ) -> None:
        unknown = [a for a in attackers or () if a not in ATTACKERS]
        if unknown:
            raise unknown_choice("probing attacker", unknown, sorted(ATTACKERS))
        self.attackers = list(attackers) if attackers else None
        self.steps, self.tol, self.split, self.dirpath = steps, tol, split, dirpath
        self.reference = None
        self.study: ProbingStudy | None = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        extractor = pl_module.extractor
        with evaluating(extractor):
            data = trainer.datamodule.full_tensors(self.split)
            task = getattr(trainer.datamodule, "task", None)
            self.study = probing_study(
                extractor, data, self.reference, self.attackers, self.steps, self.tol, task
            )
        metrics = {}
        for row in self.study.rows():
            prefix = f"probe/{row['side']}/{row['attacker']}"
            for key in ("steps_reference", "steps_immunized"):
                value = row[key]
                metrics[f"{prefix}/{key}"] = float(self.steps + 1 if value is None else value)
            metrics[f"{prefix}/progress_ratio"] = row["progress_ratio"]
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        # ``trainer.log_dir`` broadcasts under DDP: every rank must ask, only rank 0 writes.
        root = Path(trainer.log_dir or trainer.default_root_dir)
        self._write(Path(self.dirpath) if self.dirpath else root / "probing")

    @rank_zero_only
    def _write(self, directory: Path) -> None:
        from lightning_immunize.evaluation.plots import (  # matplotlib
            plot_attackers,
            plot_norm_ratio,
        )

        self.study.write_csv(directory / "curves.csv")
        plot_norm_ratio(self.study, directory / "norm_ratio.png")
        plot_attackers(self.study, directory / "attackers.png")
