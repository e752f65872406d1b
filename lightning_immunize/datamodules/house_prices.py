"""Kaggle House Prices regression pair (the paper's Section 5.1).

Column decision
---------------
``train.csv`` has 81 columns: ``Id``, 79 explanatory columns and ``SalePrice``. The protocol says
"features: all other 79 columns". The default ``columns="per_split"`` reads that as the
reference code does: each split drops ``Id`` and **its own target**, so ``D_P`` (target
``LotArea``) keeps ``SalePrice`` as a feature and ``D_H`` (target ``SalePrice``) keeps
``LotArea``; both are 79 wide, in file order (``docs/results/README.md``: what the other
reading measured). ``columns="shared"`` gives both splits the same columns instead:
everything except the two targets (``Id`` kept, 79 wide). ``MSZoning`` is constant
(``"RL"``) inside ``D_H``, so it standardizes to a zero column there. ``drop_columns``
removes more columns.

Preprocessing, per split (``D_P`` and ``D_H`` separately, over all rows of the split by
default): missing values → 0 (for categorical columns: the category ``"0"`` before
encoding), categorical (non-numeric) columns → integer codes of their sorted categories
(as sklearn's ``LabelEncoder``), then every feature column and the target standardized with
the split's mean and population standard deviation (``ddof=0``); a constant column (std 0)
stays 0 after centering. Train = the first ``train_rows`` rows of each split (file order),
validation = the next ``val_rows``. The values filled are logged once per build (INFO: count
per column and split).

A file that looks like Kaggle's (at least half of its 81 columns) but lacks some of its
feature columns is an error naming them (the model's 79-wide input would not fit): leave
columns out with ``drop_columns`` instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import TensorDataset

from lightning_immunize.validation import unknown_choice

from .base import PairedDataModule

__all__ = ["HousePricesDataModule", "check_cells", "check_target", "encode_and_standardize"]

STANDARDIZE_ON = ("split", "train")
COLUMN_RULES = ("per_split", "shared")
#: The columns of Kaggle's ``train.csv``, in file order.
KAGGLE_COLUMNS = tuple(
    "Id MSSubClass MSZoning LotFrontage LotArea Street Alley LotShape LandContour Utilities "
    "LotConfig LandSlope Neighborhood Condition1 Condition2 BldgType HouseStyle OverallQual "
    "OverallCond YearBuilt YearRemodAdd RoofStyle RoofMatl Exterior1st Exterior2nd MasVnrType "
    "MasVnrArea ExterQual ExterCond Foundation BsmtQual BsmtCond BsmtExposure BsmtFinType1 "
    "BsmtFinSF1 BsmtFinType2 BsmtFinSF2 BsmtUnfSF TotalBsmtSF Heating HeatingQC CentralAir "
    "Electrical 1stFlrSF 2ndFlrSF LowQualFinSF GrLivArea BsmtFullBath BsmtHalfBath FullBath "
    "HalfBath BedroomAbvGr KitchenAbvGr KitchenQual TotRmsAbvGrd Functional Fireplaces "
    "FireplaceQu GarageType GarageYrBlt GarageFinish GarageCars GarageArea GarageQual "
    "GarageCond PavedDrive WoodDeckSF OpenPorchSF EnclosedPorch 3SsnPorch ScreenPorch PoolArea "
    "PoolQC Fence MiscFeature MiscVal MoSold YrSold SaleType SaleCondition SalePrice ".split()
)


def encode_and_standardize(
    frame: pd.DataFrame,
    feature_columns: Sequence[str],
    target: str,
    stats_rows: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Encodes and standardizes one split.

    Args:
        frame: the split's rows.
        feature_columns: columns forming the features, in order.
        target: target column (numeric).
        stats_rows: compute mean/std on the first ``stats_rows`` rows only (``None``: all).

    Returns:
        ``(X, y)``: float64 arrays of shapes ``(N, len(feature_columns))`` and ``(N,)``.
    """
    cols: list[np.ndarray] = []
    for name in feature_columns:
        col = frame[name]
        if pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col):
            cols.append(col.astype("float64").fillna(0.0).to_numpy())
        else:
            values = np.array(["0" if pd.isna(v) else str(v) for v in col.tolist()], dtype=object)
            _, codes = np.unique(values, return_inverse=True)
            cols.append(codes.astype(np.float64))
    x = np.stack(cols, axis=1) if cols else np.zeros((len(frame), 0))
    y = frame[target].astype("float64").fillna(0.0).to_numpy()
    ref = slice(None) if stats_rows is None else slice(0, stats_rows)
    return _standardize(x, ref), _standardize(y[:, None], ref)[:, 0]


