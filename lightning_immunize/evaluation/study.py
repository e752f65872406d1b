"""Probing studies: the attackers of the paper's Section 5 run on frozen features of the
reference and the immunized extractor — norm-ratio trajectories (Eq. 16) for linear models,
probe accuracy per epoch (Fig. 3) for deep ones."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_immunize.evaluation.tables import LEGACY_METHODS
from lightning_immunize.metrics import extract_features
from lightning_immunize.models import evaluating
from lightning_immunize.probing import ProbeTrajectory, linear_probe_accuracy, run_attackers
from lightning_immunize.sides import DISPLAY_SIDES
from lightning_immunize.validation import unknown_choice

__all__ = [
    "MODELS",
    "PROBE_OPTIMIZERS",
    "ProbingStudy",
    "probe_accuracy_curves",
    "probe_targets",
    "probing_study",
    "read_probes",
]

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
        return list(self.curves[DISPLAY_SIDES[0]][MODELS[0]])

    def rows(self) -> list[dict[str, Any]]:
        """One row per (attacker, side): steps to tolerance and progress after ``T`` steps,
        for the reference and the immunized extractor, and their ratios."""
        rows = []
        for attacker in self.attackers:
            for side in DISPLAY_SIDES:
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
    for side in DISPLAY_SIDES:
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
    """The deep attacker of the paper's Fig. 3: a linear probe on the frozen features of each
    side's training split, held-out (``"val"``) accuracy after every epoch.

    ``"sgd"`` uses plain SGD (no momentum) with the fixed step ``1 / λ_max(ZᵀZ / N)`` of the
    model's own training features: the textbook step of an ``L``-smooth problem, so no
    hand-picked learning rate favours either model and the speed depends on the spectrum.
    ``"adam"`` uses Adam with ``adam_lr``. Both start from the same seeded initialisation.

    Returns:
        ``{side: {optimizer: [accuracy at epoch 0 … epochs]}}`` with ``side`` in
        ``("harmful", "pretrain")``.
    """
    unknown = [o for o in optimizers if o not in PROBE_OPTIMIZERS]
    if unknown:
        raise unknown_choice("probe optimizer", unknown, PROBE_OPTIMIZERS)
    with evaluating(extractor):
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
    return curves


def read_probes(out: str | Path) -> dict[tuple[str, str], dict[str, dict[str, list[float]]]]:
    """Probe accuracy curves of a deep sweep, keyed ``(method, seed)``."""
    probes = {}
    for f in sorted((Path(out) / "probes").glob("*_seed*.json")):
        method, seed = f.stem.rsplit("_seed", 1)
        method = LEGACY_METHODS.get(method, method)
        probes[(method, seed)] = json.loads(f.read_text())
    return probes
