"""The run-folder arguments of ``evaluate`` and ``attack``: a run folder, or ``--config`` and
``--ckpt`` (each overriding the run's own), and whether other data than the run's may be used."""

from __future__ import annotations

import argparse

__all__ = ["add_run_arguments", "resolve_run_arguments"]


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``run``, ``--config``, ``--ckpt`` and ``--allow-data-mismatch`` to ``parser``."""
    parser.add_argument(
        "run",
        nargs="?",
        help="the run folder (lightning_logs/version_N): its saved config and last checkpoint",
    )
    parser.add_argument("--config", help="a YAML config instead of the run's own")
    parser.add_argument("--ckpt", help="a checkpoint instead of the run's last one")
    parser.add_argument(
        "--allow-data-mismatch",
        action="store_true",
        help="measure on data whose fingerprint differs from the run's training data",
    )


def resolve_run_arguments(
    args: argparse.Namespace, parser: argparse.ArgumentParser
) -> tuple[str, str, str | None]:
    """``(config, checkpoint, immunization.json or None)`` of the parsed run arguments; a
    usage error (exit 2) unless a run folder, or both ``--config`` and ``--ckpt``, is given."""
    if args.run is None and not (args.config and args.ckpt):
        parser.error("give a run folder, or both --config and --ckpt")
    from lightning_immunize.run_folder import resolve_run

    config, ckpt, report = args.config, args.ckpt, None
    if args.run is not None:
        run = resolve_run(args.run)
        config, ckpt, report = config or run.config, ckpt or run.checkpoint, run.report
    return config, ckpt, report
