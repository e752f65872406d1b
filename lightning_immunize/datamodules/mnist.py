"""MNIST digit pairs read from torchvision's raw IDX layout (the paper's Section 5.1, ``D = 784``).

The files are read with a small IDX parser (gzip + numpy) rather than
``torchvision.datasets.MNIST``, which refuses to load when the training files are absent;
here only the 10,000 test images are shipped. Nothing is ever downloaded.
"""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from lightning_immunize.validation import unknown_choice

from .base import PairedDataModule
from .digits import MNIST_MEAN, MNIST_STD, DigitsPairDataModule, check_digit

__all__ = [
    "MNISTHalvesDataModule",
    "MNISTPairDataModule",
    "load_mnist_idx",
    "read_idx",
    "MNIST_SPLITS",
]

#: Splits understood by :func:`load_mnist_idx`.
MNIST_SPLITS: tuple[str, ...] = ("train", "test", "all")

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | Path) -> np.ndarray:
    """Reads one IDX file (optionally gzip-compressed, detected by its magic bytes).

    Args:
        path: file path.

    Returns:
        The array with the shape stored in the header (native byte order).

    Raises:
        ValueError: bad magic number, unknown type code, or a truncated/oversized body.
    """
    path = Path(path)
    with open(path, "rb") as fh:
        raw = fh.read()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(
            f"{path}: not an IDX file (bad magic number {raw[:4].hex()!r}); expected two zero "
            "bytes, a type code and a dimension count."
        )
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        known = ", ".join(f"0x{c:02x}" for c in _IDX_DTYPES)
        raise ValueError(f"{path}: unknown IDX type code 0x{code:02x}; expected one of {known}.")
    dtype = _IDX_DTYPES[code]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(
            f"{path}: truncated IDX header of {len(raw)} bytes; expected {header} for {ndim} "
            "dimension(s)."
        )
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: IDX body has {len(raw) - header} bytes; expected {expected}, as its header "
            f"{dims} implies."
        )
    arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def _candidate_dirs(root: Path) -> list[Path]:
    return [root / "raw", root / "MNIST" / "raw", root]


def _find_split_files(root: Path, split: str) -> tuple[Path, Path]:
    tried: list[Path] = []
    for directory in _candidate_dirs(root):
        found: list[Path] = []
        for stem in _FILES[split]:
            hit = None
            for name in (stem, stem + ".gz"):
                candidate = directory / name
                tried.append(candidate)
                if hit is None and candidate.is_file():
                    hit = candidate
            if hit is not None:
                found.append(hit)
        if len(found) == 2:
            return found[0], found[1]
    listing = "\n  ".join(str(p) for p in tried)
    raise FileNotFoundError(
        f"MNIST {split!r} split not found under {root}. Expected torchvision's raw IDX layout "
        f"(<root>/raw/{_FILES[split][0]}[.gz] and <root>/raw/{_FILES[split][1]}[.gz]); "
        f"no download is attempted. Paths looked for:\n  {listing}"
    )


def load_mnist_idx(root: str | Path, split: str = "test") -> tuple[Tensor, Tensor]:
    """Loads MNIST images and labels from torchvision's raw IDX layout.

    Looks in ``<root>/raw``, ``<root>/MNIST/raw`` and ``<root>`` for
    ``{t10k,train}-{images-idx3,labels-idx1}-ubyte`` (gzip-compressed or not).

    Args:
        root: MNIST folder (the one holding ``raw/``).
        split: ``"train"``, ``"test"`` or ``"all"`` (train followed by test).

    Returns:
        ``(images, labels)``: uint8 tensor ``(N, 28, 28)`` and int64 tensor ``(N,)``.

    Raises:
        ValueError: unknown split, or malformed/mismatched files.
        FileNotFoundError: files absent (the message lists every path looked for).
    """
    if split not in MNIST_SPLITS:
        raise unknown_choice("MNIST split", split, MNIST_SPLITS)
    root = Path(root)
    parts = ("train", "test") if split == "all" else (split,)
    images: list[Tensor] = []
    labels: list[Tensor] = []
    for part in parts:
        img_path, lbl_path = _find_split_files(root, part)
        img = read_idx(img_path)
        lbl = read_idx(lbl_path)
        if img.ndim != 3:
            raise ValueError(f"{img_path}: expected a 3-d image array, got shape {img.shape}.")
        if lbl.ndim != 1:
            raise ValueError(f"{lbl_path}: expected a 1-d label array, got shape {lbl.shape}.")
        if len(img) != len(lbl):
            raise ValueError(
                f"{img_path} holds {len(img)} images but {lbl_path} holds {len(lbl)} labels; "
                "expected one label per image."
            )
        images.append(torch.from_numpy(img.astype(np.uint8, copy=False)))
        labels.append(torch.from_numpy(lbl.astype(np.int64)))
    return torch.cat(images), torch.cat(labels)


