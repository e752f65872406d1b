"""Callbacks the interruption tests put into a `lightning-immunize fit` subprocess."""

from __future__ import annotations

import os
import signal

import lightning.pytorch as pl
import torch


class KillAtStep(pl.Callback):
    """SIGKILLs its own process after optimizer step ``step`` (no cleanup, no checkpoint)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class SaveFinalWeights(pl.Callback):
    """Writes the module's final state dict to ``path`` at the end of fit."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_fit_end(self, trainer, pl_module) -> None:
        torch.save({k: v.detach().cpu() for k, v in pl_module.state_dict().items()}, self.path)


class InterruptAtStep(pl.Callback):
    """Sends ``signum`` (default SIGINT, Ctrl-C) to its own process after optimizer step
    ``step``."""

    def __init__(self, step: int, signum: str = "SIGINT") -> None:
        self.step = step
        self.signum = signal.Signals[signum]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


class InterruptInValidation(InterruptAtStep):
    """Sends ``signum`` to its own process at the first batch of the validation that follows
    optimizer step ``step`` (mid-validation: Lightning's own SIGTERM handling stops there)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        pass

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking and trainer.global_step == self.step and batch_idx == 0:
            os.kill(os.getpid(), self.signum)
