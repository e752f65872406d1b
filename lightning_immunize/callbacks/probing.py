"""How fast a linear-probing attacker converges, before and after immunization.

:func:`probing_study` runs the attackers of :mod:`lightning_immunize.probing` on frozen
features of ``D_H`` and ``D_P`` for the reference extractor (the identity for a linear
extractor, ``θ_0`` otherwise) and the immunized one; :class:`ProbingCallback` does it at the
end of fit in any Lightning pipeline and writes a CSV and PNG curves into the log directory.

Contract with the model: it has an ``extractor`` attribute (inputs → features ``(B, K)``);
the datamodule has ``full_tensors(split)`` returning ``(X_P, y_P, X_H, y_H)``.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor, nn

from lightning_immunize.callbacks.report import ReferenceKeeper
from lightning_immunize.metrics import extract_features
from lightning_immunize.probing import ATTACKERS, ProbeTrajectory, run_attackers

__all__ = [
    "SIDES",
    "MODELS",
    "PROBE_OPTIMIZERS",
    "ProbingStudy",
    "probing_study",
    "probe_accuracy_curves",
    "ProbingCallback",
]

SIDES = ("harmful", "pretrain")
MODELS = ("reference", "immunized")


@dataclass
class ProbingStudy:
    """Trajectories keyed ``[side][model][attacker]``; ``steps`` is the cap ``T``."""

    curves: dict[str, dict[str, dict[str, ProbeTrajectory]]]
    steps: int
    tolerance: float
    reference_name: str

    @property
    def attackers(self) -> list[str]:
        return list(self.curves[SIDES[0]][MODELS[0]])

    def rows(self) -> list[dict[str, Any]]:
        """One row per (attacker, side): steps to tolerance and progress after ``T`` steps,
        for the reference and the immunized extractor, and their ratios."""
        rows = []
        for attacker in self.attackers:
            for side in SIDES:
                ref = self.curves[side]["reference"][attacker]
                imm = self.curves[side]["immunized"][attacker]
                p_ref, p_imm = ref.progress(self.steps), imm.progress(self.steps)
                rows.append(
                    {
                        "attacker": attacker,
                        "side": side,
                        "steps_reference": ref.steps_to_tolerance,
                        "steps_immunized": imm.steps_to_tolerance,
                        "steps_reference_label": ref.steps_label(),
                        "steps_immunized_label": imm.steps_label(),
                        "steps_ratio": _steps_ratio(ref, imm),
                        "progress_reference": p_ref,
                        "progress_immunized": p_imm,
                        "progress_ratio": p_imm / p_ref if p_ref > 0 else float("nan"),
                    }
                )
        return rows

    def write_csv(self, path: str | Path) -> Path:
        """Long format: ``side, model, attacker, step, norm_ratio, loss``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["side", "model", "attacker", "step", "norm_ratio", "loss"])
            for side, models in self.curves.items():
                for model, attackers in models.items():
                    for name, traj in attackers.items():
                        for t, (r, loss) in enumerate(
                            zip(traj.norm_ratio.tolist(), traj.loss.tolist(), strict=True)
                        ):
                            writer.writerow([side, model, name, t, f"{r:.10g}", f"{loss:.10g}"])
        return path


def _steps_ratio(ref: ProbeTrajectory, imm: ProbeTrajectory) -> float | None:
    """Immunized / reference steps to tolerance; ``None`` when either was not reached."""
    if ref.steps_to_tolerance is None or imm.steps_to_tolerance is None:
        return None
    return imm.steps_to_tolerance / max(ref.steps_to_tolerance, 1)


def probe_targets(y: Tensor, task: str | None = None) -> Tensor:
    """Squared-loss targets: regression values as given, binary labels {0, 1} as ±1 (so a
    side whose labels are all 0, like D_P of a digit pair, is not the trivial ``w* = 0``),
    multiclass labels one-hot. ``task=None`` infers regression / multiclass from the dtype."""
    if task == "binary":
        return 2.0 * y.to(torch.float64) - 1.0
    if task == "multiclass" or (task is None and not y.is_floating_point()):
        return torch.nn.functional.one_hot(y.long()).to(torch.float64)
    return y.to(torch.float64)


def probing_study(
    extractor: nn.Module,
    data: Sequence[Tensor],
    reference: nn.Module | None = None,
    attackers: Sequence[str] | None = None,
    steps: int = 200,
    tol: float = 1e-3,
    task: str | None = None,
) -> ProbingStudy:
    """Run ``attackers`` on ``D_H`` and ``D_P`` for ``reference`` and ``extractor``.

    ``data`` is ``(X_P, y_P, X_H, y_H)``; ``reference=None`` means the identity (the flattened
    inputs themselves, the reference of the linear RIR); ``task`` picks the targets
    (:func:`probe_targets`).
    """
    X_P, y_P, X_H, y_H = data
    inputs = {"pretrain": (X_P, y_P), "harmful": (X_H, y_H)}
    curves: dict[str, dict[str, dict[str, ProbeTrajectory]]] = {}
    for side in SIDES:
        X, y = inputs[side]
        target = probe_targets(y, task)
        ref_features = (
            X.reshape(X.shape[0], -1).to(torch.float64)
            if reference is None
            else extract_features(reference, X)
        )
        curves[side] = {
            "reference": run_attackers(ref_features, target, attackers, steps, tol),
            "immunized": run_attackers(
                extract_features(extractor, X), target, attackers, steps, tol
            ),
        }
    name = "identity" if reference is None else "θ_0"
    return ProbingStudy(curves=curves, steps=steps, tolerance=tol, reference_name=name)


