"""Figures of a durability card: attacker effort curves and search progress."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from lightning_immunize.attacks.card import model_label
from lightning_immunize.evaluation.plots import _pyplot, _save

COLORS = {"immunized": "tab:red", "reference": "tab:blue", "scratch": "tab:gray"}


def plot_effort(
    card: dict[str, Any], path: str | Path, condition: str = "resistance"
) -> Path | None:
    """Worst-case harmful score against attacker steps: one panel per (data budget, family),
    one curve per model (immunized, reference, scratch)."""
    panels = [(b, f, e) for b, fams in card.get(condition, {}).items() for f, e in fams.items()]
    if not panels:
        return None
    plt = _pyplot()
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
        for model in ("reference", "immunized", "scratch"):
            if model in entry:
                curve = entry[model]["worst_case"]
                ax.plot(
                    card["marks"],
                    curve,
                    marker="o",
                    ms=3,
                    color=COLORS[model],
                    label=model_label(card, model),
                )
        if entry.get("target") is not None and math.isfinite(entry["target"]):
            ax.axhline(entry["target"], color="k", lw=0.6, ls=":")
        ax.set_xscale("log")
        ax.set_title(f"{family}, n = {budget}", fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("attacker steps")
    for row in axes:
        row[0].set_ylabel(f"worst-case {metric}")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path, dpi=110)


def plot_search(
    rows: list[dict[str, Any]],
    path: str | Path,
    higher_is_better: bool = True,
    card: dict[str, Any] | None = None,
) -> Path | None:
    """Best-so-far search objective against trial number, one panel per family, resistance
    studies only (one line per model and data budget)."""
    series: dict[str, dict[tuple[str, str], list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if row["condition"] == "resistance":
            series[row["family"]][(row["model"], str(row["data_budget"]))].append(
                float(row["objective"])
            )
    if not series:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(series), squeeze=False, figsize=(3.2 * len(series), 2.8))
    pick = max if higher_is_better else min
    for ax, (family, lines) in zip(axes[0], series.items(), strict=True):
        for (model, budget), values in lines.items():
            best = [pick(values[: i + 1]) for i in range(len(values))]
            ax.plot(
                range(1, len(best) + 1),
                best,
                marker="o",
                ms=3,
                color=COLORS[model],
                ls="-" if budget == "all" else "--",
                label=f"{model_label(card or {}, model)}, n={budget}",
            )
        ax.set_title(family, fontsize=9)
        ax.set_xlabel("trial")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("best-so-far objective")
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    return _save(fig, path, dpi=110)
