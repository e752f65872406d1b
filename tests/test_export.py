"""`lightning-immunize export` and ``lightning_immunize.export``: the safetensors file, its
header and the reload into a model; partial-run exports; what is not a checkpoint; the
exported file's permissions; a run folder as the only argument."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from support.helpers import fit_digits, run_cli

from lightning_immunize.cli import main
from lightning_immunize.export import export_checkpoint, load_checkpoint, load_exported
from lightning_immunize.models import LinearExtractor

EXPECTED_LOCATION = "lightning_logs/version_N/checkpoints/"


class RaiseAtStep(pl.Callback):
    """Raises after optimizer step ``step``: fit stops as on a crash (``last.ckpt`` is saved)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"interrupted at step {self.step}")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A digits fit of 1 epoch (3 steps) that ran to its end."""
    return fit_digits(tmp_path_factory.mktemp("finished"), 1)


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory) -> Path:
    """A digits fit planned for 3 epochs (9 steps) that crashed after step 4."""
    root = tmp_path_factory.mktemp("interrupted")
    callback = [{"class_path": f"{__name__}.RaiseAtStep", "init_args": {"step": 4}}]
    with pytest.raises(RuntimeError, match="interrupted at step 4"):
        fit_digits(root, 3, "--trainer.callbacks+", json.dumps(callback))
    (run,) = (root / "lightning_logs").iterdir()
    return run


def _header(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


# --------------------------------------------------------------------------- export, reload
def test_export_and_reload(digits_run: Path, tmp_path: Path, capsys):
    ckpt = digits_run / "checkpoints" / "last.ckpt"
    out = tmp_path / "immunized.safetensors"
    assert main(["export", "--ckpt", str(ckpt), "--out", str(out)]) == 0
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
        assert list(f.keys()) == ["linear.weight"]
    report = json.loads((digits_run / "immunization.json").read_text())
    assert meta["method"] == "ours" and float(meta["lambda_harmful"]) == 1000.0
    assert float(meta["rir"]) == pytest.approx(report["rir"])
    assert "library_version" in meta
    assert json.loads(meta["data_fingerprint"]) == report["data_fingerprint"]
    assert len(report["data_fingerprint"]["harmful"]) == 16
    extractor = LinearExtractor(64, 64)
    load_exported(out, extractor)
    state = load_checkpoint(ckpt)["state_dict"]
    assert torch.equal(extractor.linear.weight, state["extractor.linear.weight"].float())
    with pytest.raises(ValueError, match=r"linear.weight: file \(64, 64\) vs model \(32, 64\)"):
        load_exported(out, LinearExtractor(64, 32))


def test_export_errors(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        main(
            [
                "export",
                "--ckpt",
                str(tmp_path / "none.ckpt"),
                "--out",
                str(tmp_path / "x.safetensors"),
            ]
        )


# --------------------------------------------------------------------------- 5: partial runs
def test_export_of_an_interrupted_run_says_partial(interrupted_run: Path, tmp_path: Path):
    assert not (interrupted_run / "immunization.json").exists()
    ckpt = interrupted_run / "checkpoints" / "last.ckpt"
    out, metadata = export_checkpoint(ckpt, tmp_path / "m.safetensors")
    assert metadata["partial"] is True
    # A crash mid-step leaves last.ckpt at the last safe point: the end of epoch 1 (step 3).
    assert metadata["steps"] == 3 and metadata["epochs"] == 1
    assert metadata["planned_epochs"] == 3
    assert "1 of 3" in metadata["partial_reason"]
    header = _header(out)
    assert header["partial"] == "true" and header["steps"] == "3"
    assert header["planned_epochs"] == "3"


def test_export_of_a_finished_run_says_not_partial(finished_run: Path, tmp_path: Path):
    for ckpt in (finished_run / "checkpoints").glob("*.ckpt"):
        out, metadata = export_checkpoint(ckpt, tmp_path / f"{ckpt.stem}.safetensors")
        assert metadata["partial"] is False, ckpt.name
        assert metadata["steps"] == 3 and metadata["epochs"] == 1
        assert metadata["planned_epochs"] == 1
        assert _header(out)["partial"] == "false"
        assert "rir" in metadata


def test_export_partial_unknown_or_from_the_missing_report(finished_run: Path, tmp_path: Path):
    ckpt = finished_run / "checkpoints" / "last.ckpt"
    # A checkpoint outside any run folder: nothing tells what was planned.
    loose = tmp_path / "loose.ckpt"
    shutil.copy(ckpt, loose)
    _, metadata = export_checkpoint(loose, tmp_path / "loose.safetensors")
    assert metadata["partial"] == "unknown" and metadata["steps"] == 3
    assert "planned_epochs" not in metadata
    # A run folder without config.yaml and without immunization.json: fit never reached its end.
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(ckpt, run / "checkpoints" / "last.ckpt")
    _, metadata = export_checkpoint(run / "checkpoints" / "last.ckpt", tmp_path / "r.safetensors")
    assert metadata["partial"] is True
    assert "immunization.json" in metadata["partial_reason"]


# --------------------------------------------------------------------------- 11: not a ckpt
def _text(path: Path) -> None:
    path.write_text("hello\nthis is not a checkpoint\n")


def _random(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes())


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _safetensors(path: Path) -> None:
    save_file({"linear.weight": torch.zeros(2, 2)}, str(path))


def _tensor(path: Path) -> None:
    torch.save(torch.zeros(3), path)


def _plain_dict(path: Path) -> None:
    torch.save({"weights": torch.zeros(3), "step": 7}, path)


@pytest.mark.parametrize(
    ("make", "found"),
    [
        (_text, "text"),
        (_random, "torch.load"),
        (_empty, "empty"),
        (_safetensors, "safetensors"),
        (_tensor, "Tensor"),
        (_plain_dict, "'weights'"),
    ],
)
def test_load_checkpoint_rejects_what_is_not_a_checkpoint(tmp_path: Path, make, found: str):
    path = tmp_path / "model.ckpt"
    make(path)
    with pytest.raises(ValueError, match="is not a Lightning checkpoint") as info:
        load_checkpoint(path)
    message = str(info.value)
    assert str(path) in message and found in message and EXPECTED_LOCATION in message
    with pytest.raises(ValueError, match="is not a Lightning checkpoint"):
        export_checkpoint(path, tmp_path / "x.safetensors")


def test_load_checkpoint_rejects_a_truncated_checkpoint(finished_run: Path, tmp_path: Path):
    data = (finished_run / "checkpoints" / "last.ckpt").read_bytes()
    path = tmp_path / "truncated.ckpt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="is not a Lightning checkpoint") as info:
        load_checkpoint(path)
    assert "zip" in str(info.value) and EXPECTED_LOCATION in str(info.value)


# --------------------------------------------------------------------------- 14: file mode
def test_exported_file_is_as_readable_as_any_new_file(finished_run: Path, tmp_path: Path):
    out, _ = export_checkpoint(
        finished_run / "checkpoints" / "last.ckpt", tmp_path / "m.safetensors"
    )
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert oct(out.stat().st_mode & 0o777) == oct(plain.stat().st_mode & 0o777)
    # and under a stricter umask too
    old = os.umask(0o077)
    try:
        out2, _ = export_checkpoint(
            finished_run / "checkpoints" / "last.ckpt", tmp_path / "m2.safetensors"
        )
    finally:
        os.umask(old)
    assert out2.stat().st_mode & 0o777 == 0o600


# --------------------------------------------------------------------------- run folders
def test_export_without_out_writes_inside_the_run_folder(digits_cli_run):
    run, _ = digits_cli_run
    out = run_cli("export", str(run))
    assert out.returncode == 0, out.stderr[-3000:]
    assert (run / "immunized.safetensors").is_file()
    assert str(run / "immunized.safetensors") in out.stdout
