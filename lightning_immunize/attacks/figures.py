"""Figures of a durability card: attacker effort curves and search progress."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from lightning_immunize.attacks.card import CARD_MODELS, model_label
from lightning_immunize.evaluation.plots import pyplot, save_figure

COLORS = {
    "immunized": "tab:red",
    "reference": "tab:blue",
    "scratch": "tab:gray",
    "ceiling": "tab:purple",
    "control": "tab:orange",
}


def plot_effort(
    card: dict[str, Any], path: str | Path, condition: str = "resistance"
) -> Path | None:
    """Worst-case harmful score against attacker steps: one panel per (data budget, family),
    one curve per model (immunized, reference, scratch)."""
    panels = [(b, f, e) for b, fams in card.get(condition, {}).items() for f, e in fams.items()]
    if not panels:
        return None
    plt = pyplot()
    budgets = list(dict.fromkeys(b for b, _, _ in panels))
    families = list(dict.fromkeys(f for _, f, _ in panels))
    fig, axes = plt.subplots(
        len(budgets),
        len(families),
        squeeze=False,
        figsize=(3.2 * len(families), 2.8 * len(budgets)),
        sharey=True,
    )
    metric = card["metrics"].get(condition, "accuracy")
    for budget, family, entry in panels:
        ax = axes[budgets.index(budget)][families.index(family)]
        for model in CARD_MODELS:
            if model in entry:
                curve = entry[model]["worst_case"]
                ax.plot(
                    card["marks"],
                    curve,
                    marker="o",
                    ms=3,
                    color=COLORS.get(model),
                    label=model_label(card, model),
                )
                sd = entry[model].get("worst_case_sd")
                if sd:
                    low = [c - d for c, d in zip(curve, sd, strict=True)]
                    high = [c + d for c, d in zip(curve, sd, strict=True)]
                    ax.fill_between(card["marks"], low, high, color=COLORS.get(model), alpha=0.15)
        if entry.get("target") is not None and math.isfinite(entry["target"]):
            ax.axhline(entry["target"], color="k", lw=0.6, ls=":")
        ax.set_xscale("log")
        ax.set_title(f"{family}, n = {budget}", fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("attacker steps")
    for row in axes:
        row[0].set_ylabel(f"worst-case {metric}")
    _legend(fig, axes)
    return save_figure(fig, path, dpi=110)


def _legend(fig, axes) -> None:
    """One legend for every panel's lines (a model absent from the first panel included),
    below the panels."""
    seen: dict[str, Any] = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(label, handle)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.legend(list(seen.values()), list(seen), loc="lower center",
               ncol=min(len(seen), 6), fontsize=7, frameon=False)  # fmt: skip


def plot_search(
    rows: list[dict[str, Any]],
    path: str | Path,
    higher_is_better: bool = True,
    card: dict[str, Any] | None = None,
) -> Path | None:
    """Best-so-far search objective (mean score over the marks on the selection split)
    against trial number: one panel per (condition, family), one line per model and data
    budget; pruned trials (×) leave the best-so-far unchanged. A defence can make good
    configurations rarer without making the best one worse: the lines show both."""
    series: dict[tuple[str, str], dict[tuple[str, str], list[tuple[float, bool]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for row in sorted(rows, key=lambda r: int(r["trial"])):
        value = float(row["objective"]) if row["objective"] not in ("", None) else math.nan
        pruned = bool(row.get("pruned_at"))
        key = (row["condition"], row["family"])
        series[key][(row["model"], str(row["data_budget"]))].append((value, pruned))
    if not series:
        return None
    plt = pyplot()
    cols = min(len(series), 5)
    nrows = -(-len(series) // cols)
    fig, axes = plt.subplots(nrows, cols, squeeze=False, figsize=(3.2 * cols, 2.8 * nrows))
    budgets = sorted({b for lines in series.values() for _, b in lines})
    styles = ["-", "--", ":", "-."]
    for ax, ((condition, family), lines) in zip(axes.flat, series.items(), strict=False):
        for (model, budget), values in lines.items():
            best, current = [], math.nan
            for value, _ in values:
                if math.isfinite(value) and not (
                    math.isfinite(current)
                    and (value <= current if higher_is_better else value >= current)
                ):
                    current = value
                best.append(current)
            trials = range(1, len(best) + 1)
            style = styles[budgets.index(budget) % len(styles)]
            ax.plot(trials, best, color=COLORS.get(model), ls=style, lw=1.2,
                    label=f"{model_label(card or {}, model)}, n={budget}")  # fmt: skip
            cut = [(t, b) for t, (v, p), b in zip(trials, values, best, strict=True) if p]
            if cut:
                ax.plot(*zip(*cut, strict=True), "x", color=COLORS.get(model), ms=4)
        ax.set_title(f"{condition}: {family}", fontsize=9)
        ax.set_xlabel("trial")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(series) :]:
        ax.set_visible(False)
    for row in axes:
        row[0].set_ylabel("best-so-far A (selection)")
    _legend(fig, axes)
    return save_figure(fig, path, dpi=110)
