"""Callbacks in a plain Lightning pipeline: probing curves and the immunization report."""

from __future__ import annotations

import json
from functools import partial

import lightning.pytorch as pl
import pytest
import torch

from lightning_immunize.callbacks.probing import ProbingCallback
from lightning_immunize.callbacks.report import ImmunizationReport
from lightning_immunize.datamodules import DigitsPairDataModule
from lightning_immunize.evaluation.study import probing_study
from lightning_immunize.models import LinearExtractor, LinearHead
from lightning_immunize.module import ImmunizationModule
from lightning_immunize.objectives import ConditionNumberObjective


def test_probing_callback_and_report_in_a_fit(tmp_path):
    torch.manual_seed(0)
    module = ImmunizationModule(
        LinearExtractor(64, 64, seed=0),
        LinearHead(64, 1, "binary"),
        ConditionNumberObjective(1.0, 100.0),
        optimizer=partial(torch.optim.Adam, lr=1e-3),
    )
    probe = ProbingCallback(attackers=["gd_exact", "closed_form"], steps=30)
    trainer = pl.Trainer(
        max_epochs=2,
        default_root_dir=tmp_path,
        callbacks=[probe, ImmunizationReport()],
        enable_progress_bar=False,
        enable_model_summary=False,
        precision="64-true",
    )
    trainer.fit(module, DigitsPairDataModule(2, 7))
    log_dir = tmp_path / "lightning_logs" / "version_0"
    assert (log_dir / "probing" / "norm_ratio.png").stat().st_size > 10_000
    assert (log_dir / "probing" / "curves.csv").read_text().count("\n") == 1 + 2 * 2 * 2 * 31
    report = json.loads((log_dir / "immunization.json").read_text())
    assert report["rir"] == pytest.approx(report["ratio_harmful"] / report["ratio_pretrain"])
    closed = [r for r in probe.study.rows() if r["attacker"] == "closed_form"]
    assert all(r["steps_reference"] == r["steps_immunized"] == 1 for r in closed)


def test_probing_study_identity_extractor_changes_nothing():
    gen = torch.Generator().manual_seed(0)
    X_P, X_H = torch.randn(40, 6, generator=gen), torch.randn(40, 6, generator=gen) * 3
    data = (X_P, torch.randn(40, generator=gen), X_H, torch.randn(40, generator=gen))
    extractor = LinearExtractor(6, init="identity")
    study = probing_study(extractor, data, attackers=["gd_exact", "gd_fixed"], steps=20)
    for row in study.rows():
        assert row["progress_ratio"] == pytest.approx(1.0, rel=1e-6)
    with pytest.raises(ValueError, match="unknown probing attacker"):
        ProbingCallback(attackers=["newton"])


def test_rir_callback_and_condition_monitor_log(tmp_path):
    from lightning_immunize.callbacks import ConditionNumberMonitor, RIRCallback

    torch.manual_seed(0)
    module = ImmunizationModule(
        LinearExtractor(64, 64, seed=0),
        LinearHead(64, 1, "binary"),
        ConditionNumberObjective(1.0, 100.0),
    )
    rir = RIRCallback()
    trainer = pl.Trainer(
        max_epochs=2,
        default_root_dir=tmp_path,
        callbacks=[rir, ConditionNumberMonitor(every_n_steps=2)],
        enable_progress_bar=False,
        enable_model_summary=False,
        precision="64-true",
        logger=False,
    )
    trainer.fit(module, DigitsPairDataModule(4, 9, val_fraction=0.2))
    logged = trainer.callback_metrics
    for key in ("rir", "ratio_harmful", "ratio_pretrain", "monitor/kappa_pretrain"):
        assert torch.isfinite(logged[key]), key
    assert float(logged["rir"]) == pytest.approx(rir.last["rir"], rel=1e-6)
    assert float(logged["monitor/kappa_harmful"]) >= 1.0


def test_deep_report_uses_groups_against_theta_0():
    from lightning_immunize.datamodules import PairedDataModule
    from lightning_immunize.evaluation.report import immunization_report

    torch.manual_seed(0)
    extractor = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh())
    head = LinearHead(8, 1, "binary")
    module = ImmunizationModule(extractor, head, ConditionNumberObjective())
    gen = torch.Generator().manual_seed(1)
    data = PairedDataModule(
        torch.utils.data.TensorDataset(torch.randn(60, 6, generator=gen), torch.zeros(60)),
        torch.utils.data.TensorDataset(torch.randn(50, 6, generator=gen), torch.ones(50)),
        batch_size=16,
    )
    report = immunization_report(module, data, reference_extractor=extractor, group_size=30)
    assert report["rir"] == 1.0 and report["ratio_harmful_std"] == 0.0
    assert report["group_size"] == 30 and report["num_groups"] == 20


def test_two_immunization_reports_keep_their_own_state_and_old_checkpoints_still_load():
    from lightning_immunize.callbacks import ImmunizationReport

    train, val = ImmunizationReport(split="train"), ImmunizationReport(split="val")
    assert train.state_key != val.state_key
    # The default report reads checkpoints written before the key: their state is under
    # the class name.
    assert train.state_key == "ImmunizationReport"


def test_durability_card_logs_the_interval_of_advantage_removed():
    from lightning_immunize.callbacks import DurabilityCard

    card = {"resistance": {"128": {
        "probe": {"immunized": {"mean": 0.6}, "reference": {"mean": 0.7},
                  "advantage_removed": 0.15, "advantage_removed_interval": [0.09, 0.22]},
        "lora": {"immunized": {"mean": 0.6}, "advantage_removed": None},
    }}}  # fmt: skip
    logged = DurabilityCard.figures(card)
    assert logged["attack/probe/n=128/advantage_removed_low"] == 0.09
    assert logged["attack/probe/n=128/advantage_removed_high"] == 0.22
    assert not any(k.startswith("attack/lora/n=128/advantage_removed") for k in logged)
