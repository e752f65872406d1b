"""`lightning-immunize`: LightningCLI for ``fit`` / ``validate`` / ``test``, plus ``export``.

    lightning-immunize fit --config configs/digits.yaml [--trainer.default_root_dir DIR]
    lightning-immunize export RUN                  # → RUN/immunized.safetensors
    lightning-immunize attack RUN --budget quick

At the end of ``fit`` the relative immunization ratio (Eq. 15) is computed on the training
split, printed, and written to ``immunization.json`` in the run's log directory.
Heavy imports (torch, Lightning, timm) happen only once a subcommand needs them.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

DESCRIPTION = "Model immunization from a condition-number perspective (ICML 2025)."


def _lightning_cli(argv: Sequence[str] | None) -> int:
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from lightning_immunize.build import ImmunizationCLI, known_noise_filtered
    from lightning_immunize.interruption import Interrupted, stop_requests

    try:
        with known_noise_filtered():
            ImmunizationCLI(
                argv,
                save_config_kwargs={"overwrite": True},
                parser_kwargs={"description": DESCRIPTION},
            )
    except SIGTERMException as stop:  # Lightning's own SIGTERM stop, a SystemExit with status 0
        raise Interrupted(signal.SIGTERM, stop_requests.detail) from stop
    return 0


def _export(argv: Sequence[str]) -> int:
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


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """A run folder, or ``--config`` and ``--ckpt`` (each overriding the run's own)."""
    parser.add_argument(
        "run",
        nargs="?",
        help="the run folder (lightning_logs/version_N): its saved config and last checkpoint",
    )
    parser.add_argument("--config", help="a YAML config instead of the run's own")
    parser.add_argument("--ckpt", help="a checkpoint instead of the run's last one")


def _resolve_run_arguments(args: argparse.Namespace) -> tuple[str, str, str | None]:
    """``(config, checkpoint, immunization.json or None)`` from :func:`_add_run_arguments`."""
    from lightning_immunize.run_folder import resolve_run

    config, ckpt, report = args.config, args.ckpt, None
    if args.run is not None:
        run = resolve_run(args.run)
        config, ckpt, report = config or run.config, ckpt or run.checkpoint, run.report
    return config, ckpt, report


def _evaluate(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lightning-immunize evaluate",
        description="Ratios, probing-attacker table and norm-ratio figures of a run "
        "(report.md beside the PNGs).",
    )
    _add_run_arguments(parser)
    parser.add_argument("--out", default=None, help="output folder (default: <run>/evaluation)")
    parser.add_argument("--steps", type=int, default=200, help="attacker steps T (default 200)")
    parser.add_argument("--tol", type=float, default=1e-3, help="norm-ratio tolerance")
    parser.add_argument("--split", default="train", help="data split to probe (default train)")
    parser.add_argument(
        "--attackers", default=None, help="comma-separated attacker names (default: all)"
    )
    parser.add_argument(
        "--allow-data-mismatch",
        action="store_true",
        help="measure on data whose fingerprint differs from the run's training data",
    )
    args = parser.parse_args(list(argv))
    if args.run is None and not (args.config and args.ckpt):
        parser.error("give a run folder, or both --config and --ckpt")

    from lightning_immunize.experiments import evaluate_checkpoint
    from lightning_immunize.run_folder import checkpoint_run

    config, ckpt, report = _resolve_run_arguments(args)
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
        command=shlex.join(["lightning-immunize", "reproduce", *argv]),
    )
    print(table.read_text())
    return 0


