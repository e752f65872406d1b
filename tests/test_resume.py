"""Nothing lost on interruption: a fit SIGKILLed mid-epoch and resumed from its last
checkpoint ends where the uninterrupted fit ends (float64, CPU, deterministic)."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from support.helpers import run_fit

from lightning_immunize.evaluation.report import REPORT_NAME


def _checkpointed_fit(
    run_dir: Path, *extra: str, resume: bool = False
) -> subprocess.CompletedProcess:
    callbacks = [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {
                "dirpath": str(run_dir / "ckpt"),
                "every_n_train_steps": 7,
                "save_last": True,
                "save_top_k": 0,
            },
        },
        {
            "class_path": "fault_callbacks.SaveFinalWeights",
            "init_args": {"path": str(run_dir / "final.pt")},
        },
    ]
    args = [
        "--trainer.max_epochs", "3",
        "--trainer.logger", "false",
        "--trainer.callbacks", json.dumps(callbacks),
        "--data.init_args.batch_size", "16",
        *extra,
    ]  # fmt: skip
    if resume:
        args += ["--ckpt_path", str(run_dir / "ckpt" / "last.ckpt")]
    return run_fit("digits", run_dir, *args)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path):
    full = _checkpointed_fit(tmp_path / "full")
    assert full.returncode == 0, full.stderr[-3000:]

    killed_dir = tmp_path / "killed"
    kill = json.dumps([{"class_path": "fault_callbacks.KillAtStep", "init_args": {"step": 17}}])
    killed = _checkpointed_fit(killed_dir, "--trainer.callbacks+", kill)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (killed_dir / "final.pt").exists()
    ckpt = torch.load(killed_dir / "ckpt" / "last.ckpt", weights_only=True)
    progress = ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]
    # The last checkpoint is mid-epoch: step 14 = batch 2 of epoch 1 (12 batches an epoch).
    assert ckpt["global_step"] == 14 and progress["processed"] == 2

    resumed = _checkpointed_fit(killed_dir, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    a = torch.load(tmp_path / "full" / "final.pt", weights_only=True)
    b = torch.load(killed_dir / "final.pt", weights_only=True)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == torch.float64
        assert torch.allclose(a[key], b[key], rtol=0, atol=1e-10), key

    report_a = json.loads((tmp_path / "full" / REPORT_NAME).read_text())
    report_b = json.loads((killed_dir / REPORT_NAME).read_text())
    report_a.pop("seconds"), report_b.pop("seconds")
    assert report_a.keys() == report_b.keys()
    for key, value in report_a.items():
        if isinstance(value, float):
            assert report_b[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
        else:
            assert report_b[key] == value, key


def test_resume_mid_epoch_with_a_cycled_shorter_side(tmp_path):
    """In-process: D_P has 3× the batches of D_H, so D_H cycles within an epoch; resuming
    from a mid-epoch or an end-of-epoch checkpoint ends bitwise where the uninterrupted run
    ends."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import TensorDataset

    from lightning_immunize.datamodules import PairedDataModule
    from lightning_immunize.models import LinearExtractor, LinearHead
    from lightning_immunize.module import ImmunizationModule

    gen = torch.Generator().manual_seed(0)
    pretrain = TensorDataset(torch.randn(60, 6, generator=gen), torch.zeros(60))
    harmful = TensorDataset(torch.randn(20, 6, generator=gen), torch.ones(20))

    def fit(dirpath: Path, ckpt_path: str | None = None, every: int = 5) -> dict[str, torch.Tensor]:
        pl.seed_everything(0)
        module = ImmunizationModule(
            LinearExtractor(6, 6, seed=1), LinearHead(6, 1, "binary"), method="ours"
        )
        dm = PairedDataModule(pretrain, harmful, batch_size=8, task="binary", num_classes=2)
        trainer = pl.Trainer(
            max_epochs=2,
            precision="64-true",
            accelerator="cpu",
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[
                ModelCheckpoint(
                    dirpath, every_n_train_steps=every, save_top_k=-1, filename="{step}"
                )
            ],
        )
        trainer.fit(module, dm, ckpt_path=ckpt_path)
        return module.state_dict()

    full = fit(tmp_path / "full")
    # 8 batches an epoch (D_H's 3 cycle): steps 5 and 10 are mid-epoch, D_H mid-cycle.
    for step in (5, 10):
        resumed = fit(tmp_path / f"from{step}", str(tmp_path / "full" / f"step={step}.ckpt"))
        for key, value in full.items():
            assert torch.equal(value, resumed[key]), (step, key)
    # Step 8 is the end of epoch 0 (saved on its last batch): the next epoch must start from
    # the shuffle state as it was, not from a replay of epoch 0.
    fit(tmp_path / "full4", every=4)
    resumed = fit(tmp_path / "from8", str(tmp_path / "full4" / "step=8.ckpt"), every=4)
    for key, value in full.items():
        assert torch.equal(value, resumed[key]), (8, key)
