"""``lightning-immunize export``: write a run's immunized extractor (safetensors) with its
method, λs, RIR figures and how far the fit got in the header."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

NAME = "export"
SUMMARY = (
    "write RUN/immunized.safetensors: the immunized extractor's weights,\n"
    "                     with method, λs, RIR and how far the fit got in its header"
)


def build_parser() -> argparse.ArgumentParser:
    """The ``export`` command's options."""
    parser = argparse.ArgumentParser(
        prog="lightning-immunize export",
        description="Write a run's immunized extractor (safetensors) with its method, λs and "
        "RIR figures in the header.",
    )
    parser.add_argument(
        "run", nargs="?", help="the run folder (lightning_logs/version_N): its last checkpoint"
    )
    parser.add_argument("--ckpt", help="a checkpoint instead of a run folder")
    parser.add_argument(
        "--out",
        default=None,
        help="output file, ending in .safetensors (default: <run>/immunized.safetensors)",
    )
    parser.add_argument(
        "--report",
        default=None,
        help="immunization.json to take the RIR figures from (default: the run's own)",
    )
    return parser


def main(argv: Sequence[str]) -> int:
    """Run ``export`` with command-line arguments ``argv``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(list(argv))
    if (args.run is None) == (args.ckpt is None):
        parser.error("give a run folder or --ckpt (one of the two)")

    from lightning_immunize.export import export_checkpoint
    from lightning_immunize.run_folder import resolve_run

    if args.out is None:
        if args.run is None:
            parser.error("--out is required with --ckpt (a run folder's default is inside it)")
        args.out = str(Path(args.run) / "immunized.safetensors")
    ckpt, report = args.ckpt, args.report
    if args.run is not None:
        run = resolve_run(args.run)
        ckpt, report = run.checkpoint, report or run.report
    out, metadata = export_checkpoint(ckpt, args.out, report)
    print(f"wrote {out} ({', '.join(f'{k}={v}' for k, v in metadata.items())})")
    return 0
