"""A run folder (``lightning_logs/version_N``) as the unit of a trained model: its saved
``config.yaml``, its checkpoint and its ``immunization.json``, found without loading anything."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["RunFolder", "checkpoint_run", "resolve_run"]

CONFIG_NAME = "config.yaml"
REPORT_NAME = "immunization.json"


@dataclass(frozen=True)
class RunFolder:
    """What a ``lightning-immunize fit`` run left in its folder.

    Attributes:
        path: the folder (``…/lightning_logs/version_N``).
        config: its ``config.yaml`` (the exact configuration LightningCLI ran).
        checkpoint: ``checkpoints/last.ckpt``, else the newest ``.ckpt`` there.
        report: ``immunization.json`` (``None`` when fit did not reach its end).
    """

    path: Path
    config: Path
    checkpoint: Path
    report: Path | None


def checkpoint_run(ckpt: str | Path) -> Path:
    """The run folder a checkpoint at ``RUN/checkpoints/name.ckpt`` belongs to (``RUN``)."""
    return Path(ckpt).parent.parent


def resolve_run(path: str | Path) -> RunFolder:
    """The :class:`RunFolder` at ``path``.

    Raises:
        FileNotFoundError: ``path`` is not a folder, or has no ``config.yaml`` or no checkpoint
            (the message names what is missing and what a run folder holds).

    Example:
        >>> resolve_run("no/such/run")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        FileNotFoundError: run folder not found: no/such/run (expected a ...
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"run folder not found: {path} (expected a lightning_logs/version_N folder written "
            "by `lightning-immunize fit`)."
        )
    config = path / CONFIG_NAME
    if not config.is_file():
        raise FileNotFoundError(
            f"{path} has no {CONFIG_NAME}: not a run folder of `lightning-immunize fit` "
            "(pass --config and --ckpt instead)."
        )
    folder = path / "checkpoints"
    last = folder / "last.ckpt"
    checkpoints = sorted(folder.glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not checkpoints:
        raise FileNotFoundError(
            f"{path} has no checkpoint in {folder}: the run was stopped before its first epoch "
            "ended, or it ran with checkpointing off."
        )
    report = path / REPORT_NAME
    return RunFolder(
        path=path,
        config=config,
        checkpoint=last if last.is_file() else checkpoints[-1],
        report=report if report.is_file() else None,
    )
