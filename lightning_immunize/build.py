"""From a config (and a checkpoint) to objects: the module, the data module, θ_0.

:class:`ImmunizationCLI` is the ``LightningCLI`` of ``lightning-immunize fit`` (it adds the
:class:`~lightning_immunize.callbacks.ImmunizationReport` when a config has none);
:func:`instantiate` builds the same objects without running anything, and :func:`load_trained`
restores a trained run.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
import logging
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn

from lightning_immunize.callbacks.last_checkpoint import LastCheckpoint
from lightning_immunize.callbacks.report import ImmunizationReport
from lightning_immunize.callbacks.theta0 import Theta0Setup
from lightning_immunize.datamodules import PairedDataModule
from lightning_immunize.evaluation.report import check_data_fingerprint
from lightning_immunize.export import load_checkpoint
from lightning_immunize.models import LinearExtractor
from lightning_immunize.module import ImmunizationModule
from lightning_immunize.run_folder import (
    LAST_CHECKPOINT,
    REPORT_NAME,
    check_checkpoint_current,
    checkpoint_run,
    run_folders,
    unfinished_runs,
)
from lightning_immunize.theta0 import AsBuilt, Theta0

__all__ = [
    "ImmunizationCLI",
    "TrainedRun",
    "instantiate",
    "known_noise_filtered",
    "load_run",
    "load_theta0",
    "load_trained",
    "quiet_lightning",
    "resolve_theta0",
    "recorded_report",
]

#: Lightning warnings that say nothing about a lightning-immunize run: the CSV logger is our
#: choice (no TensorBoard needed), a run without a validation split has an empty loader list,
#: and a torch/Lightning version pairing deprecates an internal pytree API.
KNOWN_IRRELEVANT_WARNINGS = (
    r".*`tensorboardX` has been removed as a dependency.*",
    r".*Total length of .* across ranks is zero.*",
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
)


#: Lightning's CSV logger's file in a run folder.
METRICS_NAME = "metrics.csv"


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).lstrip().startswith("💡 Tip")


@contextmanager
def known_noise_filtered() -> Iterator[None]:
    """For the block only: drop the warnings of :data:`KNOWN_IRRELEVANT_WARNINGS` and
    Lightning's advertising tips; every other warning still shows."""
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    tips = _DropTips()
    with warnings.catch_warnings():
        for pattern in KNOWN_IRRELEVANT_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)
        logger.addFilter(tips)
        try:
            yield
        finally:
            logger.removeFilter(tips)


class ConfigError(ValueError):
    """A config file or command-line argument the parser refuses, in one line."""


def parser_error_line(text: str) -> str:
    r"""jsonargparse's error report (usage, tip, then ``error: ...`` over several lines) as one
    line naming the key, what it expects and what it got.

    Example:
        >>> parser_error_line(
        ...     'usage: x\nerror: Parser key "seed_everything":\n  Does not validate against '
        ...     "any of the Union subtypes\n  Subtypes: [<class 'bool'>, <class 'int'>]\n  "
        ...     "Errors:\n    - Expected a <class 'bool'>\n    - Expected a <class 'int'>\n  "
        ...     "Given value type: <class 'str'>\n  Given value: abc"
        ... )
        "--seed_everything: expected bool or int, got 'abc'."
    """
    body = text.split("error:", 1)[1] if "error:" in text else text
    lines = [ln.strip() for ln in body.strip().splitlines() if ln.strip()]
    if not lines:
        return "the arguments could not be parsed."
    head = lines[0]
    key = re.match(r'Parser key "([^"]+)":\s*(.*)', head)
    if key is None:
        option = re.match(r"Subcommand '(\w+)' does not accept option '([^']+)'", head)
        if option:
            return (
                f"unknown key {option.group(2)!r} (in a config file or on the command line); "
                f"`lightning-immunize {option.group(1)} --help` lists the keys."
            )
        return head if head.endswith(".") else head + "."
    name, rest = key.groups()
    if rest and not rest.startswith("Does not validate"):  # e.g. 'File does not exist: ...'
        return f"--{name}: {rest.rstrip('.')}."
    given = next(
        (ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("Given value:")), None
    )
    ours = [
        ln[2:].strip()
        for ln in lines
        if ln.startswith("- ")
        and not ln.startswith("- Expected a")
        and not ln.startswith(("- Problem with given class_path", "- Does not validate"))
    ]
    ours += [ln for ln in lines if not ln.startswith(("-", "Given", "Subtypes", "Errors", "Does"))][
        1:
    ]
    if ours:
        return f"--{name}: {'; '.join(dict.fromkeys(m.rstrip('.') for m in ours))}."
    types = re.findall(
        r"<class '(?:[\w.]*\.)?(\w+)'>",
        next((ln for ln in lines if ln.startswith("Subtypes:")), ""),
    )
    expected = " or ".join(types) if types else "another value"
    got = f", got {given!r}" if given is not None else ""
    return f"--{name}: expected {expected}{got}."


