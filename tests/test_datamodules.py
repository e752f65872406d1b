"""Tests of the paired data modules (digits, MNIST, house prices, image folders)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lightning_immunize.datamodules import (
    EVAL_MODES,
    TRAIN_MODES,
    DigitsPairDataModule,
    HousePricesDataModule,
    ImagePairDataModule,
    MNISTPairDataModule,
    PairedDataModule,
    load_mnist_idx,
    read_idx,
)

# Lightning 2.6 with this torch emits a FutureWarning from its pytree helper on every
# CombinedLoader iteration; it is not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*is deprecated")

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MNIST_ROOT = DATA / "MNIST"
HOUSE_CSV = DATA / "house-prices" / "train.csv"
needs_mnist = pytest.mark.skipif(
    not (MNIST_ROOT / "raw").is_dir(), reason=f"shipped MNIST test split absent ({MNIST_ROOT})"
)
needs_house = pytest.mark.skipif(
    not HOUSE_CSV.is_file(), reason=f"shipped House Prices CSV absent ({HOUSE_CSV})"
)


def _first_batch(loader) -> dict:
    batch, _, _ = next(iter(loader))
    return batch


def _tensor_dm(n_p: int = 10, n_h: int = 6, **kwargs) -> PairedDataModule:
    g = torch.Generator().manual_seed(0)
    p = TensorDataset(torch.randn(n_p, 3, generator=g), torch.zeros(n_p))
    h = TensorDataset(torch.randn(n_h, 3, generator=g), torch.ones(n_h))
    kwargs.setdefault("batch_size", 4)
    return PairedDataModule(p, h, task="binary", num_classes=2, **kwargs)


# --------------------------------------------------------------------------- base class
def test_base_batch_structure_and_metadata() -> None:
    dm = _tensor_dm()
    batch = _first_batch(dm.train_dataloader())
    assert set(batch) == {"pretrain", "harmful"}
    (x_p, y_p), (x_h, y_h) = batch["pretrain"], batch["harmful"]
    assert x_p.shape == (4, 3) and y_p.shape == (4,) and x_h.shape == (4, 3)
    assert torch.all(y_p == 0) and torch.all(y_h == 1)
    assert dm.input_dim == 3 and dm.task == "binary" and dm.num_classes == 2
    # max_size_cycle: as many batches as the longer side (10 samples / 4 -> 3).
    assert len(list(dm.train_dataloader())) == 3


def test_base_inferred_task() -> None:
    p = TensorDataset(torch.randn(4, 2), torch.tensor([0, 1, 2, 1]))
    assert PairedDataModule(p, p, batch_size=2).task == "multiclass"
    q = TensorDataset(torch.randn(4, 2), torch.randn(4))
    assert PairedDataModule(q, q, batch_size=2).task == "regression"


def test_base_shuffle_is_seeded() -> None:
    def order(seed: int) -> torch.Tensor:
        batch = _first_batch(_tensor_dm(seed=seed).train_dataloader())
        return batch["pretrain"][0]

    assert torch.equal(order(3), order(3))
    assert not torch.equal(order(3), order(4))
    unshuffled = _first_batch(_tensor_dm(shuffle=False).train_dataloader())
    x_p = _tensor_dm().pretrain.tensors[0]  # type: ignore[union-attr]
    assert torch.equal(unshuffled["pretrain"][0], x_p[:4])


@pytest.mark.parametrize("side", ["pretrain", "harmful"])
def test_base_empty_dataset_names_side(side: str) -> None:
    empty = TensorDataset(torch.zeros(0, 3), torch.zeros(0))
    full = TensorDataset(torch.zeros(5, 3), torch.zeros(5))
    kwargs = {"pretrain": full, "harmful": full, side: empty}
    with pytest.raises(ValueError, match=side):
        PairedDataModule(**kwargs, batch_size=2)


def test_base_bad_mode_and_batch_size() -> None:
    with pytest.raises(ValueError) as err:
        _tensor_dm(mode="zigzag")
    for mode in TRAIN_MODES:
        assert mode in str(err.value)
    with pytest.raises(ValueError, match="sequential|valid modes"):
        _tensor_dm(mode="sequential")
    with pytest.raises(ValueError, match="max_size"):
        _tensor_dm(eval_mode="sequential")
    with pytest.raises(ValueError, match="batch_size"):
        _tensor_dm(batch_size=1)


def test_base_eval_loaders() -> None:
    dm = _tensor_dm()
    assert dm.val_dataloader() == [] and dm.test_dataloader() == []
    with pytest.raises(ValueError, match="'val'"):
        dm.full_tensors("val")
    with pytest.raises(ValueError, match="bogus"):
        dm.full_tensors("bogus")
    p = TensorDataset(torch.randn(5, 3), torch.zeros(5))
    h = TensorDataset(torch.randn(2, 3), torch.ones(2))
    dm = PairedDataModule(p, h, batch_size=2, val_pretrain=p, val_harmful=h)
    assert dm.eval_mode == "max_size" and "max_size" in EVAL_MODES
    batches = [b for b, _, _ in dm.val_dataloader()]
    # max_size: 3 batches, every sample seen once, harmful exhausted -> None.
    assert len(batches) == 3
    assert batches[0]["harmful"] is not None and batches[1]["harmful"] is None
    assert sum(len(b["pretrain"][0]) for b in batches) == 5


def test_base_warns_on_singleton_last_batch() -> None:
    with pytest.warns(UserWarning, match="one sample"):
        _tensor_dm(n_p=9).train_dataloader()


# --------------------------------------------------------------------------- digits
def test_digits_pair_construction() -> None:
    from sklearn.datasets import load_digits

    dm = DigitsPairDataModule(pretrain_digit=3, harmful_digit=8, batch_size=16)
    x_p, y_p, x_h, y_h = dm.full_tensors("train")
    bunch = load_digits()
    n = min(int((bunch.target == 3).sum()), int((bunch.target == 8).sum()))
    assert x_p.shape == x_h.shape == (n, 64) and y_p.shape == y_h.shape == (n,)
    assert x_p.dtype == y_p.dtype == torch.float32
    assert torch.all(y_p == 0) and torch.all(y_h == 1)
    raw = bunch.data[bunch.target == 8][:n] / 16.0
    expected = torch.tensor((raw - 0.1307) / 0.3081, dtype=torch.float32)
    torch.testing.assert_close(x_h, expected)
    assert float(x_p.min()) == pytest.approx(-0.1307 / 0.3081, abs=1e-6)
    assert dm.input_dim == 64 and dm.task == "binary" and dm.num_classes == 2

    batch = _first_batch(dm.train_dataloader())
    assert batch["pretrain"][0].shape == (16, 64) and batch["harmful"][1].shape == (16,)
    assert dm.val_dataloader() == []


def test_digits_custom_normalization() -> None:
    x_p, *_ = DigitsPairDataModule(0, 1, mean=0.0, std=1.0).full_tensors()
    assert float(x_p.min()) >= 0.0 and float(x_p.max()) <= 1.0


def test_digits_val_split_is_seeded_and_disjoint() -> None:
    full = DigitsPairDataModule(0, 1, shuffle=False).full_tensors("train")
    dm = DigitsPairDataModule(0, 1, val_fraction=0.25, seed=5)
    tr, va = dm.full_tensors("train"), dm.full_tensors("val")
    n = len(full[0])
    assert len(va[0]) == len(va[2]) == int(n * 0.25)
    assert len(tr[0]) + len(va[0]) == n
    rows = {tuple(r.tolist()) for r in full[0]}
    assert {tuple(r.tolist()) for r in torch.cat([tr[0], va[0]])} == rows
    again = DigitsPairDataModule(0, 1, val_fraction=0.25, seed=5).full_tensors("val")
    assert torch.equal(again[0], va[0])
    other = DigitsPairDataModule(0, 1, val_fraction=0.25, seed=6).full_tensors("val")
    assert not torch.equal(other[0], va[0])
    batch = _first_batch(dm.val_dataloader())
    assert set(batch) == {"pretrain", "harmful"}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"pretrain_digit": 4, "harmful_digit": 4}, "differ, both are 4"),
        ({"pretrain_digit": 10}, "pretrain_digit.*10"),
        ({"harmful_digit": -1}, "harmful_digit.*-1"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"batch_size": 1}, "batch_size"),
        ({"mode": "bad"}, "max_size_cycle"),
    ],
)
def test_digits_argument_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DigitsPairDataModule(**kwargs)


# --------------------------------------------------------------------------- MNIST
def _write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    header += struct.pack(">" + "I" * array.ndim, *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)


def _fake_mnist(root: Path, split: str, labels: list[int], compress: bool) -> np.ndarray:
    prefix = {"test": "t10k", "train": "train"}[split]
    raw = root / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(labels))
    images = rng.integers(0, 256, size=(len(labels), 28, 28), dtype=np.uint8)
    _write_idx(raw / f"{prefix}-images-idx3-ubyte", images, compress)
    _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.array(labels, dtype=np.uint8), compress)
    return images


@needs_mnist
def test_mnist_shipped_test_split() -> None:
    images, labels = load_mnist_idx(MNIST_ROOT, "test")
    assert images.shape == (10000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (10000,) and labels.dtype == torch.int64
    assert set(labels.tolist()) == set(range(10))

    dm = MNISTPairDataModule(root=MNIST_ROOT, pretrain_digit=0, harmful_digit=1, batch_size=32)
    x_p, y_p, x_h, y_h = dm.full_tensors()
    n = min(int((labels == 0).sum()), int((labels == 1).sum()))
    assert x_p.shape == x_h.shape == (n, 784) and dm.input_dim == 784
    assert torch.all(y_p == 0) and torch.all(y_h == 1)
    first_one = images[labels == 1][0].reshape(-1).double() / 255.0
    torch.testing.assert_close(x_h[0], ((first_one - 0.1307) / 0.3081).float())
    batch = _first_batch(dm.train_dataloader())
    assert batch["harmful"][0].shape == (32, 784)


@needs_mnist
def test_mnist_shipped_has_no_train_split() -> None:
    with pytest.raises(FileNotFoundError, match="no download"):
        MNISTPairDataModule(root=MNIST_ROOT, split="train").setup("fit")


def test_mnist_missing_files_error(tmp_path: Path) -> None:
    dm = MNISTPairDataModule(root=tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError) as err:
        dm.setup("fit")
    message = str(err.value)
    assert str(tmp_path / "nowhere" / "raw" / "t10k-images-idx3-ubyte.gz") in message
    assert "t10k-labels-idx1-ubyte" in message and "IDX" in message and "no download" in message


@pytest.mark.parametrize("compress", [True, False])
def test_mnist_own_idx_files(tmp_path: Path, compress: bool) -> None:
    test_labels = [0, 1, 2, 1, 0, 1, 1]
    train_labels = [1, 0, 0, 3]
    test_images = _fake_mnist(tmp_path, "test", test_labels, compress)
    train_images = _fake_mnist(tmp_path, "train", train_labels, compress)
    images, labels = load_mnist_idx(tmp_path, "test")
    assert np.array_equal(images.numpy(), test_images)
    assert labels.tolist() == test_labels
    images, labels = load_mnist_idx(tmp_path, "all")
    assert np.array_equal(images.numpy(), np.concatenate([train_images, test_images]))
    assert labels.tolist() == train_labels + test_labels

    dm = MNISTPairDataModule(root=tmp_path, pretrain_digit=0, harmful_digit=1, batch_size=2)
    x_p, y_p, x_h, _ = dm.full_tensors()
    assert x_p.shape == x_h.shape == (2, 784)  # two 0s, four 1s -> balanced to 2
    expected = (test_images[[0, 4]].reshape(2, -1) / 255.0 - 0.1307) / 0.3081
    torch.testing.assert_close(x_p, torch.tensor(expected, dtype=torch.float32))
    x_p, *_ = MNISTPairDataModule(root=tmp_path, split="all", batch_size=2).full_tensors()
    assert len(x_p) == 4  # four 0s (2 train + 2 test), five 1s
    with pytest.raises(ValueError, match="split"):
        load_mnist_idx(tmp_path, "validation")


def test_read_idx_rejects_bad_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x12\x34\x08\x01\x00\x00\x00\x01\x00")
    with pytest.raises(ValueError, match="magic"):
        read_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(struct.pack(">BBBBI", 0, 0, 8, 1, 5) + b"\x00\x01")
    with pytest.raises(ValueError, match="bytes"):
        read_idx(short)


# --------------------------------------------------------------------------- house prices
@needs_house
def test_house_prices_shipped() -> None:
    dm = HousePricesDataModule(csv_path=HOUSE_CSV, columns="shared")
    x_p, y_p, x_h, y_h = dm.full_tensors("train")
    assert x_p.shape == x_h.shape == (200, 79) and y_p.shape == y_h.shape == (200,)
    vx_p, vy_p, vx_h, _ = dm.full_tensors("val")
    assert vx_p.shape == vx_h.shape == (100, 79) and vy_p.shape == (100,)
    assert dm.input_dim == 79 and dm.task == "regression" and dm.num_classes is None
    cols = dm.feature_columns["pretrain"]
    assert cols == dm.feature_columns["harmful"]
    assert "LotArea" not in cols and "SalePrice" not in cols and len(cols) == 79
    assert "MSZoning" in cols and "Id" in cols
    # D_P's target is LotArea, standardized over the 309 non-RL rows.
    df = pd.read_csv(HOUSE_CSV)
    lot = df.loc[df.MSZoning != "RL", "LotArea"].to_numpy(float)
    expected = (lot[:200] - lot.mean()) / lot.std()
    np.testing.assert_allclose(y_p.numpy(), expected, rtol=1e-5, atol=1e-5)
    batch = _first_batch(dm.train_dataloader())
    assert batch["pretrain"][0].shape == (64, 79) and batch["harmful"][1].shape == (64,)


@needs_house
def test_house_prices_standardized_columns() -> None:
    # val_rows=None: train + val cover the whole split, so split statistics are visible.
    dm = HousePricesDataModule(csv_path=HOUSE_CSV, val_rows=None)
    assert dm.sizes()["val"] == {"pretrain": 109, "harmful": 951}
    for side in (0, 2):
        x = torch.cat([dm.full_tensors("train")[side], dm.full_tensors("val")[side]]).double()
        y = torch.cat([dm.full_tensors("train")[side + 1], dm.full_tensors("val")[side + 1]])
        assert x.mean(0).abs().max() < 1e-5 and abs(float(y.double().mean())) < 1e-5
        std = x.std(0, unbiased=False)
        assert torch.all((std - 1).abs() < 1e-4) or torch.all(((std - 1).abs() < 1e-4) | (std == 0))
    # MSZoning is constant inside D_H ("RL") -> a zero column there.
    zoning = dm.feature_columns["harmful"].index("MSZoning")
    assert torch.all(dm.full_tensors("train")[2][:, zoning] == 0)
    # standardize_on="train": the training rows themselves are centred.
    x_p, *_ = HousePricesDataModule(csv_path=HOUSE_CSV, standardize_on="train").full_tensors()
    assert x_p.double().mean(0).abs().max() < 1e-5
    dm = HousePricesDataModule(
        csv_path=HOUSE_CSV, drop_columns=("Id", "MSZoning"), val_rows=0, columns="shared"
    )
    assert dm.input_dim == 77 and dm.val_dataloader() == []


@needs_house
def test_house_prices_per_split_columns_drop_id_and_own_target() -> None:
    cols = HousePricesDataModule(csv_path=HOUSE_CSV).feature_columns
    assert len(cols["pretrain"]) == len(cols["harmful"]) == 79
    assert "Id" not in cols["pretrain"] and "LotArea" not in cols["pretrain"]
    assert "SalePrice" in cols["pretrain"] and "LotArea" in cols["harmful"]
    assert "SalePrice" not in cols["harmful"]


def _small_csv(path: Path, drop: str | None = None) -> Path:
    frame = pd.DataFrame(
        {
            "Id": range(1, 9),
            "MSZoning": ["RL", "RM", "RL", "FV", "RL", "RM", "RL", "RM"],
            "LotArea": [100.0, 200.0, 300.0, 400.0, 500.0, 600.0, 700.0, 800.0],
            "Street": ["Pave", None, "Grvl", "Pave", "Pave", "Grvl", None, "Pave"],
            "Const": [7.0] * 8,
            "SalePrice": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0],
        }
    )
    if drop:
        frame = frame.drop(columns=[drop])
    frame.to_csv(path, index=False)
    return path


def test_house_prices_encoding_on_small_csv(tmp_path: Path) -> None:
    csv = _small_csv(tmp_path / "small.csv")
    dm = HousePricesDataModule(
        csv_path=csv, train_rows=3, val_rows=1, batch_size=2, columns="shared"
    )
    assert dm.feature_columns["pretrain"] == ["Id", "MSZoning", "Street", "Const"]
    x_p, y_p, x_h, y_h = dm.full_tensors()
    assert x_p.shape == (3, 4) and x_h.shape == (3, 4)
    # Const is constant -> 0 everywhere; MSZoning constant in D_H -> 0.
    assert torch.all(x_p[:, 3] == 0) and torch.all(x_h[:, 1] == 0)
    # D_H Street over its 4 rows: Pave, Grvl, Pave, missing -> codes of sorted {"0","Grvl","Pave"}
    codes = np.array([2.0, 1.0, 2.0, 0.0])
    expected = (codes - codes.mean()) / codes.std()
    np.testing.assert_allclose(x_h[:, 2].numpy(), expected[:3], rtol=1e-6)
    np.testing.assert_allclose(dm.full_tensors("val")[2][:, 2].numpy(), expected[3:], rtol=1e-6)
    sale = np.array([1.0, 3.0, 5.0, 7.0])
    np.testing.assert_allclose(y_h.numpy(), ((sale - sale.mean()) / sale.std())[:3], rtol=1e-6)


def test_house_prices_errors(tmp_path: Path) -> None:
    missing = tmp_path / "absent.csv"
    with pytest.raises(FileNotFoundError, match="absent.csv"):
        HousePricesDataModule(csv_path=missing).setup("fit")
    csv = _small_csv(tmp_path / "nolot.csv", drop="LotArea")
    with pytest.raises(ValueError, match="LotArea"):
        HousePricesDataModule(csv_path=csv, train_rows=2, val_rows=0).setup("fit")
    csv = _small_csv(tmp_path / "ok.csv")
    with pytest.raises(ValueError, match="rows"):
        HousePricesDataModule(csv_path=csv, train_rows=3, val_rows=5).setup("fit")


# --------------------------------------------------------------------------- images
def _image_folder(root: Path, classes: list[str], per_class: int, seed: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")


@pytest.fixture
def image_roots(tmp_path: Path) -> tuple[Path, Path]:
    pretrain = tmp_path / "pretrain"
    _image_folder(pretrain / "train", ["a", "b"], per_class=3, seed=0)
    _image_folder(pretrain / "val", ["a", "b"], per_class=1, seed=1)
    harmful = tmp_path / "harmful"  # no train/ sub-folder: the root holds the classes
    _image_folder(harmful, ["x", "y", "z"], per_class=2, seed=2)
    return pretrain, harmful


def test_image_pairs(image_roots: tuple[Path, Path]) -> None:
    pretrain, harmful = image_roots
    dm = ImagePairDataModule(pretrain, harmful, image_size=32, batch_size=4)
    x_p, y_p, x_h, y_h = dm.full_tensors("train")
    assert x_p.shape == (6, 3, 32, 32) and x_h.shape == (6, 3, 32, 32)
    assert y_p.dtype == torch.int64 and sorted(set(y_h.tolist())) == [0, 1, 2]
    assert dm.task == "multiclass" and dm.input_dim is None
    assert (dm.num_classes_pretrain, dm.num_classes_harmful, dm.num_classes) == (2, 3, None)
    assert dm.class_names["harmful"] == ["x", "y", "z"]
    batch = _first_batch(dm.train_dataloader())
    assert batch["pretrain"][0].shape == (4, 3, 32, 32) and batch["harmful"][1].shape == (4,)
    # Only D_P has a val/ folder: the val batches carry only that side.
    val = _first_batch(dm.val_dataloader())
    assert set(val) == {"pretrain"} and val["pretrain"][0].shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="harmful"):
        dm.full_tensors("val")
    limited = ImagePairDataModule(pretrain, harmful, image_size=32, max_samples=4, batch_size=2)
    assert [len(t) for t in limited.full_tensors()] == [4, 4, 4, 4]
    again = ImagePairDataModule(pretrain, harmful, image_size=32, max_samples=4, batch_size=2)
    assert torch.equal(again.full_tensors()[0], limited.full_tensors()[0])


def test_image_pairs_model_config_and_augment(image_roots: tuple[Path, Path]) -> None:
    pretrain, harmful = image_roots
    dm = ImagePairDataModule(
        pretrain, harmful, image_size=32, model_name="vit_base_patch16_clip_224", augment=True
    )
    assert dm.data_config["mean"] == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert dm.data_config["input_size"] == (3, 32, 32)
    x_p, *_ = dm.full_tensors()
    assert x_p.shape == (6, 3, 32, 32)
    assert torch.equal(x_p, dm.full_tensors()[0])  # full tensors use the eval transform
    with pytest.raises(ValueError, match="no_such_model"):
        ImagePairDataModule(pretrain, harmful, model_name="no_such_model")


def test_image_pairs_errors(tmp_path: Path, image_roots: tuple[Path, Path]) -> None:
    pretrain, _ = image_roots
    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError, match="missing"):
        ImagePairDataModule(pretrain, missing, image_size=32).setup("fit")
    empty = tmp_path / "empty"
    (empty / "class_a").mkdir(parents=True)
    with pytest.raises(ValueError, match=str(empty)):
        ImagePairDataModule(pretrain, empty, image_size=32).setup("fit")
    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.raises(ValueError, match=str(bare)):
        ImagePairDataModule(bare, pretrain, image_size=32).setup("fit")


# --------------------------------------------------------------------------- Trainer
class _PairModule(L.LightningModule):
    """Trivial module: one linear layer fed both sides of each batch."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.layer = nn.Linear(dim, 1)
        self.train_batches: list[dict] = []
        self.val_sides: list[set[str]] = []

    def _loss(self, part: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = part
        return nn.functional.binary_cross_entropy_with_logits(self.layer(x).squeeze(-1), y)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        assert set(batch) == {"pretrain", "harmful"}
        self.train_batches.append({k: v[0].shape for k, v in batch.items()})
        return self._loss(batch["pretrain"]) + self._loss(batch["harmful"])

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        present = {k for k, v in batch.items() if v is not None}
        self.val_sides.append(present)
        loss = sum(self._loss(batch[k]) for k in present)
        self.log("val_loss", loss, batch_size=1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer(**kwargs) -> L.Trainer:
    return L.Trainer(
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        **kwargs,
    )


def test_trainer_fit_and_validate() -> None:
    dm = DigitsPairDataModule(2, 7, batch_size=16, val_fraction=0.2)
    model = _PairModule(dm.input_dim or 0)
    trainer = _trainer()
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 2
    assert model.train_batches[-1] == {"pretrain": (16, 64), "harmful": (16, 64)}
    results = trainer.validate(model, datamodule=dm, verbose=False)
    assert "val_loss" in results[0] and np.isfinite(results[0]["val_loss"])
    assert {"pretrain", "harmful"} in model.val_sides


@pytest.mark.filterwarnings("ignore:Total length of `list` across ranks is zero")
def test_trainer_without_validation_data() -> None:
    dm = DigitsPairDataModule(5, 6, batch_size=8)
    model = _PairModule(64)
    trainer = _trainer()
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 2 and model.val_sides == []
    assert trainer.validate(model, datamodule=dm, verbose=False) == []


class _RegressionModule(L.LightningModule):
    """Linear regression on both sides; validation tolerates an exhausted side (None)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.layer = nn.Linear(dim, 1)
        self.val_sides: list[tuple[str, ...]] = []

    def _loss(self, part: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = part
        return nn.functional.mse_loss(self.layer(x).squeeze(-1), y)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._loss(batch["pretrain"]) + self._loss(batch["harmful"])

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        present = tuple(k for k, v in batch.items() if v is not None)
        self.val_sides.append(present)
        self.log("val_mse", sum(self._loss(batch[k]) for k in present), batch_size=1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


@needs_house
def test_trainer_validate_unequal_sides() -> None:
    # val: 109 D_P rows vs 951 D_H rows -> max_size: D_P is None after two batches.
    dm = HousePricesDataModule(csv_path=HOUSE_CSV, val_rows=None, mode="min_size", dtype="float32")
    model = _RegressionModule(79)
    trainer = _trainer(num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm)
    results = trainer.validate(model, datamodule=dm, verbose=False)
    assert np.isfinite(results[0]["val_mse"])
    assert len(model.val_sides) == 15  # ceil(951 / 64)
    assert model.val_sides[:2] == [("pretrain", "harmful")] * 2
    assert set(model.val_sides[2:]) == {("harmful",)}
