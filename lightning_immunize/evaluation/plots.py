"""Every figure: norm-ratio curves of the probing attackers (Eq. 16, the paper's Fig. 1),
probe accuracy per epoch (Fig. 3) and the RIR heat-maps of the digit pairs (Fig. 2).

matplotlib is imported lazily with the non-interactive Agg backend (one set-up,
:func:`pyplot`), so plotting works on a machine without a display and costs nothing until a
figure is drawn; every figure is written by :func:`_save`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from lightning_immunize.evaluation.tables import (
    LEGACY_METHODS,
    REFERENCE,
    method_label,
    method_order,
)
from lightning_immunize.sides import DISPLAY_SIDES

if TYPE_CHECKING:
    from lightning_immunize.evaluation.study import ProbingStudy

__all__ = [
    "RIR_SCALE",
    "plot_attackers",
    "plot_heatmap",
    "plot_method_curves",
    "plot_norm_ratio",
    "plot_probe_accuracy",
]

SIDE_TITLES = {"harmful": "harmful task D_H", "pretrain": "pre-training task D_P"}
ATTACKER_TITLES = {
    "gd_exact": "GD, exact line search",
    "gd_fixed": "GD, fixed step 1/L",
    "adam": "Adam",
    "lbfgs": "L-BFGS",
    "closed_form": "closed-form solve",
}


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _panel(ax, study: ProbingStudy, side: str, attacker: str, title: str) -> None:
    styles = {
        "reference": ("--", f"reference ({study.reference_name})"),
        "immunized": ("-", "immunized"),
    }
    for model, (style, label) in styles.items():
        curve = study.curves[side][model][attacker].norm_ratio.clamp_min(1e-16).numpy()
        ax.semilogy(range(len(curve)), curve, style, label=label)
    ax.axhline(
        study.tolerance, color="grey", lw=0.8, ls=":", label=f"tolerance {study.tolerance:g}"
    )
    ax.set_title(title)
    ax.set_xlabel("probing step t")
    ax.set_ylabel("‖w_t − w*‖ / ‖w_0 − w*‖")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def plot_norm_ratio(
    study: ProbingStudy, path: str | Path, attacker: str = "gd_exact", dpi: int = 120
) -> Path:
    """Two panels (D_H, D_P): the attacker's norm-ratio curve for the reference and the
    immunized extractor. Returns the PNG's path."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, side in zip(axes, DISPLAY_SIDES, strict=True):
        _panel(
            ax,
            study,
            side,
            attacker,
            f"{SIDE_TITLES[side]}: {ATTACKER_TITLES.get(attacker, attacker)}",
        )
    fig.suptitle("Linear probing on frozen features: the harmful task should converge slower")
    fig.tight_layout()
    return save_figure(fig, path, dpi)


def plot_attackers(
    study: ProbingStudy, path: str | Path, attackers: Sequence[str] | None = None, dpi: int = 100
) -> Path:
    """A grid: one row per attacker, columns D_H and D_P."""
    plt = pyplot()
    names = list(attackers or study.attackers)
    fig, axes = plt.subplots(len(names), 2, figsize=(10, 3.2 * len(names)), squeeze=False)
    for row, name in zip(axes, names, strict=True):
        for ax, side in zip(row, DISPLAY_SIDES, strict=True):
            _panel(
                ax, study, side, name, f"{ATTACKER_TITLES.get(name, name)} — {SIDE_TITLES[side]}"
            )
    fig.tight_layout()
    return save_figure(fig, path, dpi)