class ImmunizationCLI(LightningCLI):
    """``LightningCLI`` over :class:`ImmunizationModule` and any :class:`PairedDataModule`;
    ``fit`` always writes the immunization report."""

    def parse_arguments(self, parser: Any, args: Any) -> None:
        # The parser prints its usage (tens of lines) and exits on a bad key or value: keep its
        # own message, in one line, as a ConfigError (``--help`` still prints and exits 0).
        buffer = io.StringIO()
        try:
            with contextlib.redirect_stderr(buffer):
                super().parse_arguments(parser, args)
        except SystemExit as stop:
            if stop.code in (0, None):
                sys.stderr.write(buffer.getvalue())
                raise
            raise ConfigError(parser_error_line(buffer.getvalue())) from None
        sys.stderr.write(buffer.getvalue())

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_subclass_arguments(
            Theta0,
            "theta0",
            required=False,
            help="How θ_0, the model immunization starts from, is obtained "
            "(lightning_immunize.theta0: AsBuilt, FromScratch, FromCheckpoint; default AsBuilt).",
        )

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        self.theta0 = resolve_theta0(config.get("theta0"), self.trainer)

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
        callbacks = self.trainer.callbacks
        if not any(isinstance(cb, ImmunizationReport) for cb in callbacks):
            callbacks.append(ImmunizationReport())
        checkpointing = any(isinstance(cb, ModelCheckpoint) for cb in callbacks)
        if checkpointing and not any(isinstance(cb, LastCheckpoint) for cb in callbacks):
            callbacks.append(LastCheckpoint())
        objective = getattr(self.model, "objective", None)
        if getattr(objective, "simulates_fine_tuning", False) and isinstance(
            getattr(self.model, "extractor", None), LinearExtractor
        ):
            rank_zero_warn(
                f"method {objective.name!r} simulates fine-tuning attacks on the extractor's "
                "blocks: with a one-layer linear extractor it means little; use it with a deep "
                "extractor (e.g. configs/cnn_mnist.yaml)."
            )
        if self.datamodule is not None:
            # Bad data (missing files, bad cells, corrupt images, batches that cannot be
            # formed) is refused before Lightning opens a run folder; it is built only once.
            self.datamodule.setup("fit")
        fit_args = self.config_init[self.subcommand]
        if fit_args.get("ckpt_path") == "last":
            ckpt = _resume_in_last_run(self.trainer)
            if ckpt is not None:
                fit_args["ckpt_path"] = str(ckpt)
        if fit_args.get("ckpt_path") and fit_args.get("weights_only") is None:
            # Our checkpoints hold tensors and plain containers only; refuse anything else.
            fit_args["weights_only"] = True

    def after_fit(self) -> None:
        if self.trainer.global_step == 0 and self.trainer.state.status == "finished":
            where = self.trainer.log_dir or self.trainer.default_root_dir
            raise ValueError(
                "no training step ran (trainer.max_epochs/max_steps of 0, or no training "
                f"batch): the report in {where} describes the model as built, not immunized; "
                "expected max_epochs/max_steps ≥ 1 and a training set with at least one batch."
            )


