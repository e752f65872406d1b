"""Bad input is refused before any work, in one line with exit status 2: house-prices cells,
config keys and values, storages, export paths, image files, batches larger than the data."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lightning_immunize.datamodules import HousePricesDataModule

ROOT = Path(__file__).resolve().parents[1]
HOUSE_CSV = ROOT.parent / "shared" / "data" / "house-prices" / "train.csv"


def _error(out: subprocess.CompletedProcess) -> str:
    """The one error line; asserts exit status 2 and nothing more than the --debug hint."""
    assert out.returncode == 2, out.stderr[-3000:]
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("lightning-immunize: error")]
    assert len(errors) == 1, out.stderr[-3000:]
    assert "Traceback" not in out.stderr and "usage:" not in out.stderr, out.stderr[-3000:]
    return errors[0]


# --------------------------------------------------------------------------- house prices
@pytest.fixture(scope="module")
def house() -> pd.DataFrame:
    return pd.read_csv(HOUSE_CSV)


def _write(frame: pd.DataFrame, path: Path) -> Path:
    frame.to_csv(path, index=False)
    return path


def test_an_empty_target_is_an_error_naming_the_column(house, tmp_path):
    bad = house.copy()
    bad["SalePrice"] = np.nan
    with pytest.raises(ValueError, match="'SalePrice' of the harmful split is empty"):
        HousePricesDataModule(_write(bad, tmp_path / "x.csv")).setup("fit")


def test_a_missing_target_value_names_its_line(house, tmp_path):
    bad = house.copy()
    row = bad.index[bad["MSZoning"] == "RL"][3]
    bad.loc[row, "SalePrice"] = np.nan
    with pytest.raises(ValueError, match=f"'SalePrice' .* missing on line {row + 2} "):
        HousePricesDataModule(_write(bad, tmp_path / "x.csv")).setup("fit")


def test_a_constant_target_is_an_error(house, tmp_path):
    bad = house.copy()
    bad["LotArea"] = 8450
    with pytest.raises(ValueError, match="'LotArea' of the pretrain split is constant"):
        HousePricesDataModule(_write(bad, tmp_path / "x.csv")).setup("fit")


@pytest.mark.parametrize("value", [np.inf, -np.inf])
def test_a_non_finite_cell_names_its_column_and_line(house, tmp_path, value):
    bad = house.copy()
    bad.loc[7, "LotFrontage"] = value
    with pytest.raises(ValueError, match=r"'LotFrontage' holds a non-finite value .* on line 9 "):
        HousePricesDataModule(_write(bad, tmp_path / "x.csv")).setup("fit")


def test_a_string_in_a_numeric_column_names_its_column_and_line(house, tmp_path):
    bad = house.copy().astype({"GrLivArea": object})
    bad.loc[11, "GrLivArea"] = "1,710 sq ft"
    with pytest.raises(ValueError, match=r"'GrLivArea' is numeric but line 13 holds '1,710 sq ft'"):
        HousePricesDataModule(_write(bad, tmp_path / "x.csv")).setup("fit")


def test_bad_house_data_on_the_command_line_is_one_line_and_makes_no_run_folder(
    cli, house, tmp_path
):
    bad = house.copy()
    bad.loc[7, "LotFrontage"] = np.inf
    csv = _write(bad, tmp_path / "x.csv")
    root = tmp_path / "runs"
    out = cli(
        "fit", "--config", "configs/house_prices.yaml", "--data.init_args.csv_path", str(csv),
        "--trainer.default_root_dir", str(root),
    )  # fmt: skip
    assert "'LotFrontage'" in _error(out) and "line 9" in _error(out)
    assert not root.exists()


# --------------------------------------------------------------------------- config errors
def _refused(*argv: str) -> str:
    """In-process ``lightning-immunize ARGV``: the user error it raises, which the command line
    prints as its one line (exit status 2)."""
    from lightning_immunize.cli import USER_ERRORS, main

    with pytest.raises(USER_ERRORS) as info:
        main(list(argv))
    message = _error_line(info.value)
    assert "\n" not in message, message
    return message


def _error_line(error: BaseException) -> str:
    from lightning_immunize.cli import error_line

    return error_line(error)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--seed_everything", "abc"], "--seed_everything: expected bool or int, got 'abc'."),
        (["--trainer.max_epochs", "x"], "--trainer.max_epochs: expected int or NoneType"),
        (["--model.objective.init_args.lambda_harmfull", "3"], "lambda_harmfull"),
        (["--model.objective", "Bogus"], "--model.objective: expected Objective or NoneType"),
        (["--config", "no/such.yaml"], "no/such.yaml"),
    ],
    ids=["seed", "int", "misspelled-init-arg", "unknown-class", "missing-config"],
)
def test_a_bad_argument_is_one_line_naming_the_key(args, expected):
    assert expected in _refused("fit", "--config", "configs/digits.yaml", *args)


def test_a_misspelled_key_in_a_config_file_is_one_line_naming_it(cli, tmp_path):
    config = (ROOT / "configs" / "digits.yaml").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(config.replace("max_epochs: 30", "max_epoch: 30"))
    line = _error(cli("fit", "--config", str(bad)))  # the whole way: stderr, exit status
    assert "unknown key 'trainer.max_epoch'" in line and "fit --help" in line


# --------------------------------------------------------------------------- batches
def test_a_side_smaller_than_a_batch_says_so_or_refuses_a_run_without_steps(caplog):
    import logging

    with pytest.raises(ValueError, match="50 samples, fewer than batch_size=64.*no training step"):
        HousePricesDataModule(HOUSE_CSV, train_rows=50, drop_last=True).setup("fit")
    logger = logging.getLogger("lightning.pytorch")  # rank_zero_info's, maybe not propagated
    attach = not logger.propagate
    if attach:
        logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO):
            dm = HousePricesDataModule(HOUSE_CSV, train_rows=50, drop_last=False)
            dm.setup("fit")
            dm.setup("fit")  # said once
    finally:
        if attach:
            logger.removeHandler(caplog.handler)
    said = [r.getMessage() for r in caplog.records if "whole set" in r.getMessage()]
    assert len(said) == 2  # one line a side: both have 50 training rows
    assert all("each of its batches is the whole set of 50" in m for m in said)


# --------------------------------------------------------------------------- files
def test_an_unwritable_export_path_is_refused_before_loading(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    line = _refused("export", "--ckpt", "no-such.ckpt", "--out", f"{blocker}/m.safetensors")
    assert f"cannot write {blocker}/m.safetensors" in line


@pytest.mark.parametrize("kind", ["not-a-database", "not-creatable"])
def test_a_bad_storage_is_refused_naming_it_and_leaves_no_out_folder(tmp_path, kind):
    if kind == "not-a-database":
        path = tmp_path / "studies.db"
        path.write_text("these are my notes")
    else:
        (tmp_path / "a-file").write_text("x")
        path = tmp_path / "a-file" / "studies.db"
    out = tmp_path / "card"
    line = _refused("attack", "--config", "configs/digits.yaml", "--ckpt", "no-such.ckpt",
                    "--out", str(out), "--budget", "quick",
                    "--storage", f"sqlite:///{path}")  # fmt: skip
    assert str(path) in line
    assert not out.exists()


def _image_pair(root: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for side, classes in (("pretrain", "ab"), ("harmful", "xy")):
        for name in classes:
            folder = root / side / "train" / name
            folder.mkdir(parents=True)
            for i in range(3):
                pixels = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")


def test_an_empty_image_file_is_named_at_setup(tmp_path):
    from lightning_immunize.datamodules import ImagePairDataModule

    _image_pair(tmp_path)
    empty = tmp_path / "harmful" / "train" / "y" / "empty.jpg"
    empty.write_bytes(b"")
    dm = ImagePairDataModule(tmp_path / "pretrain", tmp_path / "harmful", image_size=8,
                             batch_size=2, val_subdir=None)  # fmt: skip
    with pytest.raises(ValueError, match=f"image file {empty} is empty"):
        dm.setup("fit")


def test_a_corrupt_image_is_named_before_any_run_folder(cli, tmp_path):
    _image_pair(tmp_path)
    corrupt = tmp_path / "pretrain" / "train" / "b" / "1.png"
    corrupt.write_bytes(corrupt.read_bytes()[:40])
    root = tmp_path / "runs"
    line = _error(cli(
        "fit", "--config", "configs/cnn_mnist.yaml",
        "--data", "lightning_immunize.datamodules.ImagePairDataModule",
        "--data.init_args.pretrain_root", str(tmp_path / "pretrain"),
        "--data.init_args.harmful_root", str(tmp_path / "harmful"),
        "--data.init_args.image_size", "8", "--data.init_args.batch_size", "2",
        "--data.init_args.val_subdir", "null", "--trainer.default_root_dir", str(root),
    ))  # fmt: skip
    assert f"image file {corrupt} cannot be read" in line
    assert not root.exists()
