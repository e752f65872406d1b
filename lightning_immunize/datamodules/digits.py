"""Digit-pair data modules (the paper's Section 5.1).

For an ordered pair ``(a, b)``, ``a != b``: ``D_P`` holds the images of digit ``a`` (label 0),
``D_H`` those of digit ``b`` (label 1), balanced to the smaller count by keeping the first
``n`` images of each in dataset order; pixels are scaled to [0, 1], normalized with
``(x - mean) / std`` and flattened. Labels are float tensors for binary cross-entropy.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from .base import PairedDataModule

__all__ = ["DigitsPairDataModule", "build_digit_pair", "check_digit"]

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081


def check_digit(value: object, name: str) -> int:
    """Returns ``value`` as an int if it is a digit 0..9, else raises ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 9:
        raise ValueError(f"{name} must be an integer digit in 0..9, got {value!r}.")
    return int(value)


def check_pair_args(
    pretrain_digit: object, harmful_digit: object, val_fraction: float, std: float
) -> tuple[int, int]:
    """Validates the common digit-pair arguments; returns the two digits."""
    a = check_digit(pretrain_digit, "pretrain_digit")
    b = check_digit(harmful_digit, "harmful_digit")
    if a == b:
        raise ValueError(
            f"pretrain_digit and harmful_digit must differ, both are {a} "
            f"(D_P and D_H would be the same images)."
        )
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}.")
    if not std > 0:
        raise ValueError(f"std must be > 0, got {std!r}.")
    return a, b


def build_digit_pair(
    images: Tensor,
    labels: Tensor,
    pretrain_digit: int,
    harmful_digit: int,
    *,
    scale: float,
    mean: float = MNIST_MEAN,
    std: float = MNIST_STD,
    val_fraction: float = 0.0,
    seed: int = 0,
    max_samples: int | None = None,
) -> tuple[TensorDataset, TensorDataset, TensorDataset | None, TensorDataset | None]:
    """Builds the balanced, normalized, flattened digit pair.

    Args:
        images: raw pixels, shape ``(N, H, W)`` or ``(N, D)``, values in ``[0, scale]``.
        labels: digit labels, shape ``(N,)``.
        pretrain_digit: digit ``a`` forming ``D_P`` (label 0).
        harmful_digit: digit ``b`` forming ``D_H`` (label 1).
        scale: maximal raw pixel value (16 for sklearn digits, 255 for MNIST).
        mean: normalization mean applied after scaling to [0, 1].
        std: normalization standard deviation.
        val_fraction: fraction of each (balanced) side held out for validation, chosen by a
            permutation seeded with ``seed``; train and val keep dataset order.
        seed: seed of the validation draw.
        max_samples: optional cap on the per-side count (applied after balancing).

    Returns:
        ``(train_P, train_H, val_P, val_H)`` TensorDatasets of ``(x, y)`` with ``x`` float32
        of shape ``(n, D)`` and ``y`` float32 of shape ``(n,)`` (0 for D_P, 1 for D_H);
        the val datasets are ``None`` when ``val_fraction == 0``.
    """
    labels = torch.as_tensor(labels).reshape(-1)
    flat = torch.as_tensor(images).reshape(len(labels), -1)
    idx_p = torch.nonzero(labels == pretrain_digit).reshape(-1)
    idx_h = torch.nonzero(labels == harmful_digit).reshape(-1)
    for digit, idx, side in (
        (pretrain_digit, idx_p, "pretrain"),
        (harmful_digit, idx_h, "harmful"),
    ):
        if len(idx) == 0:
            raise ValueError(
                f"the {side} dataset is empty: no image of digit {digit} in the data; expected "
                "at least one."
            )
    n = min(len(idx_p), len(idx_h))
    if max_samples is not None:
        if max_samples < 1:
            raise ValueError(f"max_samples must be >= 1 or None, got {max_samples}.")
        n = min(n, max_samples)
    idx_p, idx_h = idx_p[:n], idx_h[:n]
    n_val = int(n * val_fraction)
    if val_fraction > 0 and n_val == 0:
        raise ValueError(
            f"val_fraction={val_fraction} leaves no validation sample out of {n} per side; "
            f"expected 0 or at least 1/{n}."
        )
    if n - n_val < 1:
        raise ValueError(
            f"val_fraction={val_fraction} leaves no training sample out of {n}; expected a "
            "smaller val_fraction."
        )

    def features(idx: Tensor) -> Tensor:
        x = flat[idx].to(torch.float64) / scale
        return ((x - mean) / std).to(torch.float32)

    generator = torch.Generator().manual_seed(seed)
    parts: dict[str, list[TensorDataset | None]] = {"train": [], "val": []}
    for label, idx in ((0.0, idx_p), (1.0, idx_h)):
        perm = torch.randperm(n, generator=generator)
        val_idx = torch.sort(perm[:n_val]).values
        train_idx = torch.sort(perm[n_val:]).values
        for split, sel in (("train", train_idx), ("val", val_idx)):
            if split == "val" and n_val == 0:
                parts[split].append(None)
                continue
            x = features(idx[sel])
            y = torch.full((len(sel),), label, dtype=torch.float32)
            parts[split].append(TensorDataset(x, y))
    train_p, train_h = parts["train"]
    val_p, val_h = parts["val"]
    assert train_p is not None and train_h is not None
    return train_p, train_h, val_p, val_h