def save_figure(fig, path: str | Path, dpi: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


PROBE_TITLES = {"sgd": "SGD, fixed step 1/λ_max", "adam": "Adam"}


def plot_probe_accuracy(
    curves: dict[str, dict[str, dict[str, Sequence[float]]]],
    path: str | Path,
    reference: str = REFERENCE,
    threshold: dict[str, dict[str, float]] | None = None,
) -> Path:
    """The paper's Fig. 3: held-out accuracy of a linear probe epoch by epoch, one panel per
    (optimizer, side), one curve per method; ``reference`` (θ_0) is drawn dashed.

    ``curves[method][side][optimizer]`` is an accuracy curve (epoch 0 … E); ``threshold``
    (``[side][optimizer]``) adds a dotted line at the accuracy the epochs-to-threshold
    figures refer to.
    """
    plt = pyplot()
    path = Path(path)
    methods = list(curves)
    sides = [s for s in SIDE_TITLES if any(s in curves[m] for m in methods)]
    optimizers = [
        o for o in PROBE_TITLES if any(o in curves[m].get(s, {}) for m in methods for s in sides)
    ]
    fig, axes = plt.subplots(
        len(optimizers),
        len(sides),
        figsize=(5.5 * len(sides), 3.8 * len(optimizers)),
        squeeze=False,
        sharex=True,
    )
    for i, opt in enumerate(optimizers):
        for j, side in enumerate(sides):
            ax = axes[i][j]
            for method in methods:
                curve = curves[method].get(side, {}).get(opt)
                if curve is None:
                    continue
                is_ref = method == reference
                ax.plot(
                    range(len(curve)),
                    curve,
                    "k--" if is_ref else "-",
                    label="θ_0 (not immunized)" if is_ref else method,
                    linewidth=2 if is_ref or method == "ours" else 1.2,
                )
            if threshold and side in threshold and opt in threshold[side]:
                ax.axhline(threshold[side][opt], color="grey", linestyle=":", linewidth=1)
            ax.set_title(f"{SIDE_TITLES[side]}: {PROBE_TITLES[opt]}")
            ax.set_xlabel("probe epoch")
            ax.set_ylabel("held-out accuracy")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8, loc="lower right")
    fig.suptitle("Linear probe on frozen features: immunized should be slower on D_H only")
    fig.tight_layout()
    return save_figure(fig, path, 110)


#: Colour range of the RIR heat-maps (log scale, symmetric around 1).
RIR_SCALE = (1e-3, 1e3)


def plot_heatmap(rows: list[dict[str, str]], method: str, path: Path) -> Path | None:
    """10×10 map of RIR (log colour scale; immunized pairs marked ✓, others ✗), averaged over
    seeds. Rows: D_P digit, columns: D_H digit."""
    import numpy as np
    from matplotlib.colors import LogNorm

    plt = pyplot()

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
    return save_figure(fig, path, 110)


def plot_method_curves(curves_dir: Path, path: Path, seed: int | None = None) -> Path | None:
    """Fig. 1: exact-line-search norm-ratio curves on D_H and D_P, every method and the
    identity (first seed found unless ``seed`` is given)."""
    import torch

    plt = pyplot()

    files = sorted(curves_dir.glob("*_seed*.pt"))
    if seed is not None:
        files = [f for f in files if f.stem.endswith(f"_seed{seed}")]
    by_method: dict[str, Path] = {}
    for f in files:
        name = f.stem.rsplit("_seed", 1)[0]
        by_method.setdefault(LEGACY_METHODS.get(name, name), f)
    if not by_method:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, side, title in zip(
        axes, DISPLAY_SIDES, ("D_H (harmful)", "D_P (pre-training)"), strict=True
    ):
        reference = None
        for method in method_order(by_method):
            curves = torch.load(by_method[method], weights_only=True)
            reference = curves[f"{side}_reference"]
            if method != REFERENCE:
                ax.semilogy(curves[f"{side}_immunized"].clamp_min(1e-16).numpy(), label=method)
        if reference is not None:
            ax.semilogy(reference.clamp_min(1e-16).numpy(), "k--", label=method_label(REFERENCE))
        ax.set_title(f"{title}: GD with exact line search")
        ax.set_xlabel("probing step t")
        ax.set_ylabel("‖w_t − w*‖ / ‖w_0 − w*‖")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Immunized: slower on D_H (higher curves), not slower on D_P")
    fig.tight_layout()
    return save_figure(fig, path, 110)
