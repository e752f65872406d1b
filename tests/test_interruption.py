"""Checkpoints you can trust after a stop: ``last.ckpt`` on disk during the fit, a Ctrl-C or
SIGTERM at a random moment resumed to the uninterrupted run's weights and metrics, a SIGKILL
that never makes ``--ckpt_path last`` touch a finished run, and no command that uses a
checkpoint older than the run's report."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from support.helpers import cli_command, cli_env, fit_args, fit_digits, run_fit

ROOT = Path(__file__).resolve().parents[1]
RUN = Path("lightning_logs")


def _fit_here(root: Path, *extra: str) -> None:
    """The house-prices fit of ``run_fit`` in this process (no Python start-up; exceptions
    as they are)."""
    import warnings

    from lightning_immunize.cli import main

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(fit_args("house_prices", root, *extra)) == 0
    assert not [w for w in caught if "weights_only" in str(w.message)]


def _state(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The house-prices fit of the README (300 steps), never interrupted: its run folder."""
    root = tmp_path_factory.mktemp("full")
    _fit_here(root)
    return root / RUN / "version_0"


def _assert_same_run(run: Path, reference: Path) -> None:
    a, b = (
        _state(run / "checkpoints" / "last.ckpt"),
        _state(reference / "checkpoints" / "last.ckpt"),
    )
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    report = json.loads((run / "immunization.json").read_text())
    expected = json.loads((reference / "immunization.json").read_text())
    assert report["steps"] == expected["steps"] == 300
    assert report["rir"] == pytest.approx(expected["rir"], rel=1e-12)
    # Every metric row of both segments, none twice, none lost.
    assert (run / "metrics.csv").read_text() == (reference / "metrics.csv").read_text()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == sorted(
        p.name for p in (reference / "checkpoints").iterdir()
    )  # last.ckpt overwritten in place: no last-v1.ckpt


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stop_at_a_random_moment_resumes_to_the_uninterrupted_weights(
    cli, uninterrupted, tmp_path, signum
):
    seed = random.randrange(10**6)
    delay = random.Random(seed).uniform(0.0, 1.2)
    proc = subprocess.Popen(
        cli_command(*fit_args("house_prices", tmp_path)), cwd=ROOT, env=cli_env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    run = tmp_path / RUN / "version_0"
    deadline = time.monotonic() + 120
    while not (run / "checkpoints" / "last.ckpt").is_file() and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(delay)  # somewhere in the 300 steps: mid-batch, mid-epoch, at validation...
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    context = f"seed {seed}, delay {delay:.3f} s: {stderr[-2000:]}"
    if proc.returncode == 0:
        pytest.skip(f"the fit ended before the signal ({context})")
    assert proc.returncode == 128 + signum, context
    lines = [ln for ln in stderr.splitlines() if ln.startswith("lightning-immunize: interrupted")]
    assert len(lines) == 1 and "--ckpt_path last" in lines[0], context
    assert "Traceback" not in stderr, context
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 0 < saved < 300 and f"at step {saved}" in lines[0], context
    assert not (run / "immunization.json").exists()

    _fit_here(tmp_path, "--ckpt_path", "last")
    assert sorted(p.name for p in (tmp_path / RUN).iterdir()) == ["version_0"]
    _assert_same_run(run, uninterrupted)

    # The export of the resumed run carries its final weights and the fit's end.
    from lightning_immunize.export import export_checkpoint

    exported, header = export_checkpoint(
        run / "checkpoints" / "last.ckpt", run / "immunized.safetensors"
    )
    final = _state(uninterrupted / "checkpoints" / "last.ckpt")
    with safe_open(str(exported), framework="pt") as f:
        for key in f.keys():
            assert torch.equal(f.get_tensor(key), final[f"extractor.{key}"]), key
    assert header["steps"] == 300 and header["partial"] is False


def _stop_at(step: int, kind: str = "InterruptAtStep", **init_args: object) -> str:
    return json.dumps(
        [{"class_path": f"fault_callbacks.{kind}", "init_args": {"step": step, **init_args}}]
    )


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["InterruptAtStep", "InterruptInValidation"])
def test_sigterm_at_an_epoch_that_validates_keeps_its_validation_row(uninterrupted, tmp_path, kind):
    """SIGTERM in the last batch of an epoch that validates (step 90) or in that validation:
    the validation runs before the stop or again on resume, never lost (Lightning's own SIGTERM
    handling would stop before it, or in it, behind a checkpoint that resumes past it)."""
    stopped = run_fit(
        "house_prices", tmp_path, "--trainer.callbacks+", _stop_at(90, kind, signum="SIGTERM")
    )
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr
    run = tmp_path / RUN / "version_0"
    # On disk at the stop: the uninterrupted run's rows up to the validation of epoch 29.
    rows = (run / "metrics.csv").read_text().splitlines()
    expected = (uninterrupted / "metrics.csv").read_text().splitlines()
    assert rows == expected[: len(rows)] and any(row.startswith("29,89,,") for row in rows)
    _fit_here(tmp_path, "--ckpt_path", "last")
    _assert_same_run(run, uninterrupted)


