"""The `lightning-immunize` CLI end to end on digits and checkpoint reload (export and reload:
test_export.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_immunize.cli import main
from lightning_immunize.datamodules import DigitsPairDataModule
from lightning_immunize.evaluation.report import immunization_report
from lightning_immunize.models import LinearExtractor, LinearHead
from lightning_immunize.module import ImmunizationModule
from lightning_immunize.objectives import ConditionNumberObjective

REPO = Path(__file__).resolve().parents[1]
# reproduce.yaml and attack.yaml are not fit configs (protocols; attacker budgets).
CONFIGS = sorted(
    c for c in (REPO / "configs").glob("*.yaml") if c.stem not in ("reproduce", "attack")
)
REPORT_KEYS = {
    "rir",
    "ratio_harmful",
    "ratio_pretrain",
    "kappa_harmful",
    "kappa_pretrain",
    "kappa_harmful_reference",
    "kappa_pretrain_reference",
    "task_metric",
    "seconds",
}


def test_fit_writes_immunization_json(digits_run: Path):
    report = json.loads((digits_run / "immunization.json").read_text())
    assert REPORT_KEYS <= set(report)
    assert report["rir"] == pytest.approx(report["ratio_harmful"] / report["ratio_pretrain"])
    assert report["ratio_harmful"] == pytest.approx(
        report["kappa_harmful"] / report["kappa_harmful_reference"]
    )
    assert report["method"] == "ours" and report["objective"]["lambda_harmful"] == 1000.0
    assert 0.0 <= report["task_metric"] <= 1.0 and 0.0 <= report["task_metric_before"] <= 1.0
    assert list((digits_run / "checkpoints").glob("*.ckpt"))


def test_checkpoint_reload_gives_same_rir(digits_run: Path):
    report = json.loads((digits_run / "immunization.json").read_text())
    ckpt = digits_run / "checkpoints" / "last.ckpt"
    module = ImmunizationModule.load_from_checkpoint(
        ckpt,
        extractor=LinearExtractor(64, 64).double(),
        head=LinearHead(64, 1, "binary").double(),
        objective=ConditionNumberObjective(1.0, 1000.0),
        weights_only=True,
    )
    again = immunization_report(module, DigitsPairDataModule(0, 1))
    assert again["rir"] == pytest.approx(report["rir"], rel=1e-9)


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_config_parses(config: Path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    assert "class_path: lightning_immunize" in capsys.readouterr().out


def test_console_script_without_arguments_prints_help():
    out = subprocess.run(
        [sys.executable, "-m", "lightning_immunize.cli"], capture_output=True, text=True, check=True
    ).stdout
    assert "fit" in out and "export" in out


def test_evaluate_writes_report_and_figures(digits_run: Path, tmp_path: Path):
    import matplotlib.image

    ckpt = digits_run / "checkpoints" / "last.ckpt"
    out = tmp_path / "evaluation"
    config = str(REPO / "configs" / "digits.yaml")
    assert (
        main(
            [
                "evaluate",
                "--config",
                config,
                "--ckpt",
                str(ckpt),
                "--out",
                str(out),
                "--steps",
                "50",
            ]
        )
        == 0
    )
    text = (out / "report.md").read_text()
    ratios = json.loads((out / "ratios.json").read_text())
    original = json.loads((digits_run / "immunization.json").read_text())
    assert ratios["rir"] == pytest.approx(original["rir"], rel=1e-9)
    for attacker in ("gd_exact", "gd_fixed", "adam", "lbfgs", "closed_form"):
        assert f"| {attacker} | D_H |" in text and f"| {attacker} | D_P |" in text
    assert "does **not slow**" in text and "`closed_form`" in text
    for name in ("norm_ratio.png", "attackers.png"):
        image = matplotlib.image.imread(out / name)
        assert image.shape[0] > 200 and image.shape[1] > 400 and image.std() > 0.01
        assert f"]({name})" in text
    rows = (out / "curves.csv").read_text().splitlines()
    assert rows[0] == "side,model,attacker,step,norm_ratio,loss"
    assert len(rows) == 1 + 2 * 2 * 5 * 51