def _standardize(a: np.ndarray, ref: slice) -> np.ndarray:
    mean = a[ref].mean(axis=0)
    std = a[ref].std(axis=0)
    centered = a - mean
    safe = np.where(std > 0, std, 1.0)
    return np.where(std > 0, centered / safe, 0.0)


def _line(index: object) -> int:
    """The file line of a row read by ``pd.read_csv`` (1-based, the header on line 1)."""
    return int(index) + 2  # type: ignore[call-overload]


def check_cells(frame: pd.DataFrame, path: Path | str) -> None:
    """Refuses cells that would silently train on garbage.

    Raises:
        ValueError: a column whose values are mostly numbers holds a non-numeric string (pandas
            would read the whole column as categories), or a numeric cell is ``±inf``; the
            message names the column, the first bad line of ``path`` and its value.
    """
    for name in frame.columns:
        col = frame[name]
        if pd.api.types.is_numeric_dtype(col):
            bad = col.index[np.isinf(col.to_numpy(dtype=np.float64, na_value=np.nan))]
            if len(bad):
                raise ValueError(
                    f"{path}: column {name!r} holds a non-finite value ({col[bad[0]]}) on line "
                    f"{_line(bad[0])} ({len(bad)} such cell(s)); expected finite numbers or "
                    "an empty cell."
                )
            continue
        present = col.dropna()
        as_numbers = pd.to_numeric(present, errors="coerce")
        if len(present) and as_numbers.notna().mean() >= 0.5:
            bad = present.index[as_numbers.isna()]
            raise ValueError(
                f"{path}: column {name!r} is numeric but line {_line(bad[0])} holds "
                f"{present[bad[0]]!r} ({len(bad)} non-numeric cell(s)); expected a number or "
                "an empty cell."
            )


def check_target(
    frame: pd.DataFrame, target: str, side: str, path: Path | str, stats_rows: int | None
) -> None:
    """Refuses a split's target that cannot be learned: missing values (a 0 would stand in
    for them) or one value for every row (nothing to predict; std 0).

    Raises:
        ValueError: naming the column, the split and the first bad line of ``path``.
    """
    y = frame[target]
    missing = y.index[y.isna()]
    if len(missing) == len(y):
        raise ValueError(
            f"{path}: target column {target!r} of the {side} split is empty (none of its "
            f"{len(y)} rows used has a value, from line {_line(y.index[0])}); expected numbers."
        )
    if len(missing):
        raise ValueError(
            f"{path}: target column {target!r} of the {side} split is missing on line "
            f"{_line(missing[0])} ({len(missing)} missing); expected a number in every row."
        )
    ref = y if stats_rows is None else y.iloc[:stats_rows]
    if ref.nunique() < 2:
        raise ValueError(
            f"{path}: target column {target!r} of the {side} split is constant "
            f"({ref.iloc[0]} on every row used, lines {_line(ref.index[0])}-"
            f"{_line(ref.index[-1])}): "
            "nothing to learn; expected varying values."
        )


