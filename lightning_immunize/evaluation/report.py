"""The immunization report: RIR figures of a trained model against its reference, the task
metric, and the data fingerprints — plain functions, no Lightning hooks.

For a :class:`~lightning_immunize.models.LinearExtractor` the reference is the identity
(Eq. 15, input-rank rule). For any other extractor it is the extractor as it was before
immunization (``θ_0``, Eq. 17), κ by the tolerance rule on groups of features.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from lightning_immunize.fingerprints import fingerprint
from lightning_immunize.metrics import (
    DeepRelativeImmunizationRatio,
    extract_features,
    linear_immunization_ratios,
)
from lightning_immunize.models import LinearExtractor, evaluating
from lightning_immunize.run_folder import REPORT_NAME

__all__ = [
    "NO_STEP_NOTE",
    "REPORT_NAME",
    "check_data_fingerprint",
    "data_fingerprints",
    "format_report",
    "immunization_report",
    "task_metric",
]


@torch.no_grad()
def task_metric(
    module: pl.LightningModule, datamodule: Any, split: str = "train"
) -> dict[str, Any]:
    """The head's metric on D_P's validation split (``split`` when there is none):
    ``{"task_metric", "task_metric_name", "task_split"}``, or ``{}`` without a usable head."""
    head = getattr(module, "head", None)
    if head is None or not hasattr(head, "metric"):
        return {}
    try:
        X, y, _, _ = datamodule.full_tensors("val")
        used = "val"
    except ValueError:
        X, y, _, _ = datamodule.full_tensors(split)
        used = split
    with evaluating(module):
        param = next(head.parameters())
        output = head(extract_features(module.extractor, X).to(param.device, param.dtype))
        value = float(head.metric(output, y.to(param.device)))
    return {"task_metric": value, "task_metric_name": head.metric_name, "task_split": used}


@torch.no_grad()
def immunization_report(
    module: pl.LightningModule,
    datamodule: Any,
    split: str = "train",
    reference_extractor: torch.nn.Module | None = None,
    num_groups: int = 20,
    group_size: int = 100,
    seed: int = 0,
) -> dict[str, Any]:
    """RIR figures of ``module.extractor`` on ``datamodule``'s ``split`` plus the task metric.

    Linear extractor: Eq. 15 against the identity on the full split. Otherwise Eq. 17 against
    ``reference_extractor`` (θ_0) on ``num_groups`` groups of ``group_size`` samples (fewer when
    a side is smaller; the report says how many), the same groups for both models.
    """
    extractor = module.extractor
    with evaluating(extractor):
        X_P, y_P, X_H, y_H = datamodule.full_tensors(split)
        if isinstance(extractor, LinearExtractor):
            report = linear_immunization_ratios(extractor, X_P, X_H)
        else:
            if reference_extractor is None:
                raise ValueError(
                    f"a non-linear extractor ({type(extractor).__name__}) needs "
                    "reference_extractor (θ_0) for its RIR, got None."
                )
            reference_extractor.eval()
            metric = DeepRelativeImmunizationRatio(
                num_groups=num_groups,
                group_size=min(group_size, X_P.shape[0], X_H.shape[0]),
                seed=seed,
                sync_on_compute=False,  # every rank holds the full split already
            )
            metric.update(
                extract_features(extractor, X_P),
                extract_features(reference_extractor, X_P),
                extract_features(extractor, X_H),
                extract_features(reference_extractor, X_H),
            )
            report = metric.compute()
        report["split"] = split
        report["data_fingerprint"] = _fingerprints(X_P, y_P, X_H, y_H)
        report.update(task_metric(module, datamodule, split))
    objective = getattr(module, "objective", None)
    if objective is not None:
        report["method"] = objective.name
        report["objective"] = objective.hyperparameters()
    return report


#: What a report says when fit ran no optimizer step (``--trainer.max_epochs 0``, an empty
#: training set): its figures describe the model as built, not an immunized one.
NO_STEP_NOTE = "no training step ran: these figures are those of the model as built, not immunized"


def format_report(report: dict[str, Any]) -> str:
    """A short plain-text table of the report's main figures."""
    rows = [
        ("RIR", report["rir"]),
        ("ratio_harmful (want > 1)", report["ratio_harmful"]),
        ("ratio_pretrain (want ≤ 1)", report["ratio_pretrain"]),
        ("kappa_harmful", report["kappa_harmful"]),
        ("kappa_harmful_reference", report["kappa_harmful_reference"]),
        ("kappa_pretrain", report["kappa_pretrain"]),
        ("kappa_pretrain_reference", report["kappa_pretrain_reference"]),
    ]
    if "task_metric_before" in report:
        name = f"task {report['task_metric_name']} before fit"
        rows.append((name, report["task_metric_before"]))
    if "task_metric" in report:
        rows.append(
            (f"task {report['task_metric_name']} ({report['task_split']})", report["task_metric"])
        )
    if "seconds" in report:
        rows.append(("seconds", report["seconds"]))
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value:.6g}" for name, value in rows]
    lines.append(f"{'immunized':<{width}}  {'yes' if report['immunized'] else 'no'}")
    if "steps" in report:
        lines.append(f"{'training steps':<{width}}  {report['steps']}")
    if "note" in report:
        lines.append(f"NOTE: {report['note']}")
    return "\n".join(lines)


def _fingerprints(X_P: torch.Tensor, y_P: torch.Tensor, X_H: torch.Tensor, y_H: torch.Tensor):
    return {"pretrain": fingerprint(X_P, y_P), "harmful": fingerprint(X_H, y_H)}


def data_fingerprints(datamodule: Any, split: str = "train") -> dict[str, str]:
    """``{"pretrain": …, "harmful": …}``: the fingerprints of ``split``'s tensors, as the report
    records them in ``data_fingerprint``."""
    return _fingerprints(*datamodule.full_tensors(split))


def check_data_fingerprint(
    datamodule: Any, report: dict[str, Any] | None, allow_mismatch: bool = False
) -> None:
    """Refuse to measure a model on other data than it was immunized on.

    ``report`` is the run's ``immunization.json``; its ``data_fingerprint`` (of its ``split``)
    must equal the fingerprints of ``datamodule``'s same split. Nothing to check without a
    recorded fingerprint.

    Raises:
        ValueError: the fingerprints differ and ``allow_mismatch`` is false; the message names
            both.
    """
    recorded = (report or {}).get("data_fingerprint")
    if not recorded or allow_mismatch:
        return
    split = report.get("split", "train")
    current = data_fingerprints(datamodule, split)
    if current != recorded:
        raise ValueError(
            f"the data differ from the data this model was immunized on: {split} split "
            f"fingerprints {current} now, {recorded} in the run's immunization.json. Evaluate "
            "the run folder with its own config, or pass --allow-data-mismatch to measure it "
            "on other data on purpose."
        )
