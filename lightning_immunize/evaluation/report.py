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

__all__ = ["REPORT_NAME", "format_report", "immunization_report", "task_metric"]


REPORT_NAME = "immunization.json"


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
                    "a non-linear extractor needs reference_extractor (θ_0) for its RIR."
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
        report["data_fingerprint"] = {
            "pretrain": fingerprint(X_P, y_P),
            "harmful": fingerprint(X_H, y_H),
        }
        report.update(task_metric(module, datamodule, split))
    objective = getattr(module, "objective", None)
    if objective is not None:
        report["method"] = objective.name
        report["objective"] = objective.hyperparameters()
    return report


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
    return "\n".join(lines)