class DigitsPairDataModule(PairedDataModule):
    """Digit pair ``(a, b)`` from scikit-learn's bundled 8×8 digits (``D = 64``).

    ``D_P`` = images of ``pretrain_digit`` (label 0.0), ``D_H`` = images of ``harmful_digit``
    (label 1.0), balanced to the smaller count (first ``n`` of each), pixels divided by 16,
    normalized with ``mean``/``std`` and flattened: ``x`` has shape ``(64,)``, ``y`` is a
    float scalar; ``task == "binary"``, ``num_classes == 2`` (one BCE logit).

    Args:
        pretrain_digit: digit ``a`` (0..9) forming ``D_P``.
        harmful_digit: digit ``b`` (0..9, ``!= a``) forming ``D_H``.
        batch_size: per-side batch size (>= 2).
        val_fraction: seeded fraction of each side held out for validation (0 = none).
        seed: seed of the validation split and of the training shuffles. Default: the
            global seed (``seed_everything``, env ``PL_GLOBAL_SEED``), else 0; so the
            validation draw follows ``--seed_everything`` unless ``seed`` is set.
        mean: normalization mean (MNIST's 0.1307 by default).
        std: normalization std (MNIST's 0.3081 by default).
        max_samples: optional cap on the per-side count.
        mode: training CombinedLoader mode.
        num_workers: DataLoader workers.
        shuffle: shuffle training loaders.
        drop_last: drop the last incomplete training batch.

    Example:
        >>> dm = DigitsPairDataModule(3, 8)
        >>> X_P, y_P, X_H, y_H = dm.full_tensors()
        >>> X_P.shape == X_H.shape, X_P.shape[1], float(y_P.max()), float(y_H.min())
        (True, 64, 0.0, 1.0)
    """

    def __init__(
        self,
        pretrain_digit: int = 0,
        harmful_digit: int = 1,
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
        super().__init__(
            batch_size=batch_size,
            mode=mode,
            num_workers=num_workers,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
            task="binary",
            num_classes=2,
        )
        self.pretrain_digit, self.harmful_digit = check_pair_args(
            pretrain_digit, harmful_digit, val_fraction, std
        )
        self.val_fraction = val_fraction
        self.mean = mean
        self.std = std
        self.max_samples = max_samples
        self.save_hyperparameters()

    def _load_images(self) -> tuple[Tensor, Tensor, float]:
        """``(images (N, ...), labels (N,), pixel scale)`` of the whole source dataset."""
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images = torch.from_numpy(bunch.data.astype("float64"))  # (1797, 64), values 0..16
        return images, torch.from_numpy(bunch.target.astype("int64")), 16.0

    def _build(self) -> None:
        images, labels, scale = self._load_images()
        self._set_input_dim(int(images[0].numel()))
        self.pretrain, self.harmful, self.val_pretrain, self.val_harmful = build_digit_pair(
            images,
            labels,
            self.pretrain_digit,
            self.harmful_digit,
            scale=scale,
            mean=self.mean,
            std=self.std,
            val_fraction=self.val_fraction,
            seed=self.resolved_seed,
            max_samples=self.max_samples,
        )