def _resume_in_last_run(trainer: pl.Trainer) -> Path | None:
    """``--ckpt_path last``: continue the newest *unfinished* run folder (interrupted or killed:
    a ``last.ckpt`` and no ``immunization.json``) in place, instead of opening a new
    ``version_N`` where Lightning would find no checkpoint and start over. A finished run is
    never continued. Returns the checkpoint to resume from (``None``: no versioned logger)."""
    logger = trainer.logger
    if logger is None or not hasattr(logger, "_version") or logger.save_dir is None:
        return None
    root = Path(logger.save_dir) / str(logger.name)
    runs = unfinished_runs(root)
    if not runs:
        finished = [d.name for d in run_folders(root) if (d / REPORT_NAME).is_file()]
        also = f" (finished runs there: {', '.join(finished)})" if finished else ""
        raise FileNotFoundError(
            f"--ckpt_path last: no unfinished run under {root}{also}, so there is nothing to "
            "resume (a run is unfinished when it has checkpoints/last.ckpt and no "
            "immunization.json); run without --ckpt_path to start a new run."
        )
    newest = runs[-1]
    ckpt = newest / LAST_CHECKPOINT
    logger._version = int(newest.name[8:])
    _keep_logged_metrics(logger, newest, int(load_checkpoint(ckpt, mmap=True)["global_step"]))
    rank_zero_info(f"resuming the unfinished run {newest} from {ckpt}")
    return ckpt


def _keep_logged_metrics(logger: Any, run: Path, step: int) -> None:
    """Lightning's CSV logger deletes a run's ``metrics.csv`` when it opens the folder again:
    keep the rows logged before ``step`` (the resumed checkpoint's) and let the resumed fit
    append to them. Rows from after the checkpoint are dropped: the resumed fit logs them
    again."""
    path = run / METRICS_NAME
    if not isinstance(logger, CSVLogger) or rank_zero_only.rank != 0 or not path.is_file():
        return
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or [])
        rows = [r for r in reader if _row_step(r) < step]
    with warnings.catch_warnings():  # "...will be deleted": not so, they are written back
        warnings.filterwarnings("ignore", message=r".*Previous log files in this directory.*")
        writer = logger.experiment
    with path.open("w", newline="") as f:
        out = csv.DictWriter(f, fieldnames=header)
        out.writeheader()
        out.writerows(rows)
    writer.metrics_keys = header


def _row_step(row: dict[str, str]) -> float:
    try:
        return float(row.get("step") or "nan")
    except ValueError:
        return float("nan")


def instantiate(args: Sequence[str]) -> ImmunizationCLI:
    """An :class:`ImmunizationCLI` (not run) holding the module, data module and trainer that
    ``args`` (config files and overrides, as on the command line) describe."""
    with known_noise_filtered(), warnings.catch_warnings():
        # ``args`` is given on purpose: the process's own argv belongs to its caller.
        warnings.filterwarnings("ignore", message=r".*LightningCLI's args parameter.*")
        return ImmunizationCLI(args, run=False, save_config_callback=None)


#: Top-level keys of a run's saved ``config.yaml`` that build the objects; the others
#: (``ckpt_path``, ``weights_only``, …) are arguments of the ``fit`` call itself.
CONFIG_SECTIONS = (
    "seed_everything",
    "trainer",
    "model",
    "data",
    "theta0",
    "optimizer",
    "lr_scheduler",
)


def _buildable_config(config: str | Path, folder: Path) -> Path:
    """``config`` as given, or — for a run's saved ``config.yaml`` — a copy in ``folder``
    without the keys of the ``fit`` call, which a parser that does not fit refuses."""
    text = Path(config).read_text()
    data = yaml.safe_load(text) or {}
    extra = [k for k in data if k not in CONFIG_SECTIONS]
    if not extra:
        return Path(config)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in data.items() if k in CONFIG_SECTIONS}))
    return path


def resolve_theta0(source: Theta0 | None, trainer: pl.Trainer) -> Theta0:
    """The config's θ_0 source, put at the head of ``trainer``'s callbacks (a
    :class:`~lightning_immunize.callbacks.theta0.Theta0Setup`), so it runs before any other.

    A ``Theta0Setup`` already among the callbacks (the deprecated ``PretrainFromScratch`` is
    one) is taken out and its source used; ``None`` and no such callback:
    :class:`~lightning_immunize.theta0.AsBuilt`.

    Raises:
        ConfigError: the config says twice how θ_0 is obtained (a ``theta0:`` group and such
            a callback, or two callbacks).
    """
    listed = [cb for cb in trainer.callbacks if isinstance(cb, Theta0Setup)]
    if len(listed) + (source is not None) > 1:
        raise ConfigError(
            "The config says twice how θ_0 is obtained (a theta0: group and a "
            f"{type(listed[0]).__name__} callback, or two such callbacks); expected one theta0: "
            "group."
        )
    if listed:
        source = listed[0].source
        trainer.callbacks.remove(listed[0])
    source = source if source is not None else AsBuilt()
    trainer.callbacks.insert(0, Theta0Setup(source))
    return source


