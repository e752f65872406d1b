"""Paired (pre-training, harmful) data module.

Every immunization experiment needs two datasets side by side: ``D_P`` (the pre-training,
benign task) and ``D_H`` (the harmful task). :class:`PairedDataModule` serves them together,
so one training batch is ``{"pretrain": (x_P, y_P), "harmful": (x_H, y_H)}``.

Loader modes (see :class:`lightning.pytorch.utilities.CombinedLoader`):

* training uses ``mode`` (default ``"max_size_cycle"``: an epoch lasts as long as the longer
  side, the shorter side is cycled, so both entries of every batch are filled);
* validation and test use ``eval_mode`` (default ``"max_size"``: every sample of each side is
  seen exactly once; once the shorter side is exhausted its entry in the batch dict is
  ``None``, so an evaluation step must accept ``batch["pretrain"] is None`` or
  ``batch["harmful"] is None``). Lightning 2.6's evaluation loop accepts every mode but
  ``"sequential"`` keeps the batch-dict shape only for the non-sequential modes, hence
  ``"sequential"`` is refused here for both.

Seeds: a data module's ``seed`` (its training shuffles, and whatever seeded draw a subclass
makes with it) defaults to ``None``, meaning the global seed: the ``PL_GLOBAL_SEED``
environment variable that ``seed_everything`` (``--seed_everything`` of the CLI) sets, or 0
when there is none. It is resolved lazily, at :meth:`PairedDataModule.setup` or the first
loader or dataset access, and then kept; an explicit ``seed`` always wins (docs/seeds.md).
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import CombinedLoader
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    RandomSampler,
    Sampler,
    SequentialSampler,
    TensorDataset,
)

from lightning_immunize.distributed import world_size
from lightning_immunize.sides import SIDES
from lightning_immunize.validation import unknown_choice

from .resumable import ResumableDataLoader, SkippingBatchSampler

__all__ = [
    "PairedDataModule",
    "TRAIN_MODES",
    "EVAL_MODES",
    "TASKS",
    "SPLITS",
    "SIDES",
    "GLOBAL_SEED_ENV",
    "global_seed",
]

#: CombinedLoader modes accepted for training (Lightning's fit loop refuses ``"sequential"``).
TRAIN_MODES: tuple[str, ...] = ("max_size_cycle", "min_size", "max_size")
#: CombinedLoader modes accepted for validation/test (all keep the ``{"pretrain", "harmful"}``
#: batch dict; ``"sequential"`` would not).
EVAL_MODES: tuple[str, ...] = ("max_size", "min_size", "max_size_cycle")
#: Task kinds a data module may declare.
TASKS: tuple[str, ...] = ("regression", "binary", "multiclass")
#: Splits understood by :meth:`PairedDataModule.full_tensors`.
SPLITS: tuple[str, ...] = ("train", "val", "test")
#: Environment variable in which ``seed_everything`` exports the global seed.
GLOBAL_SEED_ENV = "PL_GLOBAL_SEED"


def global_seed(default: int = 0) -> int:
    """The global seed set by ``seed_everything`` (env ``PL_GLOBAL_SEED``), else ``default``.

    Raises:
        ValueError: the variable is set but is not an integer.
    """
    value = os.environ.get(GLOBAL_SEED_ENV, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(
            f"the environment variable {GLOBAL_SEED_ENV}={value!r} (the global seed of "
            f"seed_everything) is not an integer; expected an integer such as 42."
        ) from None


def _as_float(x: Tensor) -> Tensor:
    """Floating tensors keep their precision; anything else becomes float32."""
    return x if x.is_floating_point() else x.float()


def _dataset_len(dataset: Dataset) -> int | None:
    try:
        return len(dataset)  # type: ignore[arg-type]
    except TypeError:
        return None


def _check_nonempty(dataset: Dataset | None, side: str, split: str) -> None:
    if dataset is None:
        return
    n = _dataset_len(dataset)
    if n == 0:
        raise ValueError(
            f"the {side} dataset of the {split!r} split is empty (0 samples); expected at least "
            "one sample."
        )


class PairedDataModule(LightningDataModule):
    """Serves a pre-training dataset ``D_P`` and a harmful dataset ``D_H`` side by side.

    Each dataset yields ``(x, y)`` pairs. Subclasses build their datasets lazily by overriding
    :meth:`_build`, which must set the attributes ``pretrain``, ``harmful`` and optionally
    ``val_pretrain``, ``val_harmful``, ``test_pretrain``, ``test_harmful``; it runs once, on
    :meth:`setup` or on the first call that needs data.

    Args:
        pretrain: training dataset of ``D_P``.
        harmful: training dataset of ``D_H``.
        batch_size: per-side batch size (each side of a batch holds up to ``batch_size``
            samples); at least 2, since the regularizers need two samples.
        mode: CombinedLoader mode for training, one of :data:`TRAIN_MODES`.
        val_pretrain: validation dataset of ``D_P`` (optional).
        val_harmful: validation dataset of ``D_H`` (optional).
        test_pretrain: test dataset of ``D_P`` (optional).
        test_harmful: test dataset of ``D_H`` (optional).
        num_workers: DataLoader workers per side.
        shuffle: shuffle the training loaders (seeded, reproducible).
        seed: seed of the training shuffles (pretrain side ``seed``, harmful side
            ``seed + 1``; under DDP the same seeds go to the data module's own
            ``DistributedSampler``). Default: the global seed (``seed_everything``, env
            ``PL_GLOBAL_SEED``), else 0; an explicit value overrides it. Read at
            :meth:`setup` (or the first loader), see :attr:`resolved_seed`.
        drop_last: drop the last incomplete training batch of each side. A final batch of a
            single sample (which the regularizers cannot use) triggers a warning.
        eval_mode: CombinedLoader mode for validation/test, one of :data:`EVAL_MODES`.
        task: ``"regression"``, ``"binary"`` or ``"multiclass"``; ``None`` infers it from the
            first training label (floating → regression, integer → multiclass).
        num_classes: number of classes (``None`` for regression).

    Attributes:
        pretrain, harmful, val_pretrain, val_harmful, test_pretrain, test_harmful: datasets
            (``None`` where absent).
        num_classes_pretrain, num_classes_harmful: per-side class counts (equal to
            ``num_classes`` unless a subclass sets them apart).

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> p = TensorDataset(torch.randn(10, 3), torch.zeros(10))
        >>> h = TensorDataset(torch.randn(6, 3), torch.ones(6))
        >>> dm = PairedDataModule(p, h, batch_size=4, task="binary", num_classes=2)
        >>> batch = next(iter(dm.train_dataloader()))[0]
        >>> sorted(batch), batch["pretrain"][0].shape, dm.input_dim
        (['harmful', 'pretrain'], torch.Size([4, 3]), 3)
    """

    def __init__(
        self,
        pretrain: Dataset | None = None,
        harmful: Dataset | None = None,
        batch_size: int = 64,
        mode: str = "max_size_cycle",
        val_pretrain: Dataset | None = None,
        val_harmful: Dataset | None = None,
        test_pretrain: Dataset | None = None,
        test_harmful: Dataset | None = None,
        num_workers: int = 0,
        shuffle: bool = True,
        seed: int | None = None,
        drop_last: bool = False,
        eval_mode: str = "max_size",
        task: str | None = None,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 2:
            raise ValueError(
                f"batch_size must be an integer >= 2 (the regularizers need at least two "
                f"samples per side), got {batch_size!r}."
            )
        if mode not in TRAIN_MODES:
            raise unknown_choice("training mode", mode, TRAIN_MODES)
        if eval_mode not in EVAL_MODES:
            raise unknown_choice("evaluation mode", eval_mode, EVAL_MODES)
        if task is not None and task not in TASKS:
            raise unknown_choice("task", task, TASKS)
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}.")
        if seed is not None:
            if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
                raise ValueError(
                    f"seed must be an integer or None (the global seed), got {seed!r}."
                )
            seed = int(seed)
        self.batch_size = batch_size
        self.mode = mode
        self.eval_mode = eval_mode
        self.num_workers = num_workers
        self.shuffle = shuffle
        self._seed = seed
        self._resolved_seed: int | None = None
        self.drop_last = drop_last
        self.pretrain = pretrain
        self.harmful = harmful
        #: D_H samples withheld from immunization (for the durability card's generalization).
        self.withheld_harmful: Dataset | None = None
        self.val_pretrain = val_pretrain
        self.val_harmful = val_harmful
        self.test_pretrain = test_pretrain
        self.test_harmful = test_harmful
        self._task = task
        self.num_classes = num_classes
        self.num_classes_pretrain = num_classes
        self.num_classes_harmful = num_classes
        self._input_dim: int | None = None
        self._input_dim_known = False
        self._built = False
        self._batches_checked = False
        self._validate_datasets()  # datasets passed in are checked eagerly

    # ------------------------------------------------------------------ seed
    @property
    def seed(self) -> int | None:
        """The ``seed`` argument as given: an int, or ``None`` for the global seed."""
        return self._seed

    @seed.setter
    def seed(self, value: int | None) -> None:
        # Resolved again at the next use; set it before setup() (the datasets are built once).
        self._seed = value
        self._resolved_seed = None

    def _current_seed(self) -> int:
        return self._seed if self._seed is not None else global_seed(0)

    @property
    def resolved_seed(self) -> int:
        """The data seed in use: ``seed`` if given, else the global seed (env
        ``PL_GLOBAL_SEED``, set by ``seed_everything``), else 0.

        Resolved at the first access (:meth:`setup`, the first loader or dataset access),
        not in ``__init__``, so that a ``seed_everything`` between construction and ``fit``
        counts; then kept, so datasets and every epoch's loaders agree.
        """
        if self._resolved_seed is None:
            self._resolved_seed = self._current_seed()
        return self._resolved_seed

    def _seed_for_repr(self) -> int | None:
        if self._resolved_seed is not None:
            return self._resolved_seed
        try:  # the seed that would be used now, without fixing it
            return self._current_seed()
        except ValueError:
            return self._seed

    # ------------------------------------------------------------------ building
    def _build(self) -> None:
        """Builds the datasets (subclass hook; the base class receives them ready)."""

    def _ensure_built(self) -> None:
        if self._built:
            return
        self.resolved_seed  # noqa: B018 - fixes the seed the datasets' seeded draws use
        self._build()
        self._validate_datasets()
        self._built = True

    def _validate_datasets(self) -> None:
        for split in SPLITS:
            p, h = PairedDataModule._split_datasets(self, split)
            _check_nonempty(p, "pretrain", split)
            _check_nonempty(h, "harmful", split)

    def setup(self, stage: str | None = None) -> None:
        """Resolves the data seed (:attr:`resolved_seed`) and builds the datasets once (all
        stages share them); for ``fit``, says how a side smaller than a batch is served.

        Raises:
            ValueError: a training side has fewer samples than ``batch_size`` and
                ``drop_last=True``: it would yield no batch, and no step would run.
        """
        self._ensure_built()
        if stage in (None, "fit") and not self._batches_checked:
            self._check_batches()
            self._batches_checked = True

    def _check_batches(self) -> None:
        for side, ds in zip(SIDES, (self.pretrain, self.harmful), strict=True):
            n = _dataset_len(ds) if ds is not None else None
            if n is None or n >= self.batch_size:
                continue
            if self.drop_last:
                raise ValueError(
                    f"the {side} training set has {n} samples, fewer than batch_size="
                    f"{self.batch_size}: with drop_last=True it yields no batch, so no training "
                    f"step would run; expected batch_size <= {n}, or drop_last=False."
                )
            rank_zero_info(
                f"the {side} training set has {n} samples, fewer than batch_size="
                f"{self.batch_size}: each of its batches is the whole set of {n}."
            )

    # ------------------------------------------------------------------ metadata
    @property
    def task(self) -> str:
        """``"regression"``, ``"binary"`` or ``"multiclass"``."""
        if self._task is None:
            self._ensure_built()
            ds = self.pretrain if self.pretrain is not None else self.harmful
            if ds is None:
                raise ValueError(
                    "cannot infer the task: no training dataset (pretrain and harmful are None); "
                    f"pass task=... (one of {', '.join(map(repr, TASKS))})."
                )
            y = torch.as_tensor(ds[0][1])
            self._task = "regression" if y.is_floating_point() else "multiclass"
        return self._task

    @task.setter
    def task(self, value: str) -> None:
        if value not in TASKS:
            raise unknown_choice("task", value, TASKS)
        self._task = value

    @property
    def input_dim(self) -> int | None:
        """Flattened feature count ``D`` when samples are vectors, ``None`` otherwise (images)."""
        if not self._input_dim_known:
            self._ensure_built()
        if not self._input_dim_known:
            ds = self.pretrain if self.pretrain is not None else self.harmful
            dim: int | None = None
            if ds is not None:
                x = torch.as_tensor(ds[0][0])
                dim = int(x.numel()) if x.ndim == 1 else None
            self._input_dim = dim
            self._input_dim_known = True
        return self._input_dim

    def _set_input_dim(self, dim: int | None) -> None:
        self._input_dim = dim
        self._input_dim_known = True

    # ------------------------------------------------------------------ loaders
    def _loader(self, dataset: Dataset, train: bool, offset: int) -> DataLoader:
        if not train:
            return DataLoader(
                dataset,
                batch_size=self.batch_size,
                shuffle=False,
                num_workers=self.num_workers,
                persistent_workers=self.num_workers > 0,
            )
        generator = None
        sampler: Sampler[int]
        seed = self.resolved_seed + offset
        if world_size() > 1:
            # Our own DistributedSampler: Lightning's would always shuffle training data, which
            # breaks ``shuffle=False`` (and the DDP = single-process test of record).
            sampler = DistributedSampler(dataset, shuffle=self.shuffle, seed=seed)
        elif self.shuffle:
            generator = torch.Generator().manual_seed(seed)
            sampler = RandomSampler(dataset, generator=generator)
        else:
            sampler = SequentialSampler(dataset)
        loader = ResumableDataLoader(
            dataset,
            batch_sampler=SkippingBatchSampler(sampler, self.batch_size, self.drop_last),
            generator=generator,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            position=self._train_position,
        )
        # Lightning reads ``loader.sampler`` to decide whether to inject its own
        # DistributedSampler and to call ``set_epoch``: show it the real one.
        object.__setattr__(loader, "sampler", sampler)
        return loader

    def _train_position(self) -> tuple[int, bool] | None:
        """(training batches of the current epoch consumed, epoch finished), from the trainer
        this data module is attached to; ``None`` outside ``fit``."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return None
        try:
            consumed = int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)
            total = trainer.num_training_batches
        except AttributeError:
            return None
        return consumed, total != float("inf") and consumed >= total

    def train_dataloader(self) -> CombinedLoader:
        """Training loader; each batch is ``{"pretrain": (x, y), "harmful": (x, y)}``.

        ``x`` has shape ``(B, *sample_shape)``, ``y`` shape ``(B,)`` with ``B <= batch_size``.
        """
        self._ensure_built()
        loaders: dict[str, DataLoader] = {}
        for offset, (side, ds) in enumerate(zip(SIDES, (self.pretrain, self.harmful), strict=True)):
            if ds is None:
                raise ValueError(
                    f"no {side} training dataset ({side} is None): pass {side}=... or build it "
                    "in _build()."
                )
            n = _dataset_len(ds)
            if not self.drop_last and n is not None and n > 1 and n % self.batch_size == 1:
                rank_zero_warn(
                    f"the {side} training set has {n} samples: with batch_size="
                    f"{self.batch_size} its last batch holds one sample, too few for the "
                    f"regularizers; consider drop_last=True"
                )
            loaders[side] = self._loader(ds, train=True, offset=offset)
        return CombinedLoader(loaders, mode=self.mode)

    def _eval_loader(self, p: Dataset | None, h: Dataset | None) -> CombinedLoader | list:
        loaders = {
            side: self._loader(ds, train=False, offset=0)
            for side, ds in zip(SIDES, (p, h), strict=True)
            if ds is not None
        }
        if not loaders:
            return []
        return CombinedLoader(loaders, mode=self.eval_mode)

    def val_dataloader(self) -> CombinedLoader | list:
        """Validation loader in ``eval_mode`` (default ``"max_size"``); ``[]`` without val data.

        Batches are dicts keyed by the sides that have a validation set; in ``"max_size"`` an
        exhausted side's entry is ``None``. An empty list makes Lightning skip validation
        (``fit`` runs without it, ``validate`` returns ``[]``; Lightning emits a one-time
        "Total length of `list` across ranks is zero" warning).
        """
        self._ensure_built()
        return self._eval_loader(self.val_pretrain, self.val_harmful)

    def test_dataloader(self) -> CombinedLoader | list:
        """Test loader, same conventions as :meth:`val_dataloader`."""
        self._ensure_built()
        return self._eval_loader(self.test_pretrain, self.test_harmful)

    # ------------------------------------------------------------------ full tensors
    def _split_datasets(self, split: str) -> tuple[Dataset | None, Dataset | None]:
        """Datasets (pretrain, harmful) used by :meth:`full_tensors` for ``split``."""
        return {
            "train": (self.pretrain, self.harmful),
            "val": (self.val_pretrain, self.val_harmful),
            "test": (self.test_pretrain, self.test_harmful),
        }[split]

    def _stack(self, dataset: Dataset) -> tuple[Tensor, Tensor]:
        if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
            x, y = dataset.tensors
            return _as_float(x), y
        loader = DataLoader(dataset, batch_size=256, shuffle=False, num_workers=self.num_workers)
        xs: list[Tensor] = []
        ys: list[Tensor] = []
        for x, y in loader:
            xs.append(torch.as_tensor(x))
            ys.append(torch.as_tensor(y))
        return _as_float(torch.cat(xs)), torch.cat(ys)

    def full_tensors(self, split: str = "train") -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """All samples of a split as tensors, exactly as the extractor sees them.

        Args:
            split: ``"train"``, ``"val"`` or ``"test"``.

        Returns:
            ``(X_P, y_P, X_H, y_H)``: ``X_*`` floating (float32 unless the data module
            keeps float64, as house prices does) of shape ``(N_*, *sample_shape)``
            (``(N_*, D)`` for vector data), ``y_*`` of shape ``(N_*,)`` (float for
            regression/binary, int64 for multiclass). Tensors may share storage with the
            datasets: do not modify them in place.

        Raises:
            ValueError: unknown split, or the split lacks a pretrain or harmful dataset.
        """
        if split not in SPLITS:
            raise unknown_choice("split", split, SPLITS)
        self._ensure_built()
        p, h = self._split_datasets(split)
        missing = [side for side, ds in zip(SIDES, (p, h), strict=True) if ds is None]
        if missing:
            raise ValueError(
                f"split {split!r} does not exist in {type(self).__name__}: "
                f"no {' and '.join(missing)} dataset for it; expected a split with a dataset on "
                "each side."
            )
        assert p is not None and h is not None
        x_p, y_p = self._stack(p)
        x_h, y_h = self._stack(h)
        return x_p, y_p, x_h, y_h

    def sizes(self) -> dict[str, dict[str, int | None]]:
        """Sample counts per split and side (``None`` where absent)."""
        self._ensure_built()
        out: dict[str, dict[str, int | None]] = {}
        for split in SPLITS:
            p, h = self._split_datasets(split)
            out[split] = {
                side: (None if ds is None else _dataset_len(ds))
                for side, ds in zip(SIDES, (p, h), strict=True)
            }
        return out

    def __repr__(self) -> str:
        fields: Sequence[tuple[str, Any]] = (
            ("batch_size", self.batch_size),
            ("mode", self.mode),
            ("eval_mode", self.eval_mode),
            ("seed", self._seed_for_repr()),  # in use, or that would be now (not fixed)
        )
        inner = ", ".join(f"{k}={v!r}" for k, v in fields)
        return f"{type(self).__name__}({inner})"
