"""Deprecated: θ_0 is configuration now — the ``theta0:`` group
(:class:`lightning_immunize.theta0.FromScratch`), resolved by the builder before any
callback runs. ``PretrainFromScratch`` under ``trainer.callbacks`` maps onto it, with a
warning, and goes away in the next release."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from torch import nn

from lightning_immunize.callbacks.theta0 import Theta0Setup
from lightning_immunize.theta0 import FromScratch

__all__ = ["PretrainFromScratch"]


class PretrainFromScratch(Theta0Setup):
    """Deprecated: use ``theta0: {class_path: lightning_immunize.theta0.FromScratch,
    init_args: ...}`` in the config (same arguments, same cache). The builder takes this
    callback out of ``trainer.callbacks`` and resolves its θ_0 first.

    Args:
        cache_dir: folder of the cached files.
        epochs: train at least this many epochs (``1 ≤ epochs ≤ max_epochs``).
        max_epochs: train at most this many epochs.
        min_accuracy: the held-out accuracy, in [0, 1], to reach.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        batch_size: training batch size.
        seed: seed of the shuffles.
        progress: show a progress bar while training.
        require_accuracy: raise if the held-out accuracy stays below ``min_accuracy``.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike[str] | None = None,
        epochs: int = 3,
        max_epochs: int = 10,
        min_accuracy: float = 0.97,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        batch_size: int = 128,
        seed: int = 0,
        progress: bool = True,
        require_accuracy: bool = True,
    ) -> None:
        warnings.warn(
            "PretrainFromScratch is deprecated: write θ_0 as configuration, `theta0: "
            "{class_path: lightning_immunize.theta0.FromScratch, init_args: {...}}` with the "
            "same arguments (the cached θ_0 is the same); the callback goes away in the next "
            "release.",
            DeprecationWarning,
            stacklevel=2,
        )
        super().__init__(
            FromScratch(
                cache_dir,
                epochs,
                max_epochs,
                min_accuracy,
                lr,
                weight_decay,
                batch_size,
                seed,
                progress,
                require_accuracy,
            )
        )

    @property
    def recipe(self) -> dict[str, Any]:
        return self.source.recipe

    @property
    def directory(self) -> Path:
        return self.source.directory

    def cache_key(self, module: nn.Module, datamodule: Any) -> str:
        return self.source.cache_key(module, datamodule)

    def apply(self, module: nn.Module, datamodule: Any, trainer: Any = None) -> dict:
        """Loads or trains θ_0 into ``module.extractor`` and ``module.head``; returns ``info``."""
        return self.source.apply(module, datamodule, trainer)
