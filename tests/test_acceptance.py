"""Acceptance figures of the issues, measured end to end (slow: CI runs them all)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightning_immunize.cli import evaluate_checkpoint, main

REPO = Path(__file__).resolve().parents[1]
HOUSE_CSV = REPO.parent / "shared" / "data" / "house-prices" / "train.csv"


@pytest.mark.slow
@pytest.mark.skipif(not HOUSE_CSV.is_file(), reason=f"{HOUSE_CSV} not found")
def test_house_prices_default_config_immunizes_and_slows_the_harmful_probe(tmp_path):
    """Issue 3 (one seed of its bar) and issue 4's Fig. 1 claim stated as a number."""
    config = REPO / "configs" / "house_prices.yaml"
    main(
        [
            "fit",
            "--config",
            str(config),
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    (run,) = (tmp_path / "lightning_logs").iterdir()
    report = json.loads((run / "immunization.json").read_text())
    assert report["immunized"] and report["rir"] >= 100
    (ckpt,) = (run / "checkpoints").glob("*.ckpt")
    evaluate_checkpoint(config, ckpt, tmp_path / "evaluation", steps=200, attackers=["gd_exact"])
    rows = (tmp_path / "evaluation" / "curves.csv").read_text().splitlines()[1:]
    final = {
        tuple(r.split(",")[:3]): float(r.split(",")[4]) for r in rows if r.split(",")[3] == "200"
    }
    progress = {k: 1.0 - v for k, v in final.items()}
    harmful = (
        progress[("harmful", "immunized", "gd_exact")]
        / progress[("harmful", "reference", "gd_exact")]
    )
    pretrain = (
        progress[("pretrain", "immunized", "gd_exact")]
        / progress[("pretrain", "reference", "gd_exact")]
    )
    assert harmful <= 0.2
    assert pretrain >= 0.8
