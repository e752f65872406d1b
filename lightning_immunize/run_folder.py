"""A run folder (``lightning_logs/version_N``) as the unit of a trained model: its saved
``config.yaml``, its checkpoint and its ``immunization.json``, found without loading anything."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "RunFolder",
    "check_checkpoint_current",
    "checkpoint_run",
    "resolve_run",
    "run_folders",
    "unfinished_runs",
]

CONFIG_NAME = "config.yaml"
REPORT_NAME = "immunization.json"
#: Where a run keeps the checkpoint it resumes from and is evaluated, exported, attacked at.
LAST_CHECKPOINT = Path("checkpoints") / "last.ckpt"


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


def run_folders(root: str | Path) -> list[Path]:
    """The ``version_N`` folders under ``root`` (a logger's ``save_dir/name``), by ``N``."""
    runs = [d for d in Path(root).glob("version_*") if d.is_dir() and d.name[8:].isdigit()]
    return sorted(runs, key=lambda d: int(d.name[8:]))


def unfinished_runs(root: str | Path) -> list[Path]:
    """Run folders under ``root`` that can be resumed, oldest first: a ``last.ckpt`` and no
    ``immunization.json`` (written when a fit ends), i.e. interrupted or killed fits."""
    return [
        d
        for d in run_folders(root)
        if (d / LAST_CHECKPOINT).is_file() and not (d / REPORT_NAME).is_file()
    ]


def check_checkpoint_current(
    ckpt: str | Path, ckpt_step: int | None, report: str | Path | None
) -> None:
    """Refuses a checkpoint older than the end of fit that ``report`` (an
    ``immunization.json``) describes: its figures would be labelled with another model's.

    Args:
        ckpt: the checkpoint's path (named in the error).
        ckpt_step: its ``global_step`` (``None``: unknown, nothing checked).
        report: the run's ``immunization.json`` (``None`` or missing: nothing checked).

    Raises:
        ValueError: the checkpoint's step is below the report's ``steps``.

    Example:
        >>> import json, tempfile
        >>> report = Path(tempfile.mkdtemp()) / REPORT_NAME
        >>> _ = report.write_text(json.dumps({"steps": 300}))
        >>> check_checkpoint_current("run/checkpoints/last.ckpt", 300, report)
        >>> check_checkpoint_current("run/checkpoints/last.ckpt", 31, report)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: run/checkpoints/last.ckpt holds step 31 but ... describes the fit at step 300...
    """
    if ckpt_step is None or report is None or not Path(report).is_file():
        return
    try:
        steps = json.loads(Path(report).read_text()).get("steps")
    except (ValueError, AttributeError):
        return
    if isinstance(steps, int) and ckpt_step < steps:
        raise ValueError(
            f"{ckpt} holds step {ckpt_step} but {report} describes the fit at step {steps}: "
            "the checkpoint is behind the run's report, so its figures would be another "
            "model's. Use the checkpoint of the fit's end (the run's checkpoints/last.ckpt)."
        )
