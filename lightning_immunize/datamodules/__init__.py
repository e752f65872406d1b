"""Paired (pre-training ``D_P``, harmful ``D_H``) Lightning data modules.

Every module yields training batches ``{"pretrain": (x, y), "harmful": (x, y)}`` and
exposes :meth:`~PairedDataModule.full_tensors` for the spectral quantities.
"""

from .base import EVAL_MODES, SIDES, SPLITS, TASKS, TRAIN_MODES, PairedDataModule
from .digits import DigitsPairDataModule, build_digit_pair
from .house_prices import HousePricesDataModule
from .images import ImagePairDataModule, resolve_image_data_config
from .mnist import MNISTHalvesDataModule, MNISTPairDataModule, load_mnist_idx, read_idx

__all__ = [
    "EVAL_MODES",
    "SIDES",
    "SPLITS",
    "TASKS",
    "TRAIN_MODES",
    "DigitsPairDataModule",
    "HousePricesDataModule",
    "ImagePairDataModule",
    "MNISTHalvesDataModule",
    "MNISTPairDataModule",
    "PairedDataModule",
    "build_digit_pair",
    "load_mnist_idx",
    "read_idx",
    "resolve_image_data_config",
]