def _attack(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lightning-immunize attack",
        description="Durability report card of a run: worst-case attacker searches (probe, "
        "whitened probe, fine-tuning, LoRA) against the immunized model, θ_0 and a model from "
        "scratch, reported by resistance, stability, generalization and trainability. "
        "Resumable: run the same command again after an interruption.",
    )
    _add_run_arguments(parser)
    parser.add_argument(
        "--out", default=None, help="output folder (default: <run>/attack-<budget>)"
    )
    parser.add_argument(
        "--budget",
        default="standard",
        help="quick, standard, long or durable (or one of --budgets)",
    )
    parser.add_argument(
        "--budgets", default=None, help="budgets file (default configs/attack.yaml)"
    )
    parser.add_argument(
        "--families", default=None, help="comma-separated attacker families (default: the budget's)"
    )
    parser.add_argument(
        "--storage",
        default=None,
        help="Optuna storage URL shared by several machines (default: SQLite in --out)",
    )
    parser.add_argument(
        "--allow-data-mismatch",
        action="store_true",
        help="attack on data whose fingerprint differs from the run's training data",
    )
    parser.add_argument(
        "--control",
        default=None,
        help="run folder (or checkpoint) of the control: the same config fitted with every "
        "immunization term off (e.g. --model.objective.init_args.lambda_harmful 0 "
        "--model.objective.init_args.lambda_pretrain 0); the card then separates the "
        "immunization from the extra training",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes on this machine sharing the search through the storage, each with "
        "its share of the CPU threads (default 1); every worker writes the same card",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(list(argv))
    if args.run is None and not (args.config and args.ckpt):
        parser.error("give a run folder, or both --config and --ckpt")
    if args.workers < 1:
        parser.error(f"--workers: expected an integer >= 1, got {args.workers}")

    from lightning_immunize.attacks.budgets import DEFAULT_BUDGETS, load_budget

    load_budget(args.budget, args.budgets or DEFAULT_BUDGETS)  # a bad name fails before loading
    if args.storage:
        from lightning_immunize.attacks.search import check_storage

        check_storage(args.storage)

    from lightning_immunize.experiments import attack_checkpoint
    from lightning_immunize.run_folder import checkpoint_run

    config, ckpt, report = _resolve_run_arguments(args)
    default_out = checkpoint_run(Path(ckpt).resolve()) / f"attack-{args.budget}"
    out = Path(args.out) if args.out else default_out
    storage, helpers = args.storage, []
    if args.workers > 1:
        storage, helpers = _start_workers(argv, out, args.workers, storage)
    try:
        card = attack_checkpoint(
            config,
            ckpt,
            out,
            budget=args.budget,
            budgets_path=args.budgets,
            families=args.families.split(",") if args.families else None,
            storage=storage,
            run_report=report,
            allow_data_mismatch=args.allow_data_mismatch,
            progress=not args.no_progress,
            command=shlex.join(["lightning-immunize", "attack", *argv]),
            control=args.control,
        )
    except BaseException:
        _stop_workers(helpers, stop=True)
        raise
    failed = _stop_workers(helpers)
    if failed:
        raise RuntimeError(f"attack worker(s) failed: {'; '.join(failed)}")
    print(f"wrote {card}")
    return 0


def _start_workers(argv: Sequence[str], out: Path, workers: int, storage: str | None):
    """Start ``workers − 1`` more ``attack`` processes on the same storage (SQLite in ``out``
    by default), each — and this one — with ``cpu_count // workers`` torch threads; their
    cards go to ``out/workers/k``. Returns ``(storage URL, processes)``."""
    import os
    import subprocess
    import sys

    import torch

    from lightning_immunize.attacks.search import sqlite_url
    from lightning_immunize.attacks.sweep import STUDIES_NAME

    out.mkdir(parents=True, exist_ok=True)
    storage = storage or sqlite_url(out.resolve() / STUDIES_NAME)
    threads = max(1, (os.cpu_count() or 1) // workers)
    torch.set_num_threads(threads)
    drop = {"--workers", "--out", "--storage"}
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in drop:
            skip = "=" not in arg
            continue
        kept.append(arg)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    processes = []
    for k in range(1, workers):
        log = (out / "workers").joinpath(f"{k}.log")
        log.parent.mkdir(parents=True, exist_ok=True)
        folder = str(out / "workers" / str(k))
        command = [sys.executable, "-m", "lightning_immunize.cli", "attack", *kept,
                   "--storage", storage, "--out", folder, "--no-progress"]  # fmt: skip
        handle = log.open("w")
        processes.append((subprocess.Popen(command, stdout=handle, stderr=handle, env=env), log))
    return storage, processes


def _stop_workers(processes, stop: bool = False) -> list[str]:
    """Wait for the helper workers (``stop``: terminate them first, this one having failed);
    returns their failures."""
    failed = []
    for process, log in processes:
        if stop:
            process.terminate()
        code = process.wait()
        if code != 0 and not stop:
            failed.append(f"exit {code}, see {log}")
    return failed


SUBCOMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "attack": _attack,
    "export": _export,
    "evaluate": _evaluate,
    "reproduce": _reproduce,
}


USAGE = f"""usage: lightning-immunize {{fit,validate,test,evaluate,attack,export,reproduce}} ...
                          [--debug]

{DESCRIPTION}

  fit                train (immunize) a model from a YAML config: --config configs/<name>.yaml
  validate, test     LightningCLI's own subcommands on the same configs
  evaluate           ratios, probing attackers and figures of a run folder (or --config --ckpt)
  attack             durability report card: worst-case attackers against a run (resumable)
  export             write RUN/immunized.safetensors: the immunized extractor's weights,
                     with method, λs, RIR and how far the fit got in its header
  reproduce          the paper's protocols for several methods and seeds (resumable)

`lightning-immunize SUBCOMMAND --help` lists a subcommand's options. --debug shows the full
traceback of an error instead of one line."""

#: Errors shown as one line (exit status 2) on the command line; ``--debug`` keeps tracebacks.
USER_ERRORS = (ValueError, TypeError, FileNotFoundError)


def _error_line(error: BaseException) -> str:
    """Our own message from an error, also when jsonargparse wrapped it in a Union error."""
    text = str(error)
    if "Errors:" in text:  # jsonargparse: "Errors:\n  - <ours>\n  - Expected a <class ...>"
        lines = text.split("Errors:", 1)[1].splitlines()
        ours = [ln.strip()[2:] for ln in lines if ln.strip().startswith("- ")]
        ours = [m for m in ours if not m.startswith("Expected a <class")]
        if ours:
            return "; ".join(ours)
    return f"{type(error).__name__}: {text}" if not text.endswith(".") else text


def main(argv: Sequence[str] | None = None) -> int:
    """The console script. In-process callers (``argv`` given) get exceptions as they are; on
    the command line a user error is one line on stderr and exit status 2."""
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    from lightning_immunize.interruption import Interrupted, stop_requests

    try:
        with stop_requests.installed():
            if argv[0] in SUBCOMMANDS:
                return SUBCOMMANDS[argv[0]](argv[1:])
            if from_command_line:
                sys.argv[1:] = argv  # LightningCLI reads sys.argv itself; --debug is ours
                return _lightning_cli(None)
            return _lightning_cli(argv)
    except (Interrupted, KeyboardInterrupt) as stop:
        if debug or not from_command_line:
            raise
        if not isinstance(stop, Interrupted):
            stop = Interrupted(signal.SIGINT)
        hint = ""
        if not stop.detail:
            hint = (
                " Resume with the same command plus --ckpt_path last if the run has a "
                "checkpoints/last.ckpt."
                if argv[0] == "fit"
                else " Run the same command again to resume."
            )
        print(f"lightning-immunize: {str(stop).rstrip('.')}.{hint}", file=sys.stderr)
        return stop.exit_status
    except USER_ERRORS as error:
        if debug or not from_command_line:
            raise
        print(f"lightning-immunize: error: {_error_line(error)}", file=sys.stderr)
        print("(run again with --debug for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
