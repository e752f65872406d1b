"""``lightning-immunize reproduce``: the paper's protocols (Section 5) for several methods and
seeds.

Every (method, seed, digit pair) of a protocol runs in one process; each finished run is
appended to ``<out>/runs.csv`` at once, so an interrupted sweep resumes where it stopped and
never repeats a finished run. At the end (and on every resume) the summary is rewritten:
``table.md``, the 10×10 ``heatmap_<method>.png`` maps of RIR for the digit protocols, and
``norm_ratio.png`` (the paper's Fig. 1) for house prices. The deep protocol (``deep-mnist``)
measures the deep RIR against θ_0 and the accuracy of linear-probing attackers epoch by epoch
(``probes/*.json``, the probe table in ``table.md`` and ``probe_accuracy.png``, Fig. 3).

Protocol defaults, including every method's tuned λ, live in ``configs/reproduce.yaml``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import shlex
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lightning_immunize.sides import DISPLAY_SIDES
from lightning_immunize.validation import unknown_choice

__all__ = [
    "PROTOCOLS",
    "RUN_COLUMNS",
    "Run",
    "build_parser",
    "load_protocols",
    "main",
    "plan_runs",
    "protocol_methods",
    "read_runs",
    "run_sweep",
    "sweep_command",
    "write_summary",
]

NAME = "reproduce"
SUMMARY = "the paper's protocols for several methods and seeds (resumable)"

PROTOCOLS = ("house-prices", "digits", "mnist", "deep-mnist")
#: Protocols with a deep extractor: RIR against θ_0, accuracy-curve probes.
DEEP_PROTOCOLS = ("deep-mnist",)
RUN_COLUMNS = [
    "method",
    "seed",
    "pretrain",
    "harmful",
    "rir",
    "ratio_harmful",
    "ratio_pretrain",
    "immunized",
    "kappa_harmful",
    "kappa_pretrain",
    "kappa_harmful_reference",
    "kappa_pretrain_reference",
    "task_metric",
    "task_metric_before",
    "task_metric_name",
    "rir_std",
    "ratio_harmful_std",
    "ratio_pretrain_std",
    "seconds",
]
DEFAULT_SPEC = Path(__file__).resolve().parents[2] / "configs" / "reproduce.yaml"


@dataclass(frozen=True)
class Run:
    """One run of a sweep; ``pretrain``/``harmful`` are digits, or ``None`` (house prices)."""

    method: str
    seed: int
    pretrain: int | None = None
    harmful: int | None = None

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.method, str(self.seed), _cell(self.pretrain), _cell(self.harmful))


def _cell(value: int | None) -> str:
    return "" if value is None else str(value)


def load_protocols(path: str | Path = DEFAULT_SPEC) -> dict[str, Any]:
    """The protocol table (``configs/reproduce.yaml``): base config, pairs, seeds, methods."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"protocol file not found: {path} (expected configs/reproduce.yaml)."
        )
    from lightning_immunize.objectives.registry import LEGACY_METHODS

    spec = yaml.safe_load(path.read_text())
    unknown = sorted(set(spec) - set(PROTOCOLS))
    if unknown:
        raise unknown_choice("protocol", unknown, PROTOCOLS, where=str(path))
    for protocol in spec.values():
        methods = protocol.get("methods") or {}
        for old, new in LEGACY_METHODS.items():
            if old in methods:
                methods[new] = methods.pop(old)
    return spec


def plan_runs(
    protocol: str,
    methods: Sequence[str],
    seeds: Sequence[int],
    pairs: Sequence[tuple[int, int]] | None,
) -> list[Run]:
    """Every run of a sweep, in order: pair-major so a partial sweep covers whole pairs."""
    from lightning_immunize.objectives.registry import check_methods

    methods = [_current_method(m) for m in methods]
    check_methods(methods)
    if protocol == "house-prices" or protocol in DEEP_PROTOCOLS:
        return [Run(m, s) for s in seeds for m in methods]
    pairs = pairs if pairs is not None else [(a, b) for a in range(10) for b in range(10) if a != b]
    return [Run(m, s, a, b) for (a, b) in pairs for s in seeds for m in methods]


def _current_method(method: str) -> str:
    from lightning_immunize.objectives.registry import LEGACY_METHODS

    if method in LEGACY_METHODS:
        warnings.warn(
            f"method {method!r} is now called {LEGACY_METHODS[method]!r}; the old name goes "
            "away in the next release.",
            DeprecationWarning,
            stacklevel=3,
        )
        return LEGACY_METHODS[method]
    return method


