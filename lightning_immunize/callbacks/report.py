"""End-of-fit immunization report: RIR on the training split, written to ``immunization.json``.

Contract with the model: it has an ``extractor`` (inputs → features) and, for the task metric,
a ``head`` with ``metric(output, target)`` and ``metric_name``; the datamodule has
``full_tensors(split)`` returning ``(X_P, y_P, X_H, y_H)``.

For a :class:`~lightning_immunize.models.LinearExtractor` the reference is the identity
(SPEC §6, Eq. 15, input-rank rule). For any other extractor it is the extractor as it was when
fit started (``θ_0``, Eq. 17), κ by the tolerance rule on the full features.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from lightning_immunize.metrics import (
    DeepRelativeImmunizationRatio,
    extract_features,
    linear_immunization_ratios,
)
from lightning_immunize.models import LinearExtractor

__all__ = [
    "immunization_report",
    "format_report",
    "ReferenceKeeper",
    "ImmunizationReport",
    "evaluation_markdown",
]

REPORT_NAME = "immunization.json"


def fingerprint(*tensors: torch.Tensor) -> str:
    """SHA-256 (first 16 hex digits) of the tensors' dtypes, shapes and bytes: which data a
    model was immunized and measured on, without the data."""
    return named_fingerprint(("", t) for t in tensors)


def named_fingerprint(items: Iterable[tuple[str, torch.Tensor]]) -> str:
    """:func:`fingerprint` of named tensors (a state dict's items): the names count too."""
    digest = hashlib.sha256()
    for name, t in items:
        t = t.detach().cpu().contiguous()
        digest.update(f"{name}{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # any dtype, bf16 too
    return digest.hexdigest()[:16]


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
    was_training = module.training
    module.eval()
    try:
        param = next(head.parameters())
        output = head(extract_features(module.extractor, X).to(param.device, param.dtype))
        value = float(head.metric(output, y.to(param.device)))
    finally:
        module.train(was_training)
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
    was_training = extractor.training
    extractor.eval()
    try:
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
    finally:
        extractor.train(was_training)
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


class ReferenceKeeper(pl.Callback):
    """Keeps a copy of a non-linear extractor as it is when fit starts: θ_0, the reference of
    the deep RIR (a linear extractor's reference is the identity, nothing to keep), and
    computes :func:`immunization_report` against it."""

    reference: torch.nn.Module | None = None
    split: str = "train"
    num_groups: int = 20
    group_size: int = 100

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # In ``setup``: before a checkpoint is restored (a resumed run keeps the θ_0 its config
        # builds, not the half-trained weights) and after callbacks listed earlier that load
        # θ_0 (PretrainFromScratch).
        extractor = pl_module.extractor
        if stage == "fit" and not isinstance(extractor, LinearExtractor) and self.reference is None:
            self.reference = copy.deepcopy(extractor).eval()

    def compute_report(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        return immunization_report(
            pl_module,
            trainer.datamodule,
            self.split,
            self.reference,
            self.num_groups,
            self.group_size,
        )


class ImmunizationReport(ReferenceKeeper):
    """Writes ``immunization.json`` into ``trainer.log_dir`` (or ``dirpath``) at the end of fit
    and logs the table (:func:`immunization_report`; deep models: ``num_groups`` ×
    ``group_size`` against θ_0 as it was at fit start)."""

    def __init__(
        self,
        dirpath: str | None = None,
        split: str = "train",
        num_groups: int = 20,
        group_size: int = 100,
    ) -> None:
        self.dirpath = dirpath
        self.split = split
        self.num_groups, self.group_size = num_groups, group_size
        self._start: float | None = None
        self._elapsed = 0.0
        self._before: dict[str, Any] = {}
        self.reference = None
        self.report: dict[str, Any] | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and not self._before:
            # Before a checkpoint is restored: a resumed run reports the metric of the model
            # it started from, not of the checkpoint.
            self._before = task_metric(pl_module, trainer.datamodule, self.split)
        self._start = time.perf_counter()

    def state_dict(self) -> dict[str, Any]:
        elapsed = self._elapsed + (
            time.perf_counter() - self._start if self._start is not None else 0.0
        )
        return {"before": dict(self._before), "seconds": elapsed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._before = dict(state_dict.get("before", {}))
        self._elapsed = float(state_dict.get("seconds", 0.0))
        self._start = time.perf_counter()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        report = self.compute_report(trainer, pl_module)
        if self._start is not None:
            # Training time, summed over the interrupted parts of a resumed run.
            report["seconds"] = self._elapsed + time.perf_counter() - self._start
        if "task_metric" in self._before:
            report["task_metric_before"] = self._before["task_metric"]
        self.report = report
        # ``trainer.log_dir`` broadcasts under DDP: every rank must ask, only rank 0 writes.
        self._write(Path(self.dirpath or trainer.log_dir or trainer.default_root_dir), report)

    @staticmethod
    @rank_zero_only
    def _write(directory: Path, report: dict[str, Any]) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / REPORT_NAME
        path.write_text(json.dumps(report, indent=2, default=float) + "\n")
        rank_zero_info(f"Immunization report ({path}):\n{format_report(report)}")


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

    ``study`` is a :class:`~lightning_immunize.callbacks.probing.ProbingStudy`; ``figures``
    maps captions to relative PNG paths; ``header`` adds ``key: value`` lines on top.
    """
    T = study.steps
    lines = ["# Immunization report", ""]
    for key, value in (header or {}).items():
        lines.append(f"- **{key}**: {value}")
    lines += [
        "",
        "## Condition-number ratios (SPEC §6)",
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
