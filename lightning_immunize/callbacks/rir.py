"""Relative immunization ratio during training (Eq. 15, Eq. 17), logged with ``self.log``.

Contract: the LightningModule has an ``extractor`` attribute (inputs → features ``(B, K)``)
and the datamodule has ``full_tensors(split)``. Works with any such pipeline, not only with
:class:`~lightning_immunize.module.ImmunizationModule`.
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

from lightning_immunize.callbacks.reference import ReferenceKeeper

__all__ = ["RIRCallback"]

LOGGED = ("rir", "ratio_harmful", "ratio_pretrain")


class RIRCallback(ReferenceKeeper):
    """Logs ``rir``, ``ratio_harmful`` and ``ratio_pretrain`` at the end of every
    ``every_n_epochs``-th validation epoch — or training epoch, when the run has no validation
    loop (it says so once) — measured on the training split by default.

    Linear extractors are compared with the identity on the full split (Eq. 15); others with
    θ_0, the extractor as it was at fit start, on ``num_groups`` × ``group_size`` samples
    (Eq. 17), whose means are logged (``*_std`` too).

    Args:
        split: the data module's split the ratios are computed on (``"train"``, ``"val"``
            or ``"test"``).
        every_n_epochs: log at the end of every ``every_n_epochs``-th epoch (≥ 1).
        num_groups: deep (non-linear) extractors: number of sample groups of the RIR
            (Eq. 17); unused for a linear extractor.
        group_size: deep extractors: samples per group (fewer when a side is smaller).
        prog_bar: also show ``rir`` in the progress bar.

    Example:
        >>> callback = RIRCallback(every_n_epochs=5)
        >>> callback.every_n_epochs
        5
    """

    def __init__(
        self,
        split: str = "train",
        every_n_epochs: int = 1,
        num_groups: int = 20,
        group_size: int = 100,
        prog_bar: bool = True,
    ) -> None:
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be ≥ 1, got {every_n_epochs}.")
        self.split = split
        self.every_n_epochs = every_n_epochs
        self.num_groups, self.group_size = num_groups, group_size
        self.prog_bar = prog_bar
        self.reference = None
        self.last: dict | None = None
        self._said_train_epoch_end = False

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._measure(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Without a validation loop (no val split, limit_val_batches=0) there is no validation
        # epoch end: measure here instead, and say so once.
        if trainer.enable_validation and sum(trainer.num_val_batches) > 0:
            return
        if not self._said_train_epoch_end:
            rank_zero_info(
                "RIRCallback: this run has no validation loop; logging rir at the end of every "
                f"{self.every_n_epochs}-th training epoch instead, on the {self.split!r} split."
            )
            self._said_train_epoch_end = True
        self._measure(trainer, pl_module)

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        report = self.compute_report(trainer, pl_module)
        self.last = report
        for key in LOGGED:
            pl_module.log(
                key, report[key], prog_bar=self.prog_bar and key == "rir", sync_dist=False
            )
            if f"{key}_std" in report:
                pl_module.log(f"{key}_std", report[f"{key}_std"])
