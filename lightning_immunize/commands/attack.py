"""``lightning-immunize attack``: the durability report card of a trained run — worst-case
attacker searches against the immunized model, θ_0, a model from scratch (and, optionally, a
control), reported by resistance, stability, generalization and trainability. Resumable, and
shareable by several worker processes through one Optuna storage."""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_immunize.commands.run_arguments import add_run_arguments, resolve_run_arguments

__all__ = ["attack_checkpoint", "build_parser", "main"]

NAME = "attack"
SUMMARY = "durability report card: worst-case attackers against a run (resumable)"


def build_parser() -> argparse.ArgumentParser:
    """The ``attack`` command's options."""
    parser = argparse.ArgumentParser(
        prog="lightning-immunize attack",
        description="Durability report card of a run: worst-case attacker searches (probe, "
        "whitened probe, fine-tuning, LoRA) against the immunized model, θ_0 and a model from "
        "scratch, reported by resistance, stability, generalization and trainability. "
        "Resumable: run the same command again after an interruption.",
    )
    add_run_arguments(parser)
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
    return parser


def main(argv: Sequence[str]) -> int:
    """Run ``attack`` with command-line arguments ``argv``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(list(argv))
    config, ckpt, report = resolve_run_arguments(args, parser)
    if args.workers < 1:
        parser.error(f"--workers: expected an integer >= 1, got {args.workers}")

    from lightning_immunize.attacks.budgets import DEFAULT_BUDGETS, load_budget

    load_budget(args.budget, args.budgets or DEFAULT_BUDGETS)  # a bad name fails before loading
    if args.storage:
        from lightning_immunize.attacks.search import check_storage

        check_storage(args.storage)

    from lightning_immunize.run_folder import checkpoint_run

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
        raise RuntimeError(
            f"attack worker(s) failed: {'; '.join(failed)}; expected every worker to exit 0."
        )
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


def control_module(control: str | Path, immunized: Any) -> Any:
    """The control run's module (a run folder, or a checkpoint inside one), refused unless
    its extractor has the immunized extractor's parameter names and shapes."""
    from lightning_immunize.build import load_run, quiet_lightning
    from lightning_immunize.run_folder import resolve_run

    path = Path(control)
    found = resolve_run(path if path.is_dir() else path.parent.parent)
    ckpt = found.checkpoint if path.is_dir() else path
    with quiet_lightning():
        loaded = load_run(found.config, ckpt)
    extractor = loaded.module.extractor
    mine = {n: tuple(p.shape) for n, p in immunized.state_dict().items()}
    theirs = {n: tuple(p.shape) for n, p in extractor.state_dict().items()}
    if mine != theirs:
        differ = sorted(set(mine.items()) ^ set(theirs.items()))[:3]
        raise ValueError(
            f"--control {control}: its extractor is not the immunized model's architecture "
            f"(first differences: {differ}); expected a run of the same architecture."
        )
    return loaded.module


def attack_checkpoint(
    config: str | Path,
    ckpt: str | Path,
    out: str | Path,
    budget: str = "standard",
    budgets_path: str | Path | None = None,
    families: Sequence[str] | None = None,
    storage: str | None = None,
    run_report: str | Path | None = None,
    allow_data_mismatch: bool = False,
    progress: bool = True,
    command: str | None = None,
    control: str | Path | None = None,
) -> Path:
    """The durability card of a trained run (``card.md``, ``card.json``, ``trials.csv``,
    ``confirm.csv``, ``effort.png``, ``search.png`` in ``out``); resumes the searches ``out``
    (or ``storage``) already holds. ``control``: a run folder or checkpoint of the same config
    fitted with every immunization term off. Every check (budget, families, data sizes, the
    control's architecture) runs before the first trial."""
    import torch

    from lightning_immunize.attacks.budgets import DEFAULT_BUDGETS, load_budget
    from lightning_immunize.attacks.durability import CARD_NAME, durability_card
    from lightning_immunize.attacks.tasks import attack_tasks, released_models
    from lightning_immunize.build import load_run, quiet_lightning
    from lightning_immunize.evaluation.report import task_metric

    chosen = load_budget(budget, budgets_path or DEFAULT_BUDGETS)
    with quiet_lightning():
        run = load_run(
            config,
            ckpt,
            check_data=True,
            run_report=run_report,
            allow_data_mismatch=allow_data_mismatch,
        )
    stability = {"immunized": task_metric(run.module, run.datamodule).get("task_metric")}
    control_extractor = None
    if control is not None:
        control = control_module(control, run.module.extractor)
        control_extractor = control.extractor
        stability["control"] = task_metric(control, run.datamodule).get("task_metric")
    models = released_models(
        run.module.extractor, run.theta_0, chosen.space.seed, control_extractor
    )
    if "scratch" in models:
        holder = torch.nn.Module()
        holder.extractor, holder.head = run.theta_0, run.theta_0_head
        stability["reference"] = task_metric(holder, run.datamodule).get("task_metric")
    tasks = attack_tasks(
        run.datamodule, chosen.eval_samples, chosen.space.seed, stability, chosen.unseen_samples
    )
    meta = {"config": str(config), "checkpoint": str(ckpt)}
    if command:
        meta["command"] = command
    durability_card(models, tasks, chosen, out, families, storage, progress, meta)
    return Path(out) / CARD_NAME
