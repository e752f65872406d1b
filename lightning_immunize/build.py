"""From a config (and a checkpoint) to objects: the module, the data module, θ_0.

:class:`ImmunizationCLI` is the ``LightningCLI`` of ``lightning-immunize fit`` (it adds the
:class:`~lightning_immunize.callbacks.ImmunizationReport` when a config has none);
:func:`instantiate` builds the same objects without running anything, and :func:`load_trained`
restores a trained run.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.cli import LightningCLI

from lightning_immunize.callbacks.report import ImmunizationReport
from lightning_immunize.datamodules import PairedDataModule
from lightning_immunize.export import load_checkpoint
from lightning_immunize.module import ImmunizationModule

__all__ = ["ImmunizationCLI", "instantiate", "load_trained"]


class ImmunizationCLI(LightningCLI):
    """``LightningCLI`` over :class:`ImmunizationModule` and any :class:`PairedDataModule`;
    ``fit`` always writes the immunization report."""

    def __init__(self, args: Sequence[str] | None = None, **kwargs: Any) -> None:
        super().__init__(
            ImmunizationModule,
            PairedDataModule,
            subclass_mode_data=True,
            args=None if args is None else list(args),
            auto_configure_optimizers=False,
            **kwargs,
        )

    def before_fit(self) -> None:
        if not any(isinstance(cb, ImmunizationReport) for cb in self.trainer.callbacks):
            self.trainer.callbacks.append(ImmunizationReport())


def instantiate(args: Sequence[str]) -> ImmunizationCLI:
    """An :class:`ImmunizationCLI` (not run) holding the module, data module and trainer that
    ``args`` (config files and overrides, as on the command line) describe."""
    return ImmunizationCLI(args, run=False, save_config_callback=None)


def load_trained(
    config: str | Path, ckpt: str | Path
) -> tuple[ImmunizationModule, PairedDataModule, torch.nn.Module]:
    """``(module, datamodule, θ_0)`` from a run's config and checkpoint.

    ``θ_0`` is the extractor as the config builds it before training (pretrained weights or
    its checkpoint path), used as the reference of a non-linear extractor. The module takes the
    checkpoint's dtype (float64 for the linear configs) before its weights are loaded.
    """
    cli = instantiate(["--config", str(config), "--trainer.logger", "false"])
    module, datamodule = cli.model, cli.datamodule
    reference = copy.deepcopy(module.extractor).eval()
    state = load_checkpoint(ckpt)["state_dict"]
    dtype = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
    module = module.to(dtype)
    module.load_state_dict(state)
    module.eval()
    return module, datamodule, reference
