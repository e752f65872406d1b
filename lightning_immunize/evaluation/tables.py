"""Every markdown table the library writes: the evaluation report (``report.md``), the sweep
summaries (``table.md``) and the deep probing table."""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from typing import Any

from lightning_immunize.objectives.registry import LEGACY_METHODS, METHODS, REFERENCE
from lightning_immunize.sides import DISPLAY_SIDES

__all__ = [
    "LEGACY_METHODS",
    "METHODS",
    "REFERENCE",
    "method_label",
    "PROBE_EPOCHS_SHOWN",
    "PROBE_FRACTION",
    "deep_summary_table",
    "evaluation_markdown",
    "method_order",
    "probe_table",
    "summary_table",
]


def method_label(method: str, deep: bool = False) -> str:
    """A method's name in a table: the reference row says what the reference is."""
    if method == REFERENCE:
        return "reference (θ_0)" if deep else "reference (identity)"
    return method


def _verdict(progress_ratio: float) -> str:
    if progress_ratio != progress_ratio:  # NaN: the reference made no progress at all
        return "n/a"
    if progress_ratio < 0.8:
        return "slower"
    if progress_ratio > 1.25:
        return "faster"
    return "about the same"


def evaluation_markdown(
    report: dict[str, Any],
    study: Any,
    figures: dict[str, str],
    header: dict[str, str] | None = None,
) -> str:
    """``report.md``: the ratios table, the attacker table and the figures.

    ``study`` is a :class:`~lightning_immunize.evaluation.study.ProbingStudy`; ``figures``
    maps captions to relative PNG paths; ``header`` adds ``key: value`` lines on top.
    """
    T = study.steps
    lines = ["# Immunization report", ""]
    for key, value in (header or {}).items():
        lines.append(f"- **{key}**: {value}")
    lines += [
        "",
        "## Condition-number ratios (Eq. 15, Definition 3.1)",
        "",
        f"Reference: {study.reference_name}; split: {report.get('split', 'train')}.",
        "",
        "| figure | value | wanted |",
        "|---|---|---|",
        f"| RIR = ratio_H / ratio_P | {report['rir']:.4g} | > 1 |",
        f"| ratio_harmful = κ(S_H) / κ_ref(S_H) | {report['ratio_harmful']:.4g} | > 1 |",
        f"| ratio_pretrain = κ(S_P) / κ_ref(S_P) | {report['ratio_pretrain']:.4g} | ≤ 1 |",
        f"| κ(S_H): immunized / reference | {report['kappa_harmful']:.4g} / "
        f"{report['kappa_harmful_reference']:.4g} | |",
        f"| κ(S_P): immunized / reference | {report['kappa_pretrain']:.4g} / "
        f"{report['kappa_pretrain_reference']:.4g} | |",
    ]
    if "task_metric" in report:
        lines.append(
            f"| task {report['task_metric_name']} on D_P ({report['task_split']}) | "
            f"{report['task_metric']:.4g} | |"
        )
    lines += ["", f"**Immunized** (Definition 3.1): {'yes' if report['immunized'] else 'no'}.", ""]
    lines += [
        f"## Linear-probing attackers (T = {T} steps, tolerance {study.tolerance:g})",
        "",
        "Steps to reach `‖w_t − w*‖/‖w_0 − w*‖ ≤ tolerance` (`> T` when not reached) and the "
        "progress after T steps, `1 − norm_ratio(T)`. Ratios are immunized / reference: a "
        "progress ratio below 1 means the attacker got less far.",
        "",
        "These are the paper's attackers, each with its own step rule, measured by "
        "convergence to the optimum. The durability card (`lightning-immunize attack`) "
        "instead searches the optimizer and step size and scores held-out error at step "
        "marks: an attacker slowed here can still fit the harmful task as fast as on the "
        "reference there — the card's is the stronger attacker.",
        "",
        "| attacker | task | steps (reference) | steps (immunized) | steps ratio | "
        "progress (reference) | progress (immunized) | progress ratio | immunized vs reference |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rows = study.rows()
    for row in rows:
        ratio = row["steps_ratio"]
        lines.append(
            f"| {row['attacker']} | {'D_H' if row['side'] == 'harmful' else 'D_P'} | "
            f"{row['steps_reference_label']} | {row['steps_immunized_label']} | "
            f"{'—' if ratio is None else f'{ratio:.3g}'} | {row['progress_reference']:.4f} | "
            f"{row['progress_immunized']:.4f} | {row['progress_ratio']:.3g} | "
            f"{_verdict(row['progress_ratio'])} |"
        )
    by_side: dict[str, dict[str, list[str]]] = {"harmful": {}, "pretrain": {}}
    for row in rows:
        by_side[row["side"]].setdefault(_verdict(row["progress_ratio"]), []).append(row["attacker"])

    def names(side: str, verdict: str) -> str:
        found = by_side[side].get(verdict, [])
        return ", ".join(f"`{n}`" for n in found) if found else "none"

    faster_h = (
        f"; it speeds up: {names('harmful', 'faster')}" if by_side["harmful"].get("faster") else ""
    )
    lines += [
        "",
        "### What this shows",
        "",
        f"- On the harmful task D_H, immunization **slows**: {names('harmful', 'slower')}; "
        f"it does **not slow**: {names('harmful', 'about the same')}{faster_h}.",
        f"- On the pre-training task D_P (should not be slower): slower: "
        f"{names('pretrain', 'slower')}; about the same: {names('pretrain', 'about the same')}; "
        f"faster: {names('pretrain', 'faster')}.",
        "- A closed-form least-squares solve does not depend on the condition number: an "
        "attacker who can afford it is not slowed by this kind of immunization.",
        "",
        "## Figures",
        "",
    ]
    for caption, path in figures.items():
        lines += [f"**{caption}**", "", f"![{caption}]({path})", ""]
    return "\n".join(lines)


def _floats(rows: list[dict[str, str]], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key) not in ("", None)]


