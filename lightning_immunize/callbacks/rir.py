"""Relative immunization ratio during training (Eq. 15, Eq. 17), logged with ``self.log``.

Contract: the LightningModule has an ``extractor`` attribute (inputs → features ``(B, K)``)
and the datamodule has ``full_tensors(split)``. Works with any such pipeline, not only with
:class:`~lightning_immunize.module.ImmunizationModule`.
"""

from __future__ import annotations

import lightning.pytorch as pl

from lightning_immunize.callbacks.reference import ReferenceKeeper

__all__ = ["RIRCallback"]

LOGGED = ("rir", "ratio_harmful", "ratio_pretrain")


class RIRCallback(ReferenceKeeper):
    """Logs ``rir``, ``ratio_harmful`` and ``ratio_pretrain`` at the end of every
    ``every_n_epochs``-th validation epoch (on the training split by default).

    Linear extractors are compared with the identity on the full split (Eq. 15); others with
    θ_0, the extractor as it was at fit start, on ``num_groups`` × ``group_size`` samples
    (Eq. 17), whose means are logged (``*_std`` too).

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

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        report = self.compute_report(trainer, pl_module)
        self.last = report
        for key in LOGGED:
            pl_module.log(
                key, report[key], prog_bar=self.prog_bar and key == "rir", sync_dist=False
            )
            if f"{key}_std" in report:
                pl_module.log(f"{key}_std", report[f"{key}_std"])