def read_runs(path: str | Path) -> list[dict[str, str]]:
    """Rows of ``runs.csv`` (empty when the file does not exist yet)."""
    from lightning_immunize.objectives.registry import LEGACY_METHODS

    path = Path(path)
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:  # files written before the reference row had its name
        row["method"] = LEGACY_METHODS.get(row["method"], row["method"])
    return rows


def _append_row(path: Path, row: dict[str, Any]) -> None:
    new = not path.is_file()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RUN_COLUMNS, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow({k: row.get(k, "") for k in RUN_COLUMNS})
        f.flush()


def _cli_args(protocol_spec: dict[str, Any], run: Run) -> list[str]:
    from lightning_immunize.objectives.registry import REFERENCE

    method_spec = protocol_spec["methods"].get(run.method) or {}
    args = [
        "--config",
        str(protocol_spec["config"]),
        "--seed_everything",
        str(run.seed),
        "--trainer.logger",
        "false",
        "--trainer.enable_checkpointing",
        "false",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        "--data.init_args.seed",
        str(run.seed),
    ]
    if run.pretrain is not None:
        args += ["--data.init_args.pretrain_digit", str(run.pretrain)]
        args += ["--data.init_args.harmful_digit", str(run.harmful)]
    if "seed_arg" in protocol_spec:  # e.g. the random init of the linear extractor
        args += [f"--{protocol_spec['seed_arg']}", str(run.seed)]
    if run.method != REFERENCE:
        args += ["--model.objective", "null", "--model.method", run.method]
        args += ["--model.method_args", json.dumps(method_spec.get("method_args", {}))]
    for key, value in (method_spec.get("overrides") or {}).items():
        args += [f"--{key}", str(value)]
    return args


def _execute_deep(protocol_spec: dict[str, Any], run: Run, out: Path) -> dict[str, Any]:
    """A deep run: θ_0 from its cache (or trained once), fit unless it is the reference row,
    the deep RIR against θ_0 and the probe accuracy curves (written to ``<out>/probes``)."""
    import copy

    from lightning_immunize.build import instantiate, load_theta0
    from lightning_immunize.evaluation.report import immunization_report, task_metric
    from lightning_immunize.evaluation.study import probe_accuracy_curves
    from lightning_immunize.objectives.registry import REFERENCE

    cli = instantiate(_cli_args(protocol_spec, run))
    module, datamodule = load_theta0(cli)
    reference = copy.deepcopy(module.extractor).eval()
    before = task_metric(module, datamodule)
    start = time.perf_counter()
    if run.method != REFERENCE:
        cli.trainer.fit(module, datamodule)
    seconds = time.perf_counter() - start
    probe = protocol_spec.get("probe", {})
    report = immunization_report(
        module,
        datamodule,
        reference_extractor=reference,
        num_groups=int(probe.get("num_groups", 20)),
        group_size=int(probe.get("group_size", 100)),
        seed=run.seed,
    )
    report["task_metric_before"] = before.get("task_metric", "")
    report["seconds"] = seconds
    curves = probe_accuracy_curves(
        module.extractor,
        datamodule,
        epochs=int(probe.get("epochs", 20)),
        adam_lr=float(probe.get("adam_lr", 1e-3)),
        batch_size=int(probe.get("batch_size", 64)),
        seed=run.seed,
    )
    probes_dir = out / "probes"
    probes_dir.mkdir(parents=True, exist_ok=True)
    (probes_dir / f"{run.method}_seed{run.seed}.json").write_text(json.dumps(curves) + "\n")
    return report


def _execute(protocol_spec: dict[str, Any], run: Run, curves_dir: Path | None) -> dict[str, Any]:
    import torch

    from lightning_immunize.build import instantiate
    from lightning_immunize.evaluation.report import immunization_report
    from lightning_immunize.models import LinearExtractor
    from lightning_immunize.objectives.registry import REFERENCE

    cli = instantiate(_cli_args(protocol_spec, run))
    module, datamodule = cli.model, cli.datamodule
    start = time.perf_counter()
    if run.method == REFERENCE:
        # The reference row: no training, the identity extractor (every ratio is 1).
        width = module.extractor.linear.in_features
        module.extractor = LinearExtractor(width, width, init="identity").to(torch.float64)
        datamodule.setup("fit")
    else:
        cli.trainer.fit(module, datamodule)
    seconds = time.perf_counter() - start
    module = module.to(torch.float64)
    report = immunization_report(module, datamodule)
    if run.method == REFERENCE:
        report.pop("task_metric", None)
    report["seconds"] = seconds
    if curves_dir is not None:
        _save_curves(module, datamodule, run, curves_dir)
    return report