@pytest.mark.slow
def test_sigkill_and_stops_then_ckpt_path_last_resume_the_killed_run_never_the_finished_one(
    uninterrupted, tmp_path
):
    _fit_here(tmp_path, "--trainer.max_epochs", "5")
    done = tmp_path / RUN / "version_0"
    before = {p.name: p.read_bytes() for p in done.rglob("*") if p.is_file()}

    killed = run_fit("house_prices", tmp_path, "--trainer.callbacks+", _stop_at(50, "KillAtStep"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    run = tmp_path / RUN / "version_1"
    # Written after the last batch of the last epoch before the kill (3 batches an epoch).
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 48

    # Stopped again: at step 90, the end of an epoch that validates (validation runs, then the
    # stop), and at step 100, mid-epoch in a run resumed from an epoch's end (where Lightning
    # 2.6 alone would resume a batch off).
    for step in (90, 100):
        stopped = run_fit(
            "house_prices", tmp_path, "--ckpt_path", "last", "--trainer.callbacks+", _stop_at(step)
        )
        assert stopped.returncode == 130, stopped.stderr[-3000:]
        assert f"resuming the unfinished run {run}" in stopped.stderr
        assert f"at step {step}." in stopped.stderr

    _fit_here(tmp_path, "--ckpt_path", "last")
    assert {p.name: p.read_bytes() for p in done.rglob("*") if p.is_file()} == before
    _assert_same_run(run, uninterrupted)

    with pytest.raises(FileNotFoundError) as info:
        _fit_here(tmp_path, "--ckpt_path", "last")
    assert "no unfinished run" in str(info.value) and "version_0, version_1" in str(info.value)


def test_last_ckpt_is_on_disk_at_every_epoch_end_during_the_fit(tmp_path):
    """Polled from inside the fit: at the start of epoch e, last.ckpt holds the end of e-1."""
    import lightning.pytorch as pl
    from torch.utils.data import TensorDataset

    from lightning_immunize.callbacks import LastCheckpoint
    from lightning_immunize.datamodules import PairedDataModule
    from lightning_immunize.models import LinearExtractor, LinearHead
    from lightning_immunize.module import ImmunizationModule

    seen: list[tuple[int, int | None]] = []

    class Poll(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module) -> None:
            last = tmp_path / "last.ckpt"
            step = torch.load(last, weights_only=True)["global_step"] if last.is_file() else None
            seen.append((trainer.current_epoch, step))

    gen = torch.Generator().manual_seed(0)
    pretrain = TensorDataset(torch.randn(40, 5, generator=gen), torch.zeros(40))
    harmful = TensorDataset(torch.randn(40, 5, generator=gen), torch.ones(40))
    module = ImmunizationModule(LinearExtractor(5, 5, seed=1), LinearHead(5, 1, "binary"))
    trainer = pl.Trainer(
        max_epochs=4,
        precision="64-true",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        check_val_every_n_epoch=10,
        callbacks=[Poll(), LastCheckpoint(str(tmp_path))],
    )
    trainer.fit(
        module, PairedDataModule(pretrain, harmful, batch_size=8, task="binary", num_classes=2)
    )
    assert seen == [(0, None), (1, 5), (2, 10), (3, 15)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    """A digits fit of 2 epochs, this file's own (its tests add a checkpoint to it)."""
    return fit_digits(tmp_path_factory.mktemp("digits"), 2)


@pytest.mark.parametrize("command", ["export", "evaluate", "attack"])
def test_a_checkpoint_behind_the_runs_report_is_refused_naming_both_steps(
    digits_run, tmp_path, command
):
    from lightning_immunize.cli import main

    checkpoint = torch.load(digits_run / "checkpoints" / "last.ckpt", weights_only=True)
    steps = json.loads((digits_run / "immunization.json").read_text())["steps"]
    assert checkpoint["global_step"] == steps
    checkpoint["global_step"] = 3
    stale = digits_run / "checkpoints" / "stale.ckpt"
    torch.save(checkpoint, stale)
    args = {
        "export": ["--ckpt", str(stale), "--out", str(tmp_path / "x.safetensors")],
        "evaluate": [str(digits_run), "--ckpt", str(stale), "--out", str(tmp_path / "ev")],
        "attack": [str(digits_run), "--ckpt", str(stale), "--out", str(tmp_path / "card")],
    }[command]
    with pytest.raises(ValueError) as info:
        main([command, *args])
    assert "holds step 3" in str(info.value) and f"at step {steps}" in str(info.value)
    assert list(tmp_path.iterdir()) == []  # refused before any work


def test_stop_requests_defer_only_inside_a_training_loop_and_forget_old_stops():
    from lightning_immunize.interruption import Interrupted, StopRequests

    stops = StopRequests()
    original = signal.getsignal(signal.SIGINT)
    with stops.installed():
        with pytest.raises(Interrupted) as info:  # outside a training loop: at once
            os.kill(os.getpid(), signal.SIGTERM)
        assert info.value.exit_status == 143
        stops.begin_deferring()
        os.kill(os.getpid(), signal.SIGINT)  # inside: recorded only
        assert stops.requested and stops.signum == signal.SIGINT
        with pytest.raises(Interrupted):  # a second signal: at once
            os.kill(os.getpid(), signal.SIGINT)
        stops.end_deferring()
        stops.begin_deferring()  # the next training loop starts without the old stop
        assert not stops.requested
        stops.end_deferring()

        seen: list[int] = []  # a handler installed since (Lightning's SIGTERM handler)...
        foreign = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
        stops.begin_deferring()
        os.kill(os.getpid(), signal.SIGTERM)  # ...does not see a deferred stop
        assert stops.signum == signal.SIGTERM and seen == []
        stops.end_deferring()
        os.kill(os.getpid(), signal.SIGTERM)  # and is back afterwards
        assert seen == [signal.SIGTERM]
        signal.signal(signal.SIGTERM, foreign)
    assert signal.getsignal(signal.SIGINT) == original  # put back
