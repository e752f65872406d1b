"""Plain helpers the test files share: the command line in a subprocess, fits on the
configs, a float64 linear module and a quiet CPU Trainer (fixtures: ``tests/conftest.py``)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

# conftest.py imports this module before pytest's logging capture is set up: importing
# Lightning then would make its "lightning.pytorch" logger stop propagating to the root
# logger (caplog's). So torch, Lightning and lightning_immunize are imported where used.
if TYPE_CHECKING:
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import Dataset

    from lightning_immunize.module import ImmunizationModule

ROOT = Path(__file__).resolve().parents[2]
SUPPORT = Path(__file__).resolve().parent


# --------------------------------------------------------------------------- the command line
def cli_env() -> dict[str, str]:
    """The environment of a ``lightning-immunize`` subprocess: this checkout first, and the
    fault-injection callbacks of ``tests/support`` importable from configs."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(SUPPORT), str(ROOT)])}


def cli_command(*args: str) -> list[str]:
    """``lightning-immunize ARGS`` as a subprocess command line (this interpreter)."""
    return [sys.executable, "-m", "lightning_immunize.cli", *args]


def run_cli(*args: str, cwd: Path = ROOT, timeout: int = 300) -> subprocess.CompletedProcess:
    """Runs ``lightning-immunize ARGS`` in a subprocess (``timeout`` seconds at most) and
    returns it, stdout and stderr captured as text."""
    return subprocess.run(
        cli_command(*args), cwd=cwd, env=cli_env(), capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def fit_args(config: str, root: Path, *extra: str) -> list[str]:
    """``fit --config configs/CONFIG.yaml`` into run folders under ``root``, without a
    progress bar; ``extra`` last, so it overrides what comes before."""
    return [
        "fit",
        "--config", str(ROOT / "configs" / f"{config}.yaml"),
        "--trainer.default_root_dir", str(root),
        "--trainer.enable_progress_bar", "false",
        *extra,
    ]  # fmt: skip


def run_fit(config: str, root: Path, *extra: str, **kwargs: Any) -> subprocess.CompletedProcess:
    """:func:`fit_args` run in a subprocess (``kwargs``: :func:`run_cli`'s)."""
    return run_cli(*fit_args(config, root, *extra), **kwargs)


def fit_digits(root: Path, max_epochs: int, *extra: str) -> Path:
    """A digits fit of ``max_epochs`` in this process (exceptions as they are): the one run
    folder under ``root``."""
    from lightning_immunize.cli import main

    main(fit_args("digits", root, "--trainer.max_epochs", str(max_epochs), *extra))
    (run,) = (root / "lightning_logs").iterdir()
    return run


# --------------------------------------------------------------------------- modules and fits
def tiny_timm_module(
    objective, trainable: list[str] | None = ("layer4",), seed: int = 0
) -> ImmunizationModule:
    """timm's ``test_resnet`` (one channel, 5 classes, weights seed 0, ``trainable`` blocks;
    ``None``: all) with ``objective``, in training mode, whose ``manual_backward`` is a plain
    ``loss.backward()`` (no Trainer). ``torch.manual_seed(seed)`` first."""
    import torch

    from lightning_immunize.models import TimmBackbone
    from lightning_immunize.module import ImmunizationModule

    torch.manual_seed(seed)
    trainable = None if trainable is None else list(trainable)
    backbone = TimmBackbone("test_resnet", in_chans=1, num_classes=5, seed=0, trainable=trainable)
    module = ImmunizationModule(backbone, None, objective).train()
    module.manual_backward = lambda loss: loss.backward()
    return module


def image_batch(seed: int = 0, b: int = 8) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A paired batch of ``b`` random 16×16 one-channel images a side, labels in 0…4."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    return {
        side: (torch.randn(b, 1, 16, 16, generator=gen), torch.randint(0, 5, (b,), generator=gen))
        for side in ("pretrain", "harmful")
    }


def linear_module(
    objective,
    d: int = 8,
    k: int | None = None,
    *,
    task: str = "binary",
    classes: int = 3,
    lr: float | None = 1e-2,
    float64_init: bool = False,
    backward_outside_trainer: bool = False,
) -> ImmunizationModule:
    """A ``LinearExtractor(d, k or d)`` (seed 0) and a ``LinearHead`` for ``task`` (``classes``
    outputs if multiclass, else 1), both float64. ``torch.manual_seed(0)`` first: the same
    head for every module, so only the objective differs.

    Args:
        lr: SGD's learning rate; ``None`` keeps the module's default optimizer.
        float64_init: draw the extractor's weights in float64; otherwise they are drawn in
            float32 and cast (other values).
        backward_outside_trainer: ``manual_backward`` is a plain ``loss.backward()``, so
            ``training_step`` runs without a Trainer.
    """
    import torch

    from lightning_immunize.models import LinearExtractor, LinearHead
    from lightning_immunize.module import ImmunizationModule

    torch.manual_seed(0)
    k = d if k is None else k
    if float64_init:
        extractor = LinearExtractor(d, k, init="random", seed=0, dtype=torch.float64)
    else:
        extractor = LinearExtractor(d, k, init="random", seed=0).double()
    module = ImmunizationModule(
        extractor,
        LinearHead(k, classes if task == "multiclass" else 1, task).double(),
        objective,
        optimizer=None if lr is None else partial(torch.optim.SGD, lr=lr),
    )
    if backward_outside_trainer:
        module.manual_backward = lambda loss: loss.backward()
    return module


def fit(
    module: pl.LightningModule,
    data: Mapping[str, tuple[torch.Tensor, ...]] | tuple[Dataset, Dataset],
    steps: int,
    batch_size: int | None = None,
    *,
    data_kwargs: Mapping[str, Any] | None = None,
    **trainer_kwargs: Any,
) -> pl.Trainer:
    """``steps`` optimizer steps of ``module`` on CPU, without shuffling, logger, checkpoints,
    progress bar or model summary; returns the Trainer.

    Args:
        data: ``{"pretrain": (x, y), "harmful": (x, y)}``, or a (pretrain, harmful) pair of
            datasets.
        batch_size: ``None`` puts the whole D_P in one batch.
        data_kwargs: more :class:`PairedDataModule` arguments (``task``, ``num_classes``).
        trainer_kwargs: more Trainer arguments, or ones that replace those above
            (``precision``, ``logger``, ``callbacks``, ``devices``...).
    """
    import lightning.pytorch as pl
    from torch.utils.data import TensorDataset

    from lightning_immunize.datamodules import PairedDataModule

    if isinstance(data, Mapping):
        data = TensorDataset(*data["pretrain"]), TensorDataset(*data["harmful"])
    pretrain, harmful = data
    dm = PairedDataModule(
        pretrain,
        harmful,
        batch_size=len(pretrain) if batch_size is None else batch_size,
        shuffle=False,
        **(data_kwargs or {}),
    )
    defaults = {
        "max_steps": steps,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "accelerator": "cpu",
    }
    trainer = pl.Trainer(**{**defaults, **trainer_kwargs})
    trainer.fit(module, dm)
    return trainer