def load_theta0(cli: ImmunizationCLI) -> tuple[ImmunizationModule, PairedDataModule]:
    """The CLI's module with θ_0 in it — loaded, trained once and cached, or as built, as the
    config's ``theta0:`` group says — and its data module."""
    cli.theta0.apply(cli.model, cli.datamodule)
    return cli.model, cli.datamodule


@dataclass
class TrainedRun:
    """A trained run restored: the module (θ_I), its data module, and θ_0 with its head."""

    module: ImmunizationModule
    datamodule: PairedDataModule
    theta_0: torch.nn.Module
    theta_0_head: torch.nn.Module | None


def load_run(
    config: str | Path,
    ckpt: str | Path,
    check_data: bool = False,
    run_report: str | Path | None = None,
    allow_data_mismatch: bool = False,
) -> TrainedRun:
    """A run's module with the checkpoint's weights, and θ_0 as the config's ``theta0:`` says
    (the cached network when it trains θ_0 from scratch, a checkpoint's weights, else the
    extractor as the config builds it: pretrained weights or its checkpoint path).

    Args:
        config: the run's config (its ``config.yaml``, or another).
        ckpt: the checkpoint whose weights to load.
        check_data: check the run before measuring it: the checkpoint must not be behind the
            run's ``immunization.json`` (refused before anything is built), and the data the
            config builds must have the fingerprint that report records.
        run_report: that ``immunization.json`` (default: the one of ``ckpt``'s run folder;
            nothing to check when there is none).
        allow_data_mismatch: with ``check_data``, measure on other data on purpose.

    Raises:
        ValueError: with ``check_data``, a stale checkpoint, or data whose fingerprint differs
            (unless ``allow_data_mismatch``).
    """
    recorded = recorded_report(ckpt, run_report) if check_data else None
    with tempfile.TemporaryDirectory() as tmp:
        buildable = _buildable_config(config, Path(tmp))
        cli = instantiate(["--config", str(buildable), "--trainer.logger", "false"])
    module, datamodule = load_theta0(cli)
    reference = copy.deepcopy(module.extractor).eval()
    head = copy.deepcopy(module.head).eval() if module.head is not None else None
    state = load_checkpoint(ckpt)["state_dict"]
    dtype = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
    module = module.to(dtype)
    module.load_state_dict(state)
    module.eval()
    if check_data:
        check_data_fingerprint(datamodule, recorded, allow_data_mismatch)
    return TrainedRun(module, datamodule, reference, head)


def recorded_report(ckpt: str | Path, run_report: str | Path | None = None) -> dict | None:
    """The run's ``immunization.json`` (``run_report``, default: the one of ``ckpt``'s run
    folder; ``None`` when there is none), after refusing a checkpoint that is behind it."""
    report_path = Path(run_report or checkpoint_run(ckpt) / REPORT_NAME)
    check_checkpoint_current(ckpt, load_checkpoint(ckpt, mmap=True).get("global_step"), report_path)
    return json.loads(report_path.read_text()) if report_path.is_file() else None


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Lightning's per-run warnings and banners off for the block only (a sweep starts
    hundreds of trainers); the caller's warning filters and log levels come back after."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "lightning")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


def load_trained(
    config: str | Path, ckpt: str | Path
) -> tuple[ImmunizationModule, PairedDataModule, torch.nn.Module]:
    """``(module, datamodule, θ_0)`` from a run's config and checkpoint (see :func:`load_run`).

    The module takes the checkpoint's dtype (float64 for the linear configs) before its
    weights are loaded.
    """
    run = load_run(config, ckpt)
    return run.module, run.datamodule, run.theta_0
