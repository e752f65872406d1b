"""``last.ckpt`` at every epoch end and at a requested stop, so no run is ever lost.

A :class:`~lightning.pytorch.callbacks.ModelCheckpoint` that keeps only ``last.ckpt`` in the
run's ``checkpoints/`` folder, overwritten in place (a resumed run never starts a
``last-v1.ckpt``): written after the last batch of every training epoch, whether or not
validation runs then, and when SIGINT (Ctrl-C) or SIGTERM asks the fit to stop. A stop is
taken at a batch boundary only — after a batch's optimizer step *and* its bookkeeping — so
``--ckpt_path last`` resumes exactly, mid-epoch too (the data modules' loaders are stateful):
the resumed run trains neither one batch twice nor one too few. ``lightning-immunize fit``
adds it to every run.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_immunize.interruption import Interrupted, stop_requests

__all__ = ["LastCheckpoint"]


class LastCheckpoint(ModelCheckpoint):
    """Writes ``<run>/checkpoints/last.ckpt`` at each training epoch end and at a stop signal.

    While the training loop runs, the first SIGINT/SIGTERM is deferred
    (:mod:`lightning_immunize.interruption`): the batch under way finishes, ``last.ckpt`` is
    saved, and the next batch raises :class:`~lightning_immunize.interruption.Interrupted`
    instead of starting. A second signal stops at once without saving; any other exception
    leaves ``last.ckpt`` as it was (a checkpoint taken mid-step would resume off by a step).
    Under DDP the ranks agree on the stop at each batch end.

    Args:
        dirpath: folder of ``last.ckpt`` (default: the run's ``checkpoints/``, as Lightning's
            own checkpoints).

    Example:
        >>> callback = LastCheckpoint()
        >>> callback.save_last, callback.save_top_k
        (True, 0)
    """

    def __init__(self, dirpath: str | None = None) -> None:
        super().__init__(
            dirpath=dirpath,
            save_top_k=0,
            save_last=True,
            save_on_train_epoch_end=True,
            enable_version_counter=False,
        )
        self._stopping = False
        self._deferring = False

    @property
    def last_path(self) -> str | None:
        """Where ``last.ckpt`` goes (``None`` before the trainer set ``dirpath``)."""
        if self.dirpath is None:
            return None
        return os.path.join(self.dirpath, self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)

    def _save_last(self, trainer: pl.Trainer) -> None:
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _saved_now(self, trainer: pl.Trainer) -> bool:
        return self._last_global_step_saved == trainer.global_step and bool(
            self.last_path and os.path.isfile(self.last_path)
        )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stopping = False
        if not self._deferring:
            stop_requests.begin_deferring()
            self._deferring = True

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning 2.6, restarting from a checkpoint written after an epoch's last batch,
        # starts the next epoch without counting it as started; a mid-epoch checkpoint of that
        # epoch then reads "epoch not started" and resumes a batch off (301 steps for 300).
        # Count it, as an uninterrupted run does.
        epochs = trainer.fit_loop.epoch_progress
        if epochs.total.ready == epochs.total.completed:
            epochs.increment_ready()
            epochs.increment_started()

    def _end_deferring(self) -> None:
        if self._deferring:
            stop_requests.end_deferring()
            self._deferring = False

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end_deferring()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Normally saved at the epoch's last batch already; this covers an epoch cut short
        # (``max_steps``, ``limit_train_batches``).
        self._save_last(trainer)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not self._stopping:
            self._stopping = trainer.strategy.reduce_boolean_decision(
                stop_requests.requested, all=False
            )
        # After a batch's optimizer step and before the loop's end-of-batch bookkeeping:
        # Lightning resumes such a checkpoint at the next batch, restoring the loaders'
        # positions. (A checkpoint written in ``on_train_epoch_end`` resumes with the loaders
        # rewound: Lightning counts that epoch as finished and skips their state.)
        if self._stopping or trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            self._save_last(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if self._stopping and not trainer.sanity_checking:
            # Validation ran after the stop's save: save again, so that what it changed
            # (logged metrics, other callbacks' state and files) is in last.ckpt.
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _stopped_here(self, trainer: pl.Trainer) -> str:
        return (
            f"saved {self.last_path} at step {trainer.global_step}. Resume with the same command "
            "plus --ckpt_path last."
        )

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._stopping and self._saved_now(trainer):
            self._end_deferring()
            raise Interrupted(stop_requests.signum or signal.SIGTERM, self._stopped_here(trainer))

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        training = self._deferring  # the training loop had started
        self._end_deferring()
        if not training:
            return
        for logger in trainer.loggers:  # what was logged up to the stop reaches the disk
            logger.save()
        if isinstance(exception, SIGTERMException) and not self._saved_now(trainer):
            self._save_last(trainer)  # Lightning raises it between two batches only
        if isinstance(exception, Interrupted | SIGTERMException) and self._saved_now(trainer):
            stop_requests.detail = self._stopped_here(trainer)
            return
        path = self.last_path
        if path is not None and os.path.isfile(path):
            kept = f"{path} is kept as saved at step {self._last_global_step_saved}"
        else:
            kept = "no last.ckpt was written (the first epoch had not ended)"
        rank_zero_info(
            f"fit stopped ({type(exception).__name__}) at step {trainer.global_step}; {kept}."
        )
