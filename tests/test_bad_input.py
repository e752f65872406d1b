"""Bad input gets a clear message: partial-run and non-checkpoint exports, incomplete House
Prices CSVs, image folders without a validation set, and the exported file's permissions."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lightning_immunize.cli import main
from lightning_immunize.datamodules import HousePricesDataModule, ImagePairDataModule
from lightning_immunize.export import export_checkpoint, load_checkpoint

REPO = Path(__file__).resolve().parents[1]
HOUSE_CSV = REPO.parent / "shared" / "data" / "house-prices" / "train.csv"
needs_house = pytest.mark.skipif(not HOUSE_CSV.is_file(), reason=f"no {HOUSE_CSV}")
EXPECTED_LOCATION = "lightning_logs/version_N/checkpoints/"


class RaiseAtStep(pl.Callback):
    """Raises after optimizer step ``step``: fit stops as on a crash (``last.ckpt`` is saved)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"interrupted at step {self.step}")


def _fit(root: Path, max_epochs: int, *extra: str) -> Path:
    main(
        [
            "fit",
            "--config",
            str(REPO / "configs" / "digits.yaml"),
            "--trainer.default_root_dir",
            str(root),
            "--trainer.max_epochs",
            str(max_epochs),
            "--trainer.enable_progress_bar",
            "false",
            *extra,
        ]
    )
    (run,) = (root / "lightning_logs").iterdir()
    return run


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A digits fit of 1 epoch (3 steps) that ran to its end."""
    return _fit(tmp_path_factory.mktemp("finished"), 1)


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory) -> Path:
    """A digits fit planned for 3 epochs (9 steps) that crashed after step 4."""
    root = tmp_path_factory.mktemp("interrupted")
    callback = [{"class_path": f"{__name__}.RaiseAtStep", "init_args": {"step": 4}}]
    with pytest.raises(RuntimeError, match="interrupted at step 4"):
        _fit(root, 3, "--trainer.callbacks+", json.dumps(callback))
    (run,) = (root / "lightning_logs").iterdir()
    return run


def _header(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


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


# --------------------------------------------------------------------------- 12: house prices
def _house_csv(tmp_path: Path, drop: list[str]) -> Path:
    path = tmp_path / "train.csv"
    pd.read_csv(HOUSE_CSV).drop(columns=drop).to_csv(path, index=False)
    return path


@needs_house
def test_house_prices_names_the_missing_feature_columns(tmp_path: Path):
    csv = _house_csv(tmp_path, ["LotFrontage", "PoolQC"])
    with pytest.raises(ValueError, match=r"LotFrontage.*PoolQC") as info:
        HousePricesDataModule(csv_path=csv).setup("fit")
    message = str(info.value)
    assert str(csv) in message and "drop_columns" in message


@needs_house
def test_house_prices_logs_the_filled_missing_values(caplog):
    df = pd.read_csv(HOUSE_CSV)
    harmful = df[df["MSZoning"] == "RL"]
    pretrain = df[df["MSZoning"] != "RL"]
    # rank_zero_info logs to "lightning.pytorch...", which does not propagate to the root
    # logger (caplog's) when Lightning was imported before any logging was configured.
    logger = logging.getLogger("lightning.pytorch")
    attach = not logger.propagate
    if attach:
        logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO):
            dm = HousePricesDataModule(csv_path=HOUSE_CSV)
            dm.setup("fit")
            dm.setup("validate")  # built once: logged once
    finally:
        if attach:
            logger.removeHandler(caplog.handler)
    messages = [r.getMessage() for r in caplog.records if "missing value" in r.getMessage()]
    assert len(messages) == 1, messages
    (message,) = messages
    # One count per column over both splits, largest first: brief.
    both = {c: int(harmful[c].isna().sum() + pretrain[c].isna().sum()) for c in harmful.columns}
    assert f"LotFrontage {both['LotFrontage']}," in message
    assert f"in 19 columns: PoolQC {both['PoolQC']}," in message
    assert "0" in message and str(HOUSE_CSV) in message and "\n" not in message


# --------------------------------------------------------------------------- 13: images
def _images(root: Path, classes: list[str], per_class: int = 2) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")


def test_image_folder_without_train_and_val_says_so(tmp_path: Path):
    pretrain, harmful = tmp_path / "pretrain", tmp_path / "harmful"
    _images(pretrain / "train", ["a", "b"])
    _images(pretrain / "val", ["a", "b"], per_class=1)
    _images(harmful, ["x", "y"])
    dm = ImagePairDataModule(pretrain, harmful, image_size=8, batch_size=2)
    with pytest.warns(UserWarning, match="no validation set") as record:
        dm.setup("fit")
    messages = [str(w.message) for w in record if "no validation set" in str(w.message)]
    assert len(messages) == 1 and str(harmful) in messages[0] and "'train'" in messages[0]
    assert dm.val_harmful is None and dm.val_pretrain is not None


def test_image_folder_with_train_but_no_val_says_so(tmp_path: Path):
    pretrain, harmful = tmp_path / "pretrain", tmp_path / "harmful"
    _images(pretrain / "train", ["a", "b"])
    _images(pretrain / "val", ["a", "b"], per_class=1)
    _images(harmful / "train", ["x", "y"])
    with pytest.warns(UserWarning, match="no validation set") as record:
        ImagePairDataModule(pretrain, harmful, image_size=8, batch_size=2).setup("fit")
    messages = [str(w.message) for w in record if "no validation set" in str(w.message)]
    assert len(messages) == 1 and str(harmful / "val") in messages[0]


def test_image_folder_with_val_but_no_train_is_an_error(tmp_path: Path):
    pretrain, harmful = tmp_path / "pretrain", tmp_path / "harmful"
    _images(pretrain / "train", ["a", "b"])
    _images(harmful / "val", ["x", "y"])
    with pytest.raises(ValueError, match="'val'.*'train'") as info:
        ImagePairDataModule(pretrain, harmful, image_size=8, batch_size=2).setup("fit")
    assert str(harmful) in str(info.value)


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