class ProbingCallback(ReferenceKeeper):
    """At the end of fit, run the probing attackers on ``D_H`` and ``D_P`` for the reference
    and the trained extractor; log steps-to-tolerance and write ``probing/curves.csv`` and
    ``probing/norm_ratio.png`` + ``probing/attackers.png`` into the log directory.

    Args:
        attackers: names from :data:`lightning_immunize.probing.ATTACKERS` (default: all).
        steps: the cap ``T`` of every attacker.
        tol: the norm-ratio tolerance of steps-to-tolerance.
        split: the datamodule split probed.
        dirpath: where to write (default ``<trainer.log_dir>/probing``).
    """

    def __init__(
        self,
        attackers: Sequence[str] | None = None,
        steps: int = 200,
        tol: float = 1e-3,
        split: str = "train",
        dirpath: str | None = None,
    ) -> None:
        unknown = [a for a in attackers or () if a not in ATTACKERS]
        if unknown:
            raise ValueError(f"unknown attacker(s) {unknown}; valid: {sorted(ATTACKERS)}")
        self.attackers = list(attackers) if attackers else None
        self.steps, self.tol, self.split, self.dirpath = steps, tol, split, dirpath
        self.reference = None
        self.study: ProbingStudy | None = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        extractor = pl_module.extractor
        was_training = extractor.training
        extractor.eval()
        try:
            data = trainer.datamodule.full_tensors(self.split)
            task = getattr(trainer.datamodule, "task", None)
            self.study = probing_study(
                extractor, data, self.reference, self.attackers, self.steps, self.tol, task
            )
        finally:
            extractor.train(was_training)
        metrics = {}
        for row in self.study.rows():
            prefix = f"probe/{row['side']}/{row['attacker']}"
            for key in ("steps_reference", "steps_immunized"):
                value = row[key]
                metrics[f"{prefix}/{key}"] = float(self.steps + 1 if value is None else value)
            metrics[f"{prefix}/progress_ratio"] = row["progress_ratio"]
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        # ``trainer.log_dir`` broadcasts under DDP: every rank must ask, only rank 0 writes.
        root = Path(trainer.log_dir or trainer.default_root_dir)
        self._write(Path(self.dirpath) if self.dirpath else root / "probing")

    @rank_zero_only
    def _write(self, directory: Path) -> None:
        from lightning_immunize.callbacks.plots import plot_attackers, plot_norm_ratio

        self.study.write_csv(directory / "curves.csv")
        plot_norm_ratio(self.study, directory / "norm_ratio.png")
        plot_attackers(self.study, directory / "attackers.png")


#: Optimizers of the accuracy-curve attacker (:func:`probe_accuracy_curves`).
PROBE_OPTIMIZERS = ("sgd", "adam")


def probe_accuracy_curves(
    extractor: nn.Module,
    datamodule: Any,
    epochs: int = 20,
    optimizers: Sequence[str] = PROBE_OPTIMIZERS,
    adam_lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
) -> dict[str, dict[str, list[float]]]:
    """The deep attacker of SPEC §6 (Fig. 3): a linear probe on the frozen features of each
    side's training split, held-out (``"val"``) accuracy after every epoch.

    ``"sgd"`` uses plain SGD (no momentum) with the fixed step ``1 / λ_max(ZᵀZ / N)`` of the
    model's own training features: the textbook step of an ``L``-smooth problem, so no
    hand-picked learning rate favours either model and the speed depends on the spectrum.
    ``"adam"`` uses Adam with ``adam_lr``. Both start from the same seeded initialisation.

    Returns:
        ``{side: {optimizer: [accuracy at epoch 0 … epochs]}}`` with ``side`` in
        ``("harmful", "pretrain")``.
    """
    from lightning_immunize.probing import linear_probe_accuracy

    unknown = [o for o in optimizers if o not in PROBE_OPTIMIZERS]
    if unknown:
        raise ValueError(f"unknown probe optimizer(s) {unknown}; valid: {list(PROBE_OPTIMIZERS)}")
    was_training = extractor.training
    extractor.eval()
    try:
        X_P, y_P, X_H, y_H = datamodule.full_tensors("train")
        V_P, w_P, V_H, w_H = datamodule.full_tensors("val")
        sides = {
            "harmful": (X_H, y_H, V_H, w_H, datamodule.num_classes_harmful),
            "pretrain": (X_P, y_P, V_P, w_P, datamodule.num_classes_pretrain),
        }
        curves: dict[str, dict[str, list[float]]] = {}
        for side, (X, y, V, w, num_classes) in sides.items():
            Z, Zv = extract_features(extractor, X), extract_features(extractor, V)
            lam_max = float(torch.linalg.eigvalsh(Z.T @ Z / Z.shape[0])[-1])
            lrs = {"sgd": 1.0 / max(lam_max, 1e-12), "adam": adam_lr}
            curves[side] = {
                opt: linear_probe_accuracy(
                    Z,
                    y,
                    Zv,
                    w,
                    num_classes,
                    epochs=epochs,
                    optimizer=opt,
                    lr=lrs[opt],
                    batch_size=batch_size,
                    seed=seed,
                    momentum=0.0,
                ).tolist()
                for opt in optimizers
            }
    finally:
        extractor.train(was_training)
    return curves
