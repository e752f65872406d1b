"""Puts θ_0 into the module when a fit sets up, first of all callbacks (the builder inserts
it): a thin adapter over :mod:`lightning_immunize.theta0`."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from lightning_immunize.theta0 import Theta0

__all__ = ["Theta0Setup"]


class Theta0Setup(pl.Callback):
    """Applies a :class:`~lightning_immunize.theta0.Theta0` source in ``setup`` of ``fit``:
    after DDP has started (rank 0 trains a θ_0 from scratch while the others wait), before a
    checkpoint is restored and before any other callback keeps θ_0 as the reference.

    :class:`~lightning_immunize.build.ImmunizationCLI` inserts it at the head of the callbacks
    from the config's ``theta0:`` group; add it yourself (first) in a Trainer of your own.

    Args:
        source: how θ_0 is obtained.

    Example:
        >>> from lightning_immunize.theta0 import FromScratch
        >>> callback = Theta0Setup(FromScratch(epochs=1, max_epochs=1))
    """

    def __init__(self, source: Theta0) -> None:
        self.source = source

    @property
    def info(self) -> dict[str, Any]:
        """The source's report of what it did (empty before ``setup``)."""
        return self.source.info

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.source.apply(pl_module, trainer.datamodule, trainer)