class HousePricesDataModule(PairedDataModule):
    """House Prices pair: ``D_H`` = ``MSZoning == "RL"`` rows → ``SalePrice``; ``D_P`` = the
    other rows → ``LotArea`` (see the module docstring for the column decision).

    Samples are ``x`` float32 of shape ``(D,)`` (``D = 79`` by default) and ``y`` a float32
    scalar; ``task == "regression"``, ``num_classes is None``.

    Args:
        csv_path: path of Kaggle's ``train.csv`` (relative paths: against the working dir).
        train_rows: rows of each split used for training (first ones, file order).
        val_rows: following rows used for validation (0: no validation; ``None``: all the
            remaining rows).
        batch_size: per-side batch size (>= 2).
        zone_column: column whose value splits the data.
        harmful_zone: value of ``zone_column`` selecting ``D_H``.
        pretrain_target: target column of ``D_P``.
        harmful_target: target column of ``D_H``.
        drop_columns: extra columns to leave out of the features (e.g. ``("Id",)``).
        standardize_on: ``"split"`` (statistics over all rows of the split, as the
            reference) or ``"train"`` (over the training rows only).
        mode: training CombinedLoader mode.
        num_workers: DataLoader workers.
        shuffle: shuffle training loaders.
        seed: seed of the training shuffles. Default: the global seed (``seed_everything``,
            env ``PL_GLOBAL_SEED``), else 0.
        drop_last: drop the last incomplete training batch.
        dtype: ``"float64"`` (default) or ``"float32"``. Several columns are exact sums of
            others (e.g. ``TotalBsmtSF``); rounded to float32 such a dependency leaves a
            spurious singular value near 1e-8·σ_max that the float64 rank rule
            (``docs/numerical-rank.md``) would count, inflating κ(Σ) to ~1e16. Float64 keeps
            the dependency exact.

    """

    def __init__(
        self,
        csv_path: str | Path = "../shared/data/house-prices/train.csv",
        train_rows: int = 200,
        val_rows: int | None = 100,
        batch_size: int = 64,
        zone_column: str = "MSZoning",
        harmful_zone: str = "RL",
        pretrain_target: str = "LotArea",
        harmful_target: str = "SalePrice",
        drop_columns: Sequence[str] = (),
        standardize_on: str = "split",
        mode: str = "max_size_cycle",
        num_workers: int = 0,
        shuffle: bool = True,
        seed: int | None = None,
        drop_last: bool = False,
        dtype: str = "float64",
        columns: str = "per_split",
        id_column: str | None = "Id",
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            mode=mode,
            num_workers=num_workers,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
            task="regression",
            num_classes=None,
        )
        if train_rows < 2:
            raise ValueError(f"train_rows must be >= 2, got {train_rows}.")
        if val_rows is not None and val_rows < 0:
            raise ValueError(f"val_rows must be >= 0 or None, got {val_rows}.")
        if standardize_on not in STANDARDIZE_ON:
            raise unknown_choice("standardize_on", standardize_on, STANDARDIZE_ON)
        self.csv_path = Path(csv_path)
        self.train_rows = train_rows
        self.val_rows = val_rows
        self.zone_column = zone_column
        self.harmful_zone = harmful_zone
        self.pretrain_target = pretrain_target
        self.harmful_target = harmful_target
        self.drop_columns = tuple(drop_columns)
        self.standardize_on = standardize_on
        if dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}.")
        self.dtype = getattr(torch, dtype)
        if columns not in COLUMN_RULES:
            raise ValueError(f"columns must be one of {list(COLUMN_RULES)}, got {columns!r}.")
        self.columns = columns
        self.id_column = id_column
        self._feature_columns: dict[str, list[str]] = {}
        self.save_hyperparameters()

    @property
    def feature_columns(self) -> dict[str, list[str]]:
        """Feature column names per side (``"pretrain"``, ``"harmful"``), in order."""
        self._ensure_built()
        return {side: list(cols) for side, cols in self._feature_columns.items()}

    def _build(self) -> None:
        if not self.csv_path.is_file():
            raise FileNotFoundError(
                f"House Prices CSV not found: {self.csv_path} (expected Kaggle's "
                f"'House Prices - Advanced Regression Techniques' train.csv; nothing is "
                f"downloaded)."
            )
        df = pd.read_csv(self.csv_path)
        required = [self.zone_column, self.pretrain_target, self.harmful_target]
        required += list(self.drop_columns)
        missing = [c for c in dict.fromkeys(required) if c not in df.columns]
        if missing:
            raise ValueError(
                f"{self.csv_path}: missing required column(s) {missing}; expected all of "
                f"{list(dict.fromkeys(required))}."
            )
        check_cells(df, self.csv_path)
        for target in (self.pretrain_target, self.harmful_target):
            if not pd.api.types.is_numeric_dtype(df[target]):
                raise ValueError(
                    f"{self.csv_path}: target column {target!r} is not numeric (dtype "
                    f"{df[target].dtype}); expected numbers."
                )
        self._check_kaggle_columns(df)
        if self.columns == "shared":
            excluded = {self.pretrain_target, self.harmful_target, *self.drop_columns}
            shared = [c for c in df.columns if c not in excluded]
            self._feature_columns = {"pretrain": shared, "harmful": list(shared)}
        else:
            for side, target in (
                ("pretrain", self.pretrain_target),
                ("harmful", self.harmful_target),
            ):
                excluded = {self.id_column, target, *self.drop_columns}
                self._feature_columns[side] = [c for c in df.columns if c not in excluded]
        self._set_input_dim(len(self._feature_columns["pretrain"]))

        is_harmful = df[self.zone_column].astype(str) == str(self.harmful_zone)
        splits = {  # each split keeps the file's row index, for the errors' line numbers
            "pretrain": (df[~is_harmful], self.pretrain_target),
            "harmful": (df[is_harmful], self.harmful_target),
        }
        datasets: dict[str, tuple[TensorDataset, TensorDataset | None]] = {}
        for side, (frame, target) in splits.items():
            n = len(frame)
            if n == 0:
                op = "==" if side == "harmful" else "!="
                raise ValueError(
                    f"the {side} dataset is empty: no row of {self.csv_path} has "
                    f"{self.zone_column} {op} {self.harmful_zone!r}; expected at least one."
                )
            n_val = n - self.train_rows if self.val_rows is None else self.val_rows
            if self.train_rows + n_val > n:
                raise ValueError(
                    f"the {side} split has {n} rows, fewer than train_rows + val_rows = "
                    f"{self.train_rows} + {n_val}; expected train_rows + val_rows <= {n}."
                )
            stats_rows = self.train_rows if self.standardize_on == "train" else None
            used = self.train_rows + n_val
            check_target(frame.iloc[:used], target, side, self.csv_path, stats_rows)
            cols = self._feature_columns[side]
            x, y = encode_and_standardize(frame, cols, target, stats_rows)
            xt = torch.from_numpy(x).to(self.dtype)
            yt = torch.from_numpy(y).to(self.dtype)
            tr = slice(0, self.train_rows)
            va = slice(self.train_rows, self.train_rows + n_val)
            train = TensorDataset(xt[tr], yt[tr])
            val = TensorDataset(xt[va], yt[va]) if n_val > 0 else None
            datasets[side] = (train, val)
        self._log_filled(splits)
        self.pretrain, self.val_pretrain = datasets["pretrain"]
        self.harmful, self.val_harmful = datasets["harmful"]

    def _check_kaggle_columns(self, df: pd.DataFrame) -> None:
        """Names the feature columns of Kaggle's file missing from a file that looks like it."""
        present = set(df.columns)
        if sum(c in present for c in KAGGLE_COLUMNS) < len(KAGGLE_COLUMNS) / 2:
            return  # not Kaggle's file: its columns are the user's choice
        excluded = {self.pretrain_target, *self.drop_columns}  # the rule of the D_P side
        excluded.add(self.id_column if self.columns == "per_split" else self.harmful_target)
        missing = [c for c in KAGGLE_COLUMNS if c not in present and c not in excluded]
        if not missing:
            return
        width = sum(c not in excluded for c in df.columns)
        expected = sum(c not in excluded for c in KAGGLE_COLUMNS)
        extra = [c for c in df.columns if c not in KAGGLE_COLUMNS]
        found = f" (it has column(s) Kaggle's has not: {extra})" if extra else ""
        raise ValueError(
            f"{self.csv_path}: Kaggle's House Prices feature column(s) {missing} are missing: "
            f"{width} features, expected {expected}{found}. Use the complete train.csv and "
            f"leave columns out with drop_columns=[...]."
        )

    def _log_filled(self, splits: dict[str, tuple[pd.DataFrame, str]]) -> None:
        """Logs (once per build, one line) how many missing values each feature column had
        over both splits: all were filled with 0 (category ``"0"`` for categorical columns)."""
        counts: dict[str, int] = {}
        for side, (frame, _) in splits.items():
            for name, n in frame[self._feature_columns[side]].isna().sum().items():
                if n:
                    counts[name] = counts.get(name, 0) + int(n)
        if counts:
            listed = ", ".join(
                f"{name} {n}" for name, n in sorted(counts.items(), key=lambda kv: -kv[1])
            )
            rank_zero_info(
                f"House Prices {self.csv_path}: missing values filled with 0 (categorical: the "
                f'category "0") in {len(counts)} columns: {listed}'
            )
