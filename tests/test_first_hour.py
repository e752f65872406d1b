"""A newcomer's first hour: run folders, resumable by default, a CLI that says what it does."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from support.helpers import run_cli, run_fit

ROOT = Path(__file__).resolve().parents[1]


def _house_fit(root: Path, *extra: str) -> subprocess.CompletedProcess:
    final = json.dumps(
        [
            {
                "class_path": "fault_callbacks.SaveFinalWeights",
                "init_args": {"path": str(root / "final.pt")},
            }
        ]
    )
    return run_fit(
        "house_prices", root, "--trainer.max_epochs", "6", "--trainer.callbacks", final, *extra
    )


# Ctrl-C then --ckpt_path last resuming in the same run folder: test_interruption.py, which
# stops at random moments and at fixed steps and compares weights, metrics and checkpoints.


def test_ckpt_path_last_without_a_run_is_a_clear_error(tmp_path):
    out = _house_fit(tmp_path, "--ckpt_path", "last")
    assert out.returncode != 0
    assert "nothing to resume" in out.stderr


def test_every_epoch_end_writes_last_ckpt_even_without_validation(tmp_path):
    # house prices validates every 10 epochs: a 3-epoch fit used to end with no checkpoint
    out = _house_fit(tmp_path, "--trainer.max_epochs", "3")
    assert out.returncode == 0, out.stderr[-3000:]
    last = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 9


# --------------------------------------------------------------------------- run folders
# digits_cli_run (a 2-epoch digits fit in a subprocess): conftest.py. `export RUN` without
# --out writing inside the run folder: test_export.py.


def _digits_fit(root: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_fit("digits", root, "--trainer.max_epochs", "2", *extra)


def test_fit_on_digits_prints_no_warning_our_configs_cause(digits_cli_run):
    _, out = digits_cli_run
    text = out.stdout + out.stderr
    assert "Warning" not in text and "warn" not in text.lower(), text
    assert "Tip:" not in text and "log_every_n_steps" not in text


def test_evaluate_and_export_take_a_run_folder(digits_cli_run, tmp_path):
    run, _ = digits_cli_run
    out = run_cli("evaluate", str(run), "--out", str(tmp_path / "ev"), "--steps", "20",
                  "--attackers", "gd_exact")  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "ev" / "report.md").is_file()
    exported = run_cli("export", str(run), "--out", str(tmp_path / "m.safetensors"))
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert "partial=False" in exported.stdout and "rir=" in exported.stdout


def test_evaluate_with_another_datas_config_is_refused_naming_both_fingerprints(tmp_path):
    root = tmp_path / "seven"
    fit = _digits_fit(root, "--data.init_args.harmful_digit", "7", "--trainer.max_epochs", "1")
    assert fit.returncode == 0, fit.stderr[-3000:]
    run = root / "lightning_logs" / "version_0"
    recorded = json.loads((run / "immunization.json").read_text())["data_fingerprint"]
    args = ["evaluate", "--config", str(ROOT / "configs" / "digits.yaml"),
            "--ckpt", str(run / "checkpoints" / "last.ckpt"), "--out", str(tmp_path / "ev"),
            "--steps", "20", "--attackers", "gd_exact"]  # fmt: skip
    refused = run_cli(*args)
    assert refused.returncode == 2
    assert recorded["harmful"] in refused.stderr and "--allow-data-mismatch" in refused.stderr
    assert not (tmp_path / "ev").exists()  # refused before any work
    allowed = run_cli(*args, "--allow-data-mismatch")
    assert allowed.returncode == 0, allowed.stderr[-3000:]


def test_a_fit_with_no_step_says_so_in_its_report(tmp_path):
    out = _digits_fit(tmp_path, "--trainer.max_epochs", "0")
    assert out.returncode == 2, out.stderr[-3000:]  # written, then refused as a result
    report = json.loads((tmp_path / "lightning_logs/version_0/immunization.json").read_text())
    assert report["steps"] == 0 and "no training step ran" in report["note"]
    assert "no training step ran" in out.stderr + out.stdout


# --------------------------------------------------------------------------- finding the way


def test_top_level_help_lists_every_subcommand():
    out = run_cli("--help")
    assert out.returncode == 0
    listed = {ln.split()[0].rstrip(",") for ln in out.stdout.splitlines() if ln.startswith("  ")}
    listed |= {"test"} if "  validate, test " in out.stdout else set()
    assert {"fit", "validate", "test", "evaluate", "export", "reproduce"} <= listed


def test_our_errors_are_one_line_with_exit_status_2_and_debug_keeps_the_traceback(tmp_path):
    bad = ("--model.objective.init_args.lambda_harmful", "-1")
    out = _digits_fit(tmp_path, *bad)
    assert out.returncode == 2
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("lightning-immunize: error")]
    assert errors == ["lightning-immunize: error: lambda_harmful must be a finite number ≥ 0, "
                      "got -1.0."]  # fmt: skip
    assert "Traceback" not in out.stderr
    debug = _digits_fit(tmp_path, *bad, "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_reproduce_writes_the_command_actually_run(tmp_path):
    out_dir = tmp_path / "sweep"
    out = run_cli("reproduce", "house-prices", "--out", str(out_dir), "--methods", "reference",
                  "--seeds", "1", "--no-progress")  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    table = (out_dir / "table.md").read_text()
    expected = (f"lightning-immunize reproduce house-prices --out {out_dir} --methods reference "
                "--seeds 1 --no-progress")  # fmt: skip
    assert expected in table and "docs/results" not in table


def test_rir_callback_without_validation_logs_on_training_epochs(caplog):
    import lightning.pytorch as pl
    from torch.utils.data import TensorDataset

    from lightning_immunize import (
        ConditionNumberObjective,
        ImmunizationModule,
        LinearExtractor,
        LinearHead,
        PairedDataModule,
        RIRCallback,
    )

    g = torch.Generator().manual_seed(0)
    data = [TensorDataset(torch.randn(64, 6, generator=g), torch.zeros(64)) for _ in range(2)]
    callback = RIRCallback()
    trainer = pl.Trainer(
        max_epochs=2, callbacks=[callback], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    module = ImmunizationModule(
        LinearExtractor(6, 6), LinearHead(6, 1, "binary"), ConditionNumberObjective()
    )
    with caplog.at_level("INFO"):
        trainer.fit(module, PairedDataModule(*data, batch_size=16))
    assert "rir" in trainer.callback_metrics and callback.last is not None
    assert any("no validation loop" in r.getMessage() for r in caplog.records)


def test_nothing_users_read_cites_the_internal_spec(tmp_path):
    """README, docs and every generated table cite the paper or docs/, not a spec file users
    do not have."""
    from lightning_immunize.commands.reproduce import write_summary
    from lightning_immunize.evaluation.tables import summary_table

    texts = {p: p.read_text() for p in [ROOT / "README.md", *(ROOT / "docs").rglob("*.md")]}
    texts.update({p: p.read_text() for p in (ROOT / "lightning_immunize").rglob("*.py")})
    texts.update({p: p.read_text() for p in (ROOT / "configs").glob("*.yaml")})
    (tmp_path / "runs.csv").write_text(
        "method,seed,pretrain,harmful,rir,ratio_harmful,ratio_pretrain,immunized,seconds\n"
        "ours,1,,,2.0,2.0,1.0,False,0.1\n"
    )
    texts["table.md"] = write_summary("house-prices", tmp_path).read_text()
    texts["summary"] = summary_table(
        [{"method": "ours", "rir": "1", "immunized": "False", "seconds": "1"}]
    )
    cited = [str(name) for name, text in texts.items() if "SPEC §" in text]
    assert not cited


def test_reproduce_runs_from_any_directory(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = run_cli("reproduce", "house-prices", "--out", "sweep", "--methods", "reference",
                  "--seeds", "1", "--no-progress", cwd=elsewhere)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert (elsewhere / "sweep" / "runs.csv").is_file()
    assert "--out sweep" in (elsewhere / "sweep" / "table.md").read_text()


def test_fit_help_names_every_method(capsys):
    from lightning_immunize.cli import main

    with pytest.raises(SystemExit) as info:
        main(["fit", "--help"])
    assert info.value.code == 0
    text = "".join(capsys.readouterr().out.split())  # the help wraps long class paths
    for name in ("ConditionNumberObjective", "SimulatedAttackObjective",
                 "TamperResistanceObjective", "AttackerAwareConditionNumberObjective"):  # fmt: skip
        assert name in text, name
