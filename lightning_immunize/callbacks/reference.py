"""θ_0 kept at fit start: the reference of the deep RIR (Eq. 17), shared by the callbacks
that report against it."""

from __future__ import annotations

import copy
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_immunize.evaluation.report import immunization_report
from lightning_immunize.models import LinearExtractor

__all__ = ["ReferenceKeeper"]


class ReferenceKeeper(pl.Callback):
    """Keeps a copy of a non-linear extractor as it is when fit starts: θ_0, the reference of
    the deep RIR (a linear extractor's reference is the identity, nothing to keep), and
    computes :func:`immunization_report` against it."""

    reference: torch.nn.Module | None = None
    split: str = "train"
    num_groups: int = 20
    group_size: int = 100

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # In ``setup``: before a checkpoint is restored (a resumed run keeps the θ_0 its config
        # builds, not the half-trained weights) and after callbacks listed earlier that load
        # θ_0 (PretrainFromScratch).
        extractor = pl_module.extractor
        if stage == "fit" and not isinstance(extractor, LinearExtractor) and self.reference is None:
            self.reference = copy.deepcopy(extractor).eval()

    def compute_report(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        return immunization_report(
            pl_module,
            trainer.datamodule,
            self.split,
            self.reference,
            self.num_groups,
            self.group_size,
        )
