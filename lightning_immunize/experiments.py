"""The experiment runner behind ``lightning-immunize reproduce`` (SPEC §7–§8).

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

import csv
import json
import logging
import math
import statistics
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "PROTOCOLS",
    "RUN_COLUMNS",
    "Run",
    "load_protocols",
    "plan_runs",
    "read_runs",
    "run_sweep",
    "summary_table",
]

PROTOCOLS = ("house-prices", "digits", "mnist", "deep-mnist")
#: Protocols with a deep extractor: RIR against θ_0, accuracy-curve probes.
DEEP_PROTOCOLS = ("deep-mnist",)
METHODS = ("identity", "rmax_only", "imma", "opt", "ours")
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
#: Colour range of the RIR heat-maps (log scale, symmetric around 1).
RIR_SCALE = (1e-3, 1e3)
DEFAULT_SPEC = Path(__file__).resolve().parents[1] / "configs" / "reproduce.yaml"


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
    spec = yaml.safe_load(path.read_text())
    unknown = sorted(set(spec) - set(PROTOCOLS))
    if unknown:
        raise ValueError(f"{path}: unknown protocol(s) {unknown}; expected {list(PROTOCOLS)}.")
    return spec


def plan_runs(
    protocol: str,
    methods: Sequence[str],
    seeds: Sequence[int],
    pairs: Sequence[tuple[int, int]] | None,
) -> list[Run]:
    """Every run of a sweep, in order: pair-major so a partial sweep covers whole pairs."""
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"unknown method(s) {bad}; expected a subset of {list(METHODS)}.")
    if protocol == "house-prices" or protocol in DEEP_PROTOCOLS:
        return [Run(m, s) for s in seeds for m in methods]
    pairs = pairs if pairs is not None else [(a, b) for a in range(10) for b in range(10) if a != b]
    return [Run(m, s, a, b) for (a, b) in pairs for s in seeds for m in methods]


def read_runs(path: str | Path) -> list[dict[str, str]]:
    """Rows of ``runs.csv`` (empty when the file does not exist yet)."""
    path = Path(path)
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _append_row(path: Path, row: dict[str, Any]) -> None:
    new = not path.is_file()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RUN_COLUMNS, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow({k: row.get(k, "") for k in RUN_COLUMNS})
        f.flush()


def _cli_args(protocol_spec: dict[str, Any], run: Run) -> list[str]:
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
    if run.method != "identity":
        args += ["--model.objective", "null", "--model.method", run.method]
        args += ["--model.method_args", json.dumps(method_spec.get("method_args", {}))]
    for key, value in (method_spec.get("overrides") or {}).items():
        args += [f"--{key}", str(value)]
    return args


def _execute_deep(protocol_spec: dict[str, Any], run: Run, out: Path) -> dict[str, Any]:
    """A deep run: θ_0 from its cache (or trained once), fit unless ``identity``, the deep RIR
    against θ_0 and the probe accuracy curves (written to ``<out>/probes``)."""
    import copy

    from lightning_immunize.callbacks.pretrain import PretrainFromScratch
    from lightning_immunize.callbacks.probing import probe_accuracy_curves
    from lightning_immunize.callbacks.report import immunization_report, task_metric
    from lightning_immunize.cli import instantiate

    cli = instantiate(_cli_args(protocol_spec, run))
    module, datamodule = cli.model, cli.datamodule
    for callback in cli.trainer.callbacks:
        if isinstance(callback, PretrainFromScratch):
            callback.apply(module, datamodule)
    reference = copy.deepcopy(module.extractor).eval()
    before = task_metric(module, datamodule)
    start = time.perf_counter()
    if run.method != "identity":
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

    from lightning_immunize.callbacks.report import immunization_report
    from lightning_immunize.cli import instantiate
    from lightning_immunize.models import LinearExtractor

    cli = instantiate(_cli_args(protocol_spec, run))
    module, datamodule = cli.model, cli.datamodule
    start = time.perf_counter()
    if run.method == "identity":
        # The reference row: no training, the identity extractor (every ratio is 1).
        width = module.extractor.linear.in_features
        module.extractor = LinearExtractor(width, width, init="identity").to(torch.float64)
        datamodule.setup("fit")
    else:
        cli.trainer.fit(module, datamodule)
    seconds = time.perf_counter() - start
    module = module.to(torch.float64)
    report = immunization_report(module, datamodule)
    if run.method == "identity":
        report.pop("task_metric", None)
    report["seconds"] = seconds
    if curves_dir is not None:
        _save_curves(module, datamodule, run, curves_dir)
    return report


def _save_curves(module: Any, datamodule: Any, run: Run, curves_dir: Path) -> None:
    """Exact-line-search norm-ratio curves of both sides (for ``norm_ratio.png``)."""
    import torch

    from lightning_immunize.callbacks.probing import probing_study

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
        for side in ("harmful", "pretrain")
        for model in ("reference", "immunized")
    }
    curves_dir.mkdir(parents=True, exist_ok=True)
    torch.save(curves, curves_dir / f"{run.method}_seed{run.seed}.pt")


def _quiet() -> None:
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)


def run_sweep(
    protocol: str,
    out: str | Path,
    methods: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    pairs: Sequence[tuple[int, int]] | None = None,
    spec_path: str | Path = DEFAULT_SPEC,
    progress: bool = True,
) -> Path:
    """Run (or resume) a sweep and write its summary; returns ``<out>/table.md``."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {list(PROTOCOLS)}.")
    spec = load_protocols(spec_path)[protocol]
    methods = list(methods or spec.get("default_methods", METHODS))
    seeds = list(seeds or spec.get("seeds", [1]))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs_csv = out / "runs.csv"
    done = {(r["method"], r["seed"], r["pretrain"], r["harmful"]) for r in read_runs(runs_csv)}
    todo = [r for r in plan_runs(protocol, methods, seeds, pairs) if r.key not in done]
    curves_dir = out / "curves" if protocol == "house-prices" else None
    _quiet()
    for run in _progress(todo, progress, protocol, len(done)):
        if protocol in DEEP_PROTOCOLS:
            report = _execute_deep(spec, run, out)
        else:
            report = _execute(spec, run, curves_dir)
        row = {**report, "method": run.method, "seed": run.seed}
        row["pretrain"], row["harmful"] = _cell(run.pretrain), _cell(run.harmful)
        _append_row(runs_csv, row)
    return write_summary(protocol, out, spec.get("command"))


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