def _save_curves(module: Any, datamodule: Any, run: Run, curves_dir: Path) -> None:
    """Exact-line-search norm-ratio curves of both sides (for ``norm_ratio.png``)."""
    import torch

    from lightning_immunize.evaluation.study import probing_study

    study = probing_study(
        module.extractor,
        datamodule.full_tensors("train"),
        None,
        ["gd_exact"],
        steps=200,
        task=getattr(datamodule, "task", None),
    )
    curves = {
        f"{side}_{model}": study.curves[side][model]["gd_exact"].norm_ratio
        for side in DISPLAY_SIDES
        for model in ("reference", "immunized")
    }
    curves_dir.mkdir(parents=True, exist_ok=True)
    torch.save(curves, curves_dir / f"{run.method}_seed{run.seed}.pt")


def run_sweep(
    protocol: str,
    out: str | Path,
    methods: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    pairs: Sequence[tuple[int, int]] | None = None,
    spec_path: str | Path = DEFAULT_SPEC,
    progress: bool = True,
    command: str | None = None,
) -> Path:
    """Run (or resume) a sweep and write its summary; returns ``<out>/table.md``.

    ``command`` is the command line that ran it, written into ``table.md`` as the way to
    regenerate it (default: the ``lightning-immunize reproduce`` line of these arguments).
    """
    if protocol not in PROTOCOLS:
        raise unknown_choice("protocol", protocol, PROTOCOLS)
    spec = load_protocols(spec_path)[protocol]
    methods = list(methods or spec.get("default_methods") or protocol_methods(spec))
    seeds = list(seeds or spec.get("seeds", [1]))
    if command is None:
        command = sweep_command(protocol, out, methods, seeds, pairs, spec_path)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    with contextlib.chdir(project_root(spec_path, spec["config"])):
        _run_planned(protocol, spec, out, methods, seeds, pairs, progress)
    return write_summary(protocol, out, command)


def protocol_methods(spec: dict[str, Any]) -> list[str]:
    """The methods a protocol configures (its ``methods:``), in the registry's order."""
    from lightning_immunize.objectives.registry import METHODS

    return [m for m in METHODS if m in (spec.get("methods") or {})]


def project_root(spec_path: str | Path, config: str | Path) -> Path:
    """The folder a protocol file's relative paths are written against (its ``config``, and
    the data paths inside that config): the spec's ``configs/`` parent, the spec's own folder,
    else this package's repository. ``reproduce`` runs there, from whatever directory it was
    started in.

    Raises:
        FileNotFoundError: ``config`` is found in none of them.
    """
    spec = Path(spec_path).resolve()
    candidates = [spec.parent.parent, spec.parent, DEFAULT_SPEC.parent.parent]
    for root in candidates:
        if (root / config).is_file():
            return root
    raise FileNotFoundError(
        f"config {config} of {spec} not found under {', '.join(map(str, candidates))}."
    )


def _run_planned(
    protocol: str,
    spec: dict[str, Any],
    out: Path,
    methods: list[str],
    seeds: list[int],
    pairs: Sequence[tuple[int, int]] | None,
    progress: bool,
) -> None:
    runs_csv = out / "runs.csv"
    done = {(r["method"], r["seed"], r["pretrain"], r["harmful"]) for r in read_runs(runs_csv)}
    todo = [r for r in plan_runs(protocol, methods, seeds, pairs) if r.key not in done]
    curves_dir = out / "curves" if protocol == "house-prices" else None
    from lightning_immunize.build import quiet_lightning

    with quiet_lightning():
        for run in _progress(todo, progress, protocol, len(done)):
            if protocol in DEEP_PROTOCOLS:
                report = _execute_deep(spec, run, out)
            else:
                report = _execute(spec, run, curves_dir)
            row = {**report, "method": run.method, "seed": run.seed}
            row["pretrain"], row["harmful"] = _cell(run.pretrain), _cell(run.harmful)
            _append_row(runs_csv, row)


def sweep_command(
    protocol: str,
    out: str | Path,
    methods: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    pairs: Sequence[tuple[int, int]] | None = None,
    spec_path: str | Path = DEFAULT_SPEC,
) -> str:
    """The ``lightning-immunize reproduce`` command line that runs this sweep."""
    words = ["lightning-immunize", "reproduce", protocol, "--out", str(out)]
    if methods:
        words += ["--methods", ",".join(methods)]
    if seeds:
        words += ["--seeds", ",".join(map(str, seeds))]
    if pairs:
        words += ["--pairs", ",".join(f"{a}-{b}" for a, b in pairs)]
    if Path(spec_path).resolve() != DEFAULT_SPEC.resolve():
        words += ["--spec", str(spec_path)]
    return shlex.join(words)


