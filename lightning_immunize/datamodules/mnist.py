"""MNIST digit pairs read from torchvision's raw IDX layout (SPEC §8, ``D = 784``).

The files are read with a small IDX parser (gzip + numpy) rather than
``torchvision.datasets.MNIST``, which refuses to load when the training files are absent;
here only the 10,000 test images are shipped. Nothing is ever downloaded.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .digits import MNIST_MEAN, MNIST_STD, DigitsPairDataModule

__all__ = ["MNISTPairDataModule", "load_mnist_idx", "read_idx", "MNIST_SPLITS"]

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
        raise ValueError(f"{path}: not an IDX file (bad magic number {raw[:4].hex()!r})")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX type code 0x{code:02x}")
    dtype = _IDX_DTYPES[code]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: IDX body has {len(raw) - header} bytes, header {dims} implies {expected}"
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
        raise ValueError(f"unknown MNIST split {split!r}; valid splits: {list(MNIST_SPLITS)}")
    root = Path(root)
    parts = ("train", "test") if split == "all" else (split,)
    images: list[Tensor] = []
    labels: list[Tensor] = []
    for part in parts:
        img_path, lbl_path = _find_split_files(root, part)
        img = read_idx(img_path)
        lbl = read_idx(lbl_path)
        if img.ndim != 3:
            raise ValueError(f"{img_path}: expected a 3-d image array, got shape {img.shape}")
        if lbl.ndim != 1:
            raise ValueError(f"{lbl_path}: expected a 1-d label array, got shape {lbl.shape}")
        if len(img) != len(lbl):
            raise ValueError(
                f"{img_path} holds {len(img)} images but {lbl_path} holds {len(lbl)} labels"
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
        seed: seed of the validation split and of the training shuffles.
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
        seed: int = 0,
        mean: float = MNIST_MEAN,
        std: float = MNIST_STD,
        max_samples: int | None = None,
        mode: str = "max_size_cycle",
        num_workers: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
    ) -> None:
        if split not in MNIST_SPLITS:
            raise ValueError(f"unknown MNIST split {split!r}; valid splits: {list(MNIST_SPLITS)}")
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
