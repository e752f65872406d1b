"""`lightning-immunize`: LightningCLI for ``fit`` / ``validate`` / ``test``, plus ``export``.

    lightning-immunize fit --config configs/digits.yaml [--trainer.default_root_dir DIR]
    lightning-immunize export --ckpt RUN/checkpoints/last.ckpt --out model.safetensors

At the end of ``fit`` the RIR of SPEC §6 is computed on the training split, printed, and
written to ``immunization.json`` in the run's log directory (``trainer.log_dir``).
Heavy imports (torch, Lightning, timm) happen only once a subcommand needs them.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

DESCRIPTION = "Model immunization from a condition-number perspective (ICML 2025)."


def _lightning_cli(argv: Sequence[str] | None) -> int:
    from lightning.pytorch.cli import LightningCLI

    from lightning_immunize.callbacks.report import ImmunizationReport
    from lightning_immunize.datamodules import PairedDataModule
    from lightning_immunize.module import ImmunizationModule

    class ImmunizeCLI(LightningCLI):
        def before_fit(self) -> None:
            if not any(isinstance(cb, ImmunizationReport) for cb in self.trainer.callbacks):
                self.trainer.callbacks.append(ImmunizationReport())

    ImmunizeCLI(
        ImmunizationModule,
        PairedDataModule,
        subclass_mode_data=True,
        args=None if argv is None else list(argv),
        auto_configure_optimizers=False,
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

    from lightning_immunize.export import export_extractor, load_checkpoint

    ckpt = load_checkpoint(args.ckpt)
    metadata = dict(ckpt.get("immunization", {}))
    report_path = (
        Path(args.report) if args.report else Path(args.ckpt).parent.parent / "immunization.json"
    )
    if report_path.is_file():
        report = json.loads(report_path.read_text())
        for key in ("rir", "ratio_harmful", "ratio_pretrain", "immunized"):
            if key in report:
                metadata[key] = report[key]
    elif args.report:
        raise FileNotFoundError(f"report not found: {report_path}")
    out = export_extractor(ckpt["state_dict"], args.out, metadata)
    print(f"wrote {out} ({', '.join(f'{k}={v}' for k, v in metadata.items())})")
    return 0


SUBCOMMANDS: dict[str, Callable[[Sequence[str]], int]] = {"export": _export}


def main(argv: Sequence[str] | None = None) -> int:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        return SUBCOMMANDS[argv[0]](argv[1:])
    if not argv:
        print(
            f"usage: lightning-immunize {{fit,validate,test,export}} ...\n\n{DESCRIPTION}\n\n"
            "  fit|validate|test  LightningCLI subcommands (--config configs/<name>.yaml)\n"
            "  export             write the immunized extractor as .safetensors\n\n"
            "Run `lightning-immunize fit --help` for every option."
        )
        return 0
    return _lightning_cli(None if from_command_line else argv)


if __name__ == "__main__":
    raise SystemExit(main())