def _progress(todo: list[Run], enabled: bool, protocol: str, done: int) -> Iterator[Run]:
    if not enabled:
        yield from todo
        return
    from tqdm.auto import tqdm

    bar = tqdm(todo, desc=f"reproduce {protocol}", unit="run", initial=0, total=len(todo))
    if done:
        bar.write(f"resuming: {done} finished run(s) in runs.csv are kept, {len(todo)} to go")
    for run in bar:
        pair = "" if run.pretrain is None else f" pair ({run.pretrain}, {run.harmful})"
        bar.set_postfix_str(f"{run.method} seed {run.seed}{pair}")
        yield run


def _deep_summary(out: Path, rows: list[dict[str, str]]) -> list[str]:
    from lightning_immunize.evaluation.plots import plot_probe_accuracy
    from lightning_immunize.evaluation.study import read_probes
    from lightning_immunize.evaluation.tables import deep_summary_table, probe_table

    text = [
        "Deep RIR (Eq. 17) against θ_0 on G groups × n samples of the training "
        "split (the same groups for θ_0 and θ_I), group means; a run counts as **immunized** "
        "when RIR > 1, ratio_harmful > 1 and ratio_pretrain ≤ 1. Mean ± std over seeds.",
        "",
        deep_summary_table(rows),
        "",
    ]
    table, mean_curves = probe_table(read_probes(out))
    if table:
        text += ["## Probing attackers (Fig. 3)", "", table, ""]
        path = plot_probe_accuracy(mean_curves, out / "probe_accuracy.png")
        caption = "Probe accuracy per epoch, mean over seeds (Fig. 3)"
        text += [f"**{caption}**", "", f"![{caption}]({path.name})", ""]
    return text


def write_summary(protocol: str, out: str | Path, command: str | None = None) -> Path:
    """(Re)write ``table.md`` and the figures from ``runs.csv``."""
    from lightning_immunize.evaluation.tables import summary_table
    from lightning_immunize.objectives.registry import REFERENCE

    out = Path(out)
    rows = read_runs(out / "runs.csv")
    text = [f"# Reproduction: {protocol}", ""]
    if command:
        text += ["Regenerate with:", "", f"```bash\n{command}\n```", ""]
    if protocol in DEEP_PROTOCOLS:
        table = out / "table.md"
        table.write_text("\n".join(text + _deep_summary(out, rows)))
        return table
    text += [
        "A run counts as **immunized** when RIR > 1, ratio_harmful > 1 and ratio_pretrain ≤ 1 "
        "(Definition 3.1); κ by the input-rank rule (docs/numerical-rank.md). Mean ± std "
        "over runs.",
        "",
        summary_table(rows),
        "",
    ]
    from lightning_immunize.evaluation.plots import plot_heatmap, plot_method_curves

    figures = []
    if protocol in ("digits", "mnist"):
        for method in sorted({r["method"] for r in rows}):
            if method == REFERENCE:
                continue
            path = plot_heatmap(rows, method, out / f"heatmap_{method}.png")
            if path is not None:
                figures.append((f"RIR per digit pair: {method}", path.name))
    if protocol == "house-prices" and (out / "curves").is_dir():
        path = plot_method_curves(out / "curves", out / "norm_ratio.png")
        if path is not None:
            figures.append(("Norm-ratio curves, exact line search (Fig. 1)", path.name))
    for caption, name in figures:
        text += [f"**{caption}**", "", f"![{caption}]({name})", ""]
    table = out / "table.md"
    table.write_text("\n".join(text))
    return table


def build_parser() -> argparse.ArgumentParser:
    """The ``reproduce`` command's options."""
    parser = argparse.ArgumentParser(
        prog="lightning-immunize reproduce",
        description="Run a paper protocol for several methods and seeds (resumable) and write "
        "table.md and figures.",
    )
    parser.add_argument("protocol", choices=PROTOCOLS)
    parser.add_argument("--out", required=True, help="output folder (runs.csv, table.md, PNGs)")
    parser.add_argument(
        "--methods",
        default=None,
        help="comma-separated registered methods, e.g. reference,ours,sophon (default: the "
        "methods the protocol configures)",
    )
    parser.add_argument("--seeds", default=None, help="comma-separated seeds, e.g. 1,2,3")
    parser.add_argument(
        "--pairs", default=None, help="digit pairs 'a-b,c-d' (default: all 90 ordered pairs)"
    )
    parser.add_argument(
        "--spec", default=None, help="protocol file (default configs/reproduce.yaml)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str]) -> int:
    """Run ``reproduce`` with command-line arguments ``argv``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(list(argv))
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