class MNISTPairDataModule(DigitsPairDataModule):
    """Digit pair ``(a, b)`` from MNIST (``D = 784``), same construction as the 8×8 digits.

    ``D_P`` = images of ``pretrain_digit`` (label 0.0), ``D_H`` = images of
    ``harmful_digit`` (label 1.0), balanced to the smaller count (first ``n`` in file order),
    pixels divided by 255, normalized with ``mean``/``std``, flattened to ``(784,)``;
    ``task == "binary"``, ``num_classes == 2``.

    Args:
        root: MNIST folder in torchvision's raw layout (holding ``raw/``). Relative paths
            are resolved against the working directory.
        pretrain_digit: digit ``a`` (0..9) forming ``D_P``.
        harmful_digit: digit ``b`` (0..9, ``!= a``) forming ``D_H``.
        split: which MNIST files to use: ``"test"`` (the shipped 10,000 images),
            ``"train"`` or ``"all"``.
        batch_size: per-side batch size (>= 2).
        val_fraction: seeded fraction of each side held out for validation (0 = none).
        seed: seed of the validation split and of the training shuffles. Default: the
            global seed (``seed_everything``, env ``PL_GLOBAL_SEED``), else 0; so the
            validation draw follows ``--seed_everything`` unless ``seed`` is set.
        mean: normalization mean.
        std: normalization std.
        max_samples: optional cap on the per-side count.
        mode: training CombinedLoader mode.
        num_workers: DataLoader workers.
        shuffle: shuffle training loaders.
        drop_last: drop the last incomplete training batch.
    """

    def __init__(
        self,
        root: str | Path = "../shared/data/MNIST",
        pretrain_digit: int = 0,
        harmful_digit: int = 1,
        split: str = "test",
        batch_size: int = 64,
        val_fraction: float = 0.0,
        seed: int | None = None,
        mean: float = MNIST_MEAN,
        std: float = MNIST_STD,
        max_samples: int | None = None,
        mode: str = "max_size_cycle",
        num_workers: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
    ) -> None:
        if split not in MNIST_SPLITS:
            raise unknown_choice("MNIST split", split, MNIST_SPLITS)
        super().__init__(
            pretrain_digit=pretrain_digit,
            harmful_digit=harmful_digit,
            batch_size=batch_size,
            val_fraction=val_fraction,
            seed=seed,
            mean=mean,
            std=std,
            max_samples=max_samples,
            mode=mode,
            num_workers=num_workers,
            shuffle=shuffle,
            drop_last=drop_last,
        )
        self.root = Path(root)
        self.split = split

    def _load_images(self) -> tuple[Tensor, Tensor, float]:
        images, labels = load_mnist_idx(self.root, self.split)
        return images, labels, 255.0


def _check_digit_group(value: object, name: str) -> tuple[int, ...]:
    digits = tuple(value) if isinstance(value, list | tuple) else (value,)
    if len(digits) < 2:
        raise ValueError(
            f"{name} needs at least two digits (a classification task), got {value!r}."
        )
    checked = tuple(check_digit(d, name) for d in digits)
    if len(set(checked)) != len(checked):
        raise ValueError(f"{name} repeats a digit, got {list(checked)}; expected distinct digits.")
    return checked


