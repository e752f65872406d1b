"""``last.ckpt`` at every epoch end and at an interrupt, so no run is ever lost.

A :class:`~lightning.pytorch.callbacks.ModelCheckpoint` that keeps only ``last.ckpt`` in the
run's ``checkpoints/`` folder, written at the end of every training epoch (whether or not
validation runs that epoch) and when fit stops on an exception — Ctrl-C included — so
``--ckpt_path last`` can resume (exactly, mid-epoch too: the data modules' loaders are
stateful). ``lightning-immunize fit`` adds it to every run.
"""

from __future__ import annotations

import os

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

__all__ = ["LastCheckpoint"]


class LastCheckpoint(ModelCheckpoint):
    """Writes ``<run>/checkpoints/last.ckpt`` at each training epoch end and on an interrupt.

    Args:
        dirpath: folder of ``last.ckpt`` (default: the run's ``checkpoints/``, as Lightning's
            own checkpoints).

    Example:
        >>> LastCheckpoint().save_last
        True
    """

    def __init__(self, dirpath: str | None = None) -> None:
        super().__init__(
            dirpath=dirpath, save_top_k=0, save_last=True, save_on_train_epoch_end=True
        )

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if self.dirpath is None or trainer.sanity_checking:
            return
        path = os.path.join(self.dirpath, self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)
        trainer.save_checkpoint(path)
        rank_zero_info(
            f"fit stopped ({type(exception).__name__}) at step {trainer.global_step}; saved "
            f"{path}. Resume with the same command plus --ckpt_path last."
        )
