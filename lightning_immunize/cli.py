"""`lightning-immunize`: LightningCLI for ``fit`` / ``validate`` / ``test``, plus ``export``.

    lightning-immunize fit --config configs/digits.yaml [--trainer.default_root_dir DIR]
    lightning-immunize export --ckpt RUN/checkpoints/last.ckpt --out model.safetensors

At the end of ``fit`` the relative immunization ratio (Eq. 15) is computed on the training
split, printed, and written to ``immunization.json`` in the run's log directory.
Heavy imports (torch, Lightning, timm) happen only once a subcommand needs them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

DESCRIPTION = "Model immunization from a condition-number perspective (ICML 2025)."


def _lightning_cli(argv: Sequence[str] | None) -> int:
    from lightning_immunize.build import ImmunizationCLI

    ImmunizationCLI(
        argv,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": DESCRIPTION},
    )
    return 0


def _export(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lightning-immunize export",
        description="Write the immunized extractor's weights (safetensors) with metadata.",
    )
    parser.add_argument(
        "--ckpt", required=True, help="Lightning checkpoint of an ImmunizationModule"
    )
    parser.add_argument("--out", required=True, help="output file, ending in .safetensors")
    parser.add_argument(
        "--report",
        default=None,
        help="immunization.json to take the RIR figures from (default: the one of the "
        "checkpoint's run directory, if any)",
    )
    args = parser.parse_args(list(argv))

    from lightning_immunize.export import export_checkpoint

    out, metadata = export_checkpoint(args.ckpt, args.out, args.report)
    print(f"wrote {out} ({', '.join(f'{k}={v}' for k, v in metadata.items())})")
    return 0


def _evaluate(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lightning-immunize evaluate",
        description="Ratios, probing-attacker table and norm-ratio figures for a checkpoint "
        "(report.md beside the PNGs).",
    )
    parser.add_argument("--config", required=True, help="the YAML config the run was trained with")
    parser.add_argument("--ckpt", required=True, help="the trained checkpoint")
    parser.add_argument("--out", default=None, help="output folder (default: <run>/evaluation)")
    parser.add_argument("--steps", type=int, default=200, help="attacker steps T (default 200)")
    parser.add_argument("--tol", type=float, default=1e-3, help="norm-ratio tolerance")
    parser.add_argument("--split", default="train", help="data split to probe (default train)")
    parser.add_argument(
        "--attackers", default=None, help="comma-separated attacker names (default: all)"
    )
    args = parser.parse_args(list(argv))
    out = Path(args.out) if args.out else Path(args.ckpt).resolve().parent.parent / "evaluation"

    from lightning_immunize.experiments import evaluate_checkpoint

    report_md = evaluate_checkpoint(
        args.config,
        args.ckpt,
        out,
        steps=args.steps,
        tol=args.tol,
        split=args.split,
        attackers=args.attackers.split(",") if args.attackers else None,
    )
    print(f"wrote {report_md}")
    return 0


def _reproduce(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lightning-immunize reproduce",
        description="Run a paper protocol for several methods and seeds (resumable) and write "
        "table.md and figures.",
    )
    from lightning_immunize.experiments import PROTOCOLS  # yaml only: cheap

    parser.add_argument("protocol", choices=PROTOCOLS)
    parser.add_argument("--out", required=True, help="output folder (runs.csv, table.md, PNGs)")
    parser.add_argument(
        "--methods", default=None, help="comma-separated, e.g. identity,rmax_only,imma,opt,ours"
    )
    parser.add_argument("--seeds", default=None, help="comma-separated seeds, e.g. 1,2,3")
    parser.add_argument(
        "--pairs", default=None, help="digit pairs 'a-b,c-d' (default: all 90 ordered pairs)"
    )
    parser.add_argument(
        "--spec", default=None, help="protocol file (default configs/reproduce.yaml)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(list(argv))

    from lightning_immunize.experiments import DEFAULT_SPEC, run_sweep

    pairs = None
    if args.pairs:
        try:
            pairs = [tuple(int(d) for d in p.split("-")) for p in args.pairs.split(",")]
        except ValueError:
            parser.error(f"--pairs must look like '0-1,3-8', got {args.pairs!r}")
    table = run_sweep(
        args.protocol,
        args.out,
        methods=args.methods.split(",") if args.methods else None,
        seeds=[int(s) for s in args.seeds.split(",")] if args.seeds else None,
        pairs=pairs,
        spec_path=args.spec or DEFAULT_SPEC,
        progress=not args.no_progress,
    )
    print(table.read_text())
    return 0


SUBCOMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "export": _export,
    "evaluate": _evaluate,
    "reproduce": _reproduce,
}


def main(argv: Sequence[str] | None = None) -> int:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        return SUBCOMMANDS[argv[0]](argv[1:])
    if not argv:
        print(
            "usage: lightning-immunize {fit,validate,test,evaluate,export,reproduce} ...\n\n"
            f"{DESCRIPTION}\n\n"
            "  fit|validate|test  LightningCLI subcommands (--config configs/<name>.yaml)\n"
            "  evaluate           ratios, probing attackers and figures for a checkpoint\n"
            "  export             write the immunized extractor as .safetensors\n"
            "  reproduce          the paper's protocols for several methods and seeds\n\n"
            "Run `lightning-immunize fit --help` for every option."
        )
        return 0
    return _lightning_cli(None if from_command_line else argv)


if __name__ == "__main__":
    raise SystemExit(main())