class MNISTHalvesDataModule(PairedDataModule):
    """Two multi-class MNIST tasks side by side: ``D_P`` = one group of digits, ``D_H`` = the
    other (default 0–4 and 5–9), for deep immunization on real images (issue "deep MNIST").

    Each side's labels are the digit's position in its group (``D_H``: 5→0 … 9→4). Each side
    is split into train and held-out parts by a permutation seeded with ``split_seed``
    (fixed, so every run sees the same held-out images); the held-out parts are the
    validation split and are used only to measure accuracy. Images are ``(1, 28, 28)``
    float32, pixels scaled to [0, 1] then normalized with ``mean``/``std``;
    ``task == "multiclass"``, ``input_dim is None``.

    Args:
        root: MNIST folder in torchvision's raw layout (holding ``raw/``).
        pretrain_digits: the digits of ``D_P`` (at least two, no repeats).
        harmful_digits: the digits of ``D_H`` (disjoint from ``pretrain_digits``).
        split: which MNIST files: ``"test"`` (the shipped 10,000 images), ``"train"``, ``"all"``.
        holdout_fraction: fraction of each side held out, in (0, 1).
        split_seed: seed of the train/held-out draw; fixed (0), independent of ``seed`` and
            of the global seed, so every run is measured on the same held-out images.
        max_samples: optional cap on each side's count before the split (short runs, CI).
        withhold_harmful: fraction of D_H's training part withheld from immunization, in
            [0, 1): those samples are in ``withheld_harmful``, never in a training batch, so
            an attacker can be measured on harmful samples the immunization never saw.
        batch_size: per-side batch size (>= 2).
        seed: seed of the training shuffles only (not of the held-out split). Default: the
            global seed (``seed_everything``, env ``PL_GLOBAL_SEED``), else 0.
        mean: normalization mean (MNIST's 0.1307 by default).
        std: normalization std (MNIST's 0.3081 by default).
        mode: training CombinedLoader mode.
        num_workers: DataLoader workers.
        shuffle: shuffle training loaders.
        drop_last: drop the last incomplete training batch.

    Example:
        >>> dm = MNISTHalvesDataModule("../shared/data/MNIST", max_samples=100)
        >>> x_p, y_p, x_h, y_h = dm.full_tensors("train")
        >>> tuple(x_p.shape), int(y_h.max()), dm.num_classes_pretrain, dm.task
        ((80, 1, 28, 28), 4, 5, 'multiclass')
    """

    def __init__(
        self,
        root: str | Path = "../shared/data/MNIST",
        pretrain_digits: Sequence[int] = (0, 1, 2, 3, 4),
        harmful_digits: Sequence[int] = (5, 6, 7, 8, 9),
        split: str = "test",
        holdout_fraction: float = 0.2,
        split_seed: int = 0,
        max_samples: int | None = None,
        withhold_harmful: float = 0.0,
        batch_size: int = 64,
        seed: int | None = None,
        mean: float = MNIST_MEAN,
        std: float = MNIST_STD,
        mode: str = "max_size_cycle",
        num_workers: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
    ) -> None:
        if split not in MNIST_SPLITS:
            raise unknown_choice("MNIST split", split, MNIST_SPLITS)
        p_digits = _check_digit_group(pretrain_digits, "pretrain_digits")
        h_digits = _check_digit_group(harmful_digits, "harmful_digits")
        shared = sorted(set(p_digits) & set(h_digits))
        if shared:
            raise ValueError(
                f"pretrain_digits {list(p_digits)} and harmful_digits {list(h_digits)} share "
                f"{shared}: D_P and D_H must be different digits."
            )
        if not 0.0 < holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction!r}.")
        if not 0.0 <= withhold_harmful < 1.0:
            raise ValueError(f"withhold_harmful must be in [0, 1), got {withhold_harmful!r}.")
        if max_samples is not None and max_samples < 4:
            raise ValueError(f"max_samples must be >= 4 (or None), got {max_samples!r}.")
        if not std > 0:
            raise ValueError(f"std must be > 0, got {std!r}.")
        super().__init__(
            batch_size=batch_size,
            mode=mode,
            num_workers=num_workers,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
            task="multiclass",
            num_classes=max(len(p_digits), len(h_digits)),
        )
        self.root = Path(root)
        self.split = split
        self.pretrain_digits, self.harmful_digits = p_digits, h_digits
        self.holdout_fraction = holdout_fraction
        self.split_seed = split_seed
        self.max_samples = max_samples
        self.withhold_harmful = withhold_harmful
        self.mean, self.std = mean, std
        self.num_classes_pretrain = len(p_digits)
        self.num_classes_harmful = len(h_digits)
        self._set_input_dim(None)

    def _side(self, images: Tensor, labels: Tensor, digits: tuple[int, ...], offset: int):
        mask = torch.zeros_like(labels, dtype=torch.bool)
        for d in digits:
            mask |= labels == d
        idx = torch.nonzero(mask).squeeze(1)
        gen = torch.Generator().manual_seed(self.split_seed + offset)
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        if self.max_samples is not None:
            idx = idx[: self.max_samples]
        n_hold = max(1, round(self.holdout_fraction * idx.numel()))
        remap = torch.full((10,), -1, dtype=torch.int64)
        remap[list(digits)] = torch.arange(len(digits))
        x = ((images[idx].float() / 255.0 - self.mean) / self.std).unsqueeze(1)
        y = remap[labels[idx]]
        hold, train = slice(0, n_hold), slice(n_hold, None)
        return TensorDataset(x[train], y[train]), TensorDataset(x[hold], y[hold])

    def _build(self) -> None:
        images, labels = load_mnist_idx(self.root, self.split)
        self.pretrain, self.val_pretrain = self._side(images, labels, self.pretrain_digits, 0)
        self.harmful, self.val_harmful = self._side(images, labels, self.harmful_digits, 1)
        n_withheld = round(self.withhold_harmful * len(self.harmful))
        if n_withheld:
            x, y = self.harmful.tensors
            self.withheld_harmful = TensorDataset(x[:n_withheld], y[:n_withheld])
            self.harmful = TensorDataset(x[n_withheld:], y[n_withheld:])
