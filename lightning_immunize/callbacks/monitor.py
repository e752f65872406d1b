"""Condition numbers of both feature covariances while training.

Contract: the LightningModule has an ``extractor`` attribute (inputs → features ``(B, K)``)
and training batches are ``{"pretrain": (x, y), "harmful": (x, y)}`` (what every
:class:`~lightning_immunize.datamodules.PairedDataModule` yields).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from lightning_immunize.conditioning import feature_condition_number
from lightning_immunize.metrics import ConditionNumber
from lightning_immunize.sides import SIDES

__all__ = ["ConditionNumberMonitor"]


class ConditionNumberMonitor(pl.Callback):
    """Every ``every_n_steps`` training steps, log κ of each side's batch features
    (``monitor/kappa_pretrain_batch``, ``monitor/kappa_harmful_batch``) and accumulate their
    covariance; at each training epoch end log κ of the covariance accumulated over the epoch
    (``monitor/kappa_pretrain``, ``monitor/kappa_harmful``), synchronized across DDP ranks.

    κ by the tolerance rule (``docs/numerical-rank.md``); the features are recomputed without
    gradients after the optimizer step, so they reflect the current extractor.

    Args:
        every_n_steps: measure every ``every_n_steps``-th training step (≥ 1).

    Example:
        >>> ConditionNumberMonitor(every_n_steps=10).every_n_steps
        10
    """

    def __init__(self, every_n_steps: int = 1) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be ≥ 1, got {every_n_steps}.")
        self.every_n_steps = every_n_steps
        self._metrics: dict[str, ConditionNumber] = {}

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._metrics = {side: ConditionNumber().to(pl_module.device) for side in SIDES}

    @torch.no_grad()
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if trainer.global_step % self.every_n_steps:
            return
        for side in SIDES:
            part = batch.get(side) if isinstance(batch, dict) else None
            if part is None:
                continue
            z = pl_module.extractor(part[0])
            z = z.reshape(z.shape[0], -1)
            self._metrics[side].update(z)
            pl_module.log(
                f"monitor/kappa_{side}_batch",
                float(feature_condition_number(z)),
                on_step=True,
                on_epoch=False,
                batch_size=z.shape[0],
            )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for side, metric in self._metrics.items():
            if metric.update_count:
                pl_module.log(f"monitor/kappa_{side}", float(metric.compute()))
