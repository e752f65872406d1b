"""Figures: norm-ratio curves of the probing attackers (SPEC §6, the paper's Fig. 1).

matplotlib is imported lazily with the non-interactive Agg backend, so plotting works on a
machine without a display and costs nothing until a figure is drawn.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lightning_immunize.callbacks.probing import ProbingStudy

__all__ = ["plot_norm_ratio", "plot_attackers", "plot_probe_accuracy"]

SIDE_TITLES = {"harmful": "harmful task D_H", "pretrain": "pre-training task D_P"}
ATTACKER_TITLES = {
    "gd_exact": "GD, exact line search",
    "gd_fixed": "GD, fixed step 1/L",
    "adam": "Adam",
    "lbfgs": "L-BFGS",
    "closed_form": "closed-form solve",
}


def _pyplot():
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
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, side in zip(axes, ("harmful", "pretrain"), strict=True):
        _panel(
            ax,
            study,
            side,
            attacker,
            f"{SIDE_TITLES[side]}: {ATTACKER_TITLES.get(attacker, attacker)}",
        )
    fig.suptitle("Linear probing on frozen features: the harmful task should converge slower")
    fig.tight_layout()
    return _save(fig, path, dpi)


def plot_attackers(
    study: ProbingStudy, path: str | Path, attackers: Sequence[str] | None = None, dpi: int = 100
) -> Path:
    """A grid: one row per attacker, columns D_H and D_P."""
    plt = _pyplot()
    names = list(attackers or study.attackers)
    fig, axes = plt.subplots(len(names), 2, figsize=(10, 3.2 * len(names)), squeeze=False)
    for row, name in zip(axes, names, strict=True):
        for ax, side in zip(row, ("harmful", "pretrain"), strict=True):
            _panel(
                ax, study, side, name, f"{ATTACKER_TITLES.get(name, name)} — {SIDE_TITLES[side]}"
            )
    fig.tight_layout()
    return _save(fig, path, dpi)


def _save(fig, path: str | Path, dpi: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    _pyplot().close(fig)
    return path


PROBE_TITLES = {"sgd": "SGD, fixed step 1/λ_max", "adam": "Adam"}


def plot_probe_accuracy(
    curves: dict[str, dict[str, dict[str, Sequence[float]]]],
    path: str | Path,
    reference: str = "identity",
    threshold: dict[str, dict[str, float]] | None = None,
) -> Path:
    """The paper's Fig. 3: held-out accuracy of a linear probe epoch by epoch, one panel per
    (optimizer, side), one curve per method; ``reference`` (θ_0) is drawn dashed.

    ``curves[method][side][optimizer]`` is an accuracy curve (epoch 0 … E); ``threshold``
    (``[side][optimizer]``) adds a dotted line at the accuracy the epochs-to-threshold
    figures refer to.
    """
    plt = _pyplot()
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
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