def _mean_std(values: list[float], digits: int = 3) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.{digits}g}"
    return f"{statistics.fmean(values):.{digits}g} ± {statistics.pstdev(values):.{digits}g}"


def method_order(present: Iterable[str], methods: Sequence[str] | None = None) -> list[str]:
    """The methods in ``present``, in the order of ``methods`` (default: the registry's,
    :data:`~lightning_immunize.objectives.METHODS`), any others after them alphabetically."""
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
            f"| {method_label(method)} | {len(sel)} | {_mean_std(_floats(sel, 'ratio_harmful'))} | "
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
            f"| {method_label(method, deep=True)} | {len(sel)} | "
            f"{_mean_std(_floats(sel, 'ratio_harmful'))} | "
            f"{_mean_std(_floats(sel, 'ratio_pretrain'))} | {_mean_std(_floats(sel, 'rir'))} | "
            f"{sum(r['immunized'] == 'True' for r in sel)} / {len(sel)} | "
            f"{_mean_std([100 * b for b in before], 4)} % | "
            f"{_mean_std([100 * a for a in after], 4)} % | {_mean_std(change, 2)} | "
            f"{statistics.fmean(_floats(sel, 'seconds')):.1f} |"
        )
    return "\n".join(lines)


def probe_table(
    probes: dict[tuple[str, str], dict[str, dict[str, list[float]]]],
    reference: str = REFERENCE,
    fraction: float = PROBE_FRACTION,
) -> tuple[str, dict[str, dict[str, dict[str, list[float]]]]]:
    """Markdown of the probing attackers, and the mean curves per method (for the figure).

    Per (optimizer, side, method): mean held-out accuracy after the epochs of
    :data:`PROBE_EPOCHS_SHOWN`, and per seed the epochs to reach ``fraction`` of θ_0's final
    accuracy (θ_0 = the ``reference`` run of the same seed; ``> cap`` when not reached), with
    a plain verdict against θ_0.
    """
    from lightning_immunize.probing import epochs_to_reach  # torch: keep this module cheap

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
        for side in DISPLAY_SIDES:
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
                    e_run = epochs_to_reach(run[side][opt], threshold)
                    e_ref = epochs_to_reach(ref[side][opt], threshold)
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
                    f"| {opt} | {'D_H' if side == 'harmful' else 'D_P'} | "
                    f"{method_label(method, deep=True)} | "
                    + " | ".join(accs)
                    + f" | {', '.join(cells)} | {verdict} |"
                )
    return "\n".join(lines), mean_curves
