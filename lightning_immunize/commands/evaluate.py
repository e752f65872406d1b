"""``lightning-immunize evaluate``: the ratios, the probing-attacker table and the norm-ratio
figures of a trained run (``report.md`` beside the PNGs)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from lightning_immunize.commands.run_arguments import add_run_arguments, resolve_run_arguments

__all__ = ["build_parser", "evaluate_checkpoint", "main"]

NAME = "evaluate"
SUMMARY = "ratios, probing attackers and figures of a run folder (or --config --ckpt)"


def build_parser() -> argparse.ArgumentParser:
    """The ``evaluate`` command's options."""
    parser = argparse.ArgumentParser(
        prog="lightning-immunize evaluate",
        description="Ratios, probing-attacker table and norm-ratio figures of a run "
        "(report.md beside the PNGs).",
    )
    add_run_arguments(parser)
    parser.add_argument("--out", default=None, help="output folder (default: <run>/evaluation)")
    parser.add_argument("--steps", type=int, default=200, help="attacker steps T (default 200)")
    parser.add_argument("--tol", type=float, default=1e-3, help="norm-ratio tolerance")
    parser.add_argument("--split", default="train", help="data split to probe (default train)")
    parser.add_argument(
        "--attackers", default=None, help="comma-separated probing attackers (default: all)"
    )
    return parser


def main(argv: Sequence[str]) -> int:
    """Run ``evaluate`` with command-line arguments ``argv``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(list(argv))
    config, ckpt, report = resolve_run_arguments(args, parser)
    from lightning_immunize.run_folder import checkpoint_run

    out = Path(args.out) if args.out else checkpoint_run(Path(ckpt).resolve()) / "evaluation"
    report_md = evaluate_checkpoint(
        config,
        ckpt,
        out,
        steps=args.steps,
        tol=args.tol,
        split=args.split,
        attackers=args.attackers.split(",") if args.attackers else None,
        run_report=report,
        allow_data_mismatch=args.allow_data_mismatch,
    )
    print(f"wrote {report_md}")
    return 0


def evaluate_checkpoint(
    config: str | Path,
    ckpt: str | Path,
    out: str | Path,
    steps: int = 200,
    tol: float = 1e-3,
    split: str = "train",
    attackers: Sequence[str] | None = None,
    run_report: str | Path | None = None,
    allow_data_mismatch: bool = False,
) -> Path:
    """Write ``report.md``, ``ratios.json``, ``curves.csv`` and PNG figures into ``out``.

    ``run_report`` is the run's ``immunization.json`` (default: the one beside ``ckpt``'s
    ``checkpoints/`` folder, if any): data whose fingerprint differs from the one it records
    are refused before any work, unless ``allow_data_mismatch``.
    """
    from lightning_immunize.build import load_run
    from lightning_immunize.evaluation.plots import plot_attackers, plot_norm_ratio
    from lightning_immunize.evaluation.report import immunization_report
    from lightning_immunize.evaluation.study import probing_study
    from lightning_immunize.evaluation.tables import evaluation_markdown
    from lightning_immunize.models import LinearExtractor

    run = load_run(
        config,
        ckpt,
        check_data=True,
        run_report=run_report,
        allow_data_mismatch=allow_data_mismatch,
    )
    module, datamodule = run.module, run.datamodule
    linear = isinstance(module.extractor, LinearExtractor)
    reference = None if linear else run.theta_0
    report = immunization_report(module, datamodule, split, reference_extractor=reference)
    study = probing_study(
        module.extractor,
        datamodule.full_tensors(split),
        reference,
        attackers,
        steps,
        tol,
        task=getattr(datamodule, "task", None),
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ratios.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    study.write_csv(out / "curves.csv")
    plot_norm_ratio(study, out / "norm_ratio.png")
    plot_attackers(study, out / "attackers.png")
    figures = {
        "Norm-ratio curves, GD with exact line search (D_H left, D_P right)": "norm_ratio.png",
        "Every attacker": "attackers.png",
    }
    header = {"config": str(config), "checkpoint": str(ckpt)}
    if "method" in report:
        header["method"] = f"{report['method']} {report.get('objective', {})}"
    path = out / "report.md"
    path.write_text(evaluation_markdown(report, study, figures, header) + "\n")
    return path
