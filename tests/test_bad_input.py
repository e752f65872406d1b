"""Bad input gets a clear message: incomplete House Prices CSVs and image folders without a
validation set. (Partial-run and non-checkpoint exports and the exported file's permissions:
test_export.py.)"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lightning_immunize.datamodules import HousePricesDataModule, ImagePairDataModule

REPO = Path(__file__).resolve().parents[1]
HOUSE_CSV = REPO.parent / "shared" / "data" / "house-prices" / "train.csv"
needs_house = pytest.mark.skipif(not HOUSE_CSV.is_file(), reason=f"no {HOUSE_CSV}")


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