def _floats(rows: list[dict[str, str]], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key) not in ("", None)]


def _mean_std(values: list[float], digits: int = 3) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.{digits}g}"
    return f"{statistics.fmean(values):.{digits}g} ± {statistics.pstdev(values):.{digits}g}"


def method_order(present: Iterable[str], methods: Sequence[str] | None = None) -> list[str]:
    """The methods in ``present``, in the order of ``methods`` (default :data:`METHODS`), any
    others after them alphabetically."""
    present = set(present)
    order = [m for m in (methods or METHODS) if m in present]
    return order + sorted(present - set(order))


def summary_table(rows: list[dict[str, str]], methods: Sequence[str] | None = None) -> str:
    """Markdown: per method, mean ± std of the ratios, immunized count, task metric, time."""
    order = method_order({r["method"] for r in rows}, methods)
    metric = next((r["task_metric_name"] for r in rows if r.get("task_metric_name")), "task")
    lines = [
        f"| method | runs | ratio_harmful | ratio_pretrain | RIR | RIR median | immunized | "
        f"task {metric} | seconds / run | seconds total |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method in order:
        sel = [r for r in rows if r["method"] == method]
        rir = _floats(sel, "rir")
        immunized = sum(r["immunized"] == "True" for r in sel)
        seconds = _floats(sel, "seconds")
        lines.append(
            f"| {method} | {len(sel)} | {_mean_std(_floats(sel, 'ratio_harmful'))} | "
            f"{_mean_std(_floats(sel, 'ratio_pretrain'))} | {_mean_std(rir)} | "
            f"{statistics.median(rir):.3g} | {immunized} / {len(sel)} | "
            f"{_mean_std(_floats(sel, 'task_metric'))} | {statistics.fmean(seconds):.2f} | "
            f"{sum(seconds):.0f} |"
        )
    return "\n".join(lines)


#: Probe epochs whose accuracy the deep tables show.
PROBE_EPOCHS_SHOWN = (1, 5, 20)
#: Epochs-to-threshold: the fraction of θ_0's final probe accuracy to reach.
PROBE_FRACTION = 0.9


def read_probes(out: str | Path) -> dict[tuple[str, str], dict[str, dict[str, list[float]]]]:
    """Probe accuracy curves of a deep sweep, keyed ``(method, seed)``."""
    probes = {}
    for f in sorted((Path(out) / "probes").glob("*_seed*.json")):
        method, seed = f.stem.rsplit("_seed", 1)
        probes[(method, seed)] = json.loads(f.read_text())
    return probes


def deep_summary_table(rows: list[dict[str, str]], methods: Sequence[str] | None = None) -> str:
    """Markdown: per method, deep RIR figures (mean ± std over seeds of the group means),
    immunized count, D_P held-out accuracy of θ_0 and after, time."""
    order = method_order({r["method"] for r in rows}, methods)
    lines = [
        "| method | seeds | ratio_harmful | ratio_pretrain | RIR | immunized | "
        "D_P accuracy θ_0 | D_P accuracy after | change (points) | seconds / run |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method in order:
        sel = [r for r in rows if r["method"] == method]
        after, before = _floats(sel, "task_metric"), _floats(sel, "task_metric_before")
        change = [100 * (a - b) for a, b in zip(after, before, strict=False)]
        lines.append(
            f"| {method} | {len(sel)} | {_mean_std(_floats(sel, 'ratio_harmful'))} | "
            f"{_mean_std(_floats(sel, 'ratio_pretrain'))} | {_mean_std(_floats(sel, 'rir'))} | "
            f"{sum(r['immunized'] == 'True' for r in sel)} / {len(sel)} | "
            f"{_mean_std([100 * b for b in before], 4)} % | "
            f"{_mean_std([100 * a for a in after], 4)} % | {_mean_std(change, 2)} | "
            f"{statistics.fmean(_floats(sel, 'seconds')):.1f} |"
        )
    return "\n".join(lines)


def _epochs_to(curve: list[float], threshold: float) -> int | None:
    return next((e for e, acc in enumerate(curve) if acc >= threshold), None)


def probe_table(
    probes: dict[tuple[str, str], dict[str, dict[str, list[float]]]],
    reference: str = "identity",
    fraction: float = PROBE_FRACTION,
) -> tuple[str, dict[str, dict[str, dict[str, list[float]]]]]:
    """Markdown of the probing attackers, and the mean curves per method (for the figure).

    Per (optimizer, side, method): mean held-out accuracy after the epochs of
    :data:`PROBE_EPOCHS_SHOWN`, and per seed the epochs to reach ``fraction`` of θ_0's final
    accuracy (θ_0 = the ``reference`` run of the same seed; ``> cap`` when not reached), with
    a plain verdict against θ_0.
    """
    methods = method_order({k[0] for k in probes})
    seeds = sorted({k[1] for k in probes}, key=lambda v: (len(v), v))
    mean_curves: dict[str, dict[str, dict[str, list[float]]]] = {}
    for method in methods:
        runs = [probes[(method, s)] for s in seeds if (method, s) in probes]
        mean_curves[method] = {
            side: {
                opt: [statistics.fmean(c) for c in zip(*(r[side][opt] for r in runs), strict=True)]
                for opt in runs[0][side]
            }
            for side in runs[0]
        }
    if not probes:
        return "", mean_curves
    first = next(iter(probes.values()))
    cap = len(next(iter(first["harmful"].values()))) - 1
    shown = [e for e in PROBE_EPOCHS_SHOWN if e <= cap]
    lines = [
        f"Linear probe on frozen penultimate features, {cap} epochs; held-out accuracy (%, mean "
        f"over seeds) after {', '.join(map(str, shown))} epoch(s), and per seed the epochs to "
        f"reach {fraction:.0%} of θ_0's final accuracy (same seed; `> {cap}`: not reached).",
        "",
        "| optimizer | task | method | "
        + " | ".join(f"acc @{e}" for e in shown)
        + " | epochs to threshold (per seed) | vs θ_0 |",
        "|---|---|---|" + "---|" * len(shown) + "---|---|",
    ]
    for opt in ("sgd", "adam"):
        for side in ("harmful", "pretrain"):
            for method in methods:
                cells, slower, faster, compared = [], 0, 0, 0
                for seed in seeds:
                    run = probes.get((method, seed))
                    ref = probes.get((reference, seed))
                    if run is None or opt not in run.get(side, {}):
                        continue
                    if ref is None:
                        cells.append("—")
                        continue
                    threshold = fraction * ref[side][opt][-1]
                    e_run = _epochs_to(run[side][opt], threshold)
                    e_ref = _epochs_to(ref[side][opt], threshold)
                    cells.append(f"> {cap}" if e_run is None else str(e_run))
                    if method != reference:
                        compared += 1
                        a = cap + 1 if e_run is None else e_run
                        b = cap + 1 if e_ref is None else e_ref
                        slower += a > b
                        faster += a < b
                if not cells:
                    continue
                if method == reference or not compared:
                    verdict = "θ_0" if method == reference else "—"
                elif slower == compared:
                    verdict = "**slower** (every seed)"
                elif slower:
                    verdict = f"slower on {slower} of {compared} seeds"
                elif faster:
                    verdict = f"not slower (faster on {faster} of {compared})"
                else:
                    verdict = "not slower"
                accs = [f"{100 * mean_curves[method][side][opt][e]:.1f}" for e in shown]
                lines.append(
                    f"| {opt} | {'D_H' if side == 'harmful' else 'D_P'} | {method} | "
                    + " | ".join(accs)
                    + f" | {', '.join(cells)} | {verdict} |"
                )
    return "\n".join(lines), mean_curves


def _deep_summary(out: Path, rows: list[dict[str, str]]) -> list[str]:
    from lightning_immunize.callbacks.plots import plot_probe_accuracy

    text = [
        "Deep RIR of SPEC §6 (Eq. 17) against θ_0 on G groups × n samples of the training "
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
        "(SPEC §6); κ by the SPEC §2 input-rank rule. Mean ± std over runs.",
        "",
        summary_table(rows),
        "",
    ]
    figures = []
    if protocol in ("digits", "mnist"):
        for method in sorted({r["method"] for r in rows}):
            if method == "identity":
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


def plot_heatmap(rows: list[dict[str, str]], method: str, path: Path) -> Path | None:
    """10×10 map of RIR (log colour scale; immunized pairs marked ✓, others ✗), averaged over
    seeds. Rows: D_P digit, columns: D_H digit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import LogNorm

    sel = [r for r in rows if r["method"] == method and r["pretrain"] != ""]
    if not sel:
        return None
    rir = np.full((10, 10), np.nan)
    ok = np.zeros((10, 10), dtype=bool)
    cells: dict[tuple[int, int], list[dict[str, str]]] = {}
    for r in sel:
        cells.setdefault((int(r["pretrain"]), int(r["harmful"])), []).append(r)
    for (a, b), rs in cells.items():
        rir[a, b] = math.exp(statistics.fmean(math.log(max(float(r["rir"]), 1e-300)) for r in rs))
        ok[a, b] = all(r["immunized"] == "True" for r in rs)
    # One symmetric log scale for every method: RIR = 1 sits in the middle (yellow), immunizing
    # pairs are green, pairs made worse red, so maps of different methods compare at a glance.
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    image = ax.imshow(rir, norm=LogNorm(vmin=RIR_SCALE[0], vmax=RIR_SCALE[1]), cmap="RdYlGn")
    for a, b in cells:
        ax.text(
            b,
            a,
            "✓" if ok[a, b] else "✗",
            ha="center",
            va="center",
            fontsize=9,
            color="black" if ok[a, b] else "darkred",
        )
    ax.set_xticks(range(10))
    ax.set_yticks(range(10))
    ax.set_xlabel("harmful digit (D_H)")
    ax.set_ylabel("pre-training digit (D_P)")
    ax.set_title(f"{method}: RIR per pair — {int(ok.sum())}/{len(cells)} immunized (✓)")
    fig.colorbar(image, ax=ax, label="RIR (log scale, clipped to [1e-3, 1e3]; > 1 is good)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_method_curves(curves_dir: Path, path: Path, seed: int | None = None) -> Path | None:
    """Fig. 1: exact-line-search norm-ratio curves on D_H and D_P, every method and the
    identity (first seed found unless ``seed`` is given)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    files = sorted(curves_dir.glob("*_seed*.pt"))
    if seed is not None:
        files = [f for f in files if f.stem.endswith(f"_seed{seed}")]
    by_method: dict[str, Path] = {}
    for f in files:
        by_method.setdefault(f.stem.rsplit("_seed", 1)[0], f)
    if not by_method:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, side, title in zip(
        axes, ("harmful", "pretrain"), ("D_H (harmful)", "D_P (pre-training)"), strict=True
    ):
        reference = None
        for method in method_order(by_method):
            curves = torch.load(by_method[method], weights_only=True)
            reference = curves[f"{side}_reference"]
            if method != "identity":
                ax.semilogy(curves[f"{side}_immunized"].clamp_min(1e-16).numpy(), label=method)
        if reference is not None:
            ax.semilogy(reference.clamp_min(1e-16).numpy(), "k--", label="identity")
        ax.set_title(f"{title}: GD with exact line search")
        ax.set_xlabel("probing step t")
        ax.set_ylabel("‖w_t − w*‖ / ‖w_0 − w*‖")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Immunized: slower on D_H (higher curves), not slower on D_P")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
