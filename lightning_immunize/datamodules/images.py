"""Image-folder pairs for deep immunization (the paper's Section 5.2).

Both ``D_P`` (e.g. ImageNet) and ``D_H`` (e.g. Stanford Cars, Country211) are read as
ImageNet-style class folders with :class:`torchvision.datasets.ImageFolder` and timm's
preprocessing. Nothing is downloaded: the folders must exist locally.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import Dataset, Subset

from .base import PairedDataModule

__all__ = ["ImagePairDataModule", "check_image_files", "resolve_image_data_config"]


def resolve_image_data_config(
    model_name: str | None = None, image_size: int | None = 224
) -> dict[str, Any]:
    """timm data config (``input_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct``...).

    Args:
        model_name: timm model name whose pretrained config supplies the preprocessing
            (read from timm's registry, nothing downloaded); ``None``: ImageNet defaults.
        image_size: square input side overriding the model's; ``None`` keeps the model's
            (224 when no model is given).

    Raises:
        ValueError: ``model_name`` unknown to timm.
    """
    import timm
    from timm.data import resolve_data_config

    if model_name is not None:
        cfg = timm.get_pretrained_cfg(model_name)
        if cfg is None:
            raise ValueError(
                f"timm has no pretrained config for model {model_name!r}; expected a name "
                "that timm.list_pretrained() lists."
            )
        config = resolve_data_config(pretrained_cfg=cfg.to_dict())
    else:
        config = resolve_data_config(args={"input_size": (3, 224, 224)})
    if image_size is not None:
        config["input_size"] = (config["input_size"][0], image_size, image_size)
    return config


def _root_and_subdir(root: Path, subdir: str | None) -> tuple[Path, bool]:
    if not root.is_dir():
        raise FileNotFoundError(
            f"image folder not found: {root} (expected a folder of ImageNet-style class folders)."
        )
    if subdir and (root / subdir).is_dir():
        return root / subdir, True
    return root, False


def check_image_files(paths: Iterable[str | Path]) -> None:
    """Opens every image once (``PIL.Image.verify``: headers and structure, no decoding), so
    that an empty or corrupt file is named at setup, not deep inside a training epoch.

    Raises:
        ValueError: naming the first empty (0-byte) or unreadable file.
    """
    from PIL import Image

    for path in paths:
        if os.path.getsize(path) == 0:
            raise ValueError(f"image file {path} is empty (0 bytes); expected an image file.")
        try:
            with Image.open(path) as image:
                image.verify()
        except Exception as err:  # noqa: BLE001 - PIL raises many types on a bad file
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ValueError(
                f"image file {path} cannot be read as an image ({reason}); expected a valid "
                "image file (remove or replace it)."
            ) from err


def _image_folder(path: Path, transform: Callable | None, check: bool = True) -> Dataset:
    from torchvision.datasets import ImageFolder

    try:
        folder = ImageFolder(str(path), transform=transform)
    except FileNotFoundError as err:  # no class folder, or class folders without images
        raise ValueError(
            f"no images found in {path}: expected ImageNet-style class folders "
            f"(<path>/<class>/<image>) holding image files ({err})."
        ) from err
    if check:
        check_image_files(p for p, _ in folder.samples)
    return folder


class ImagePairDataModule(PairedDataModule):
    """Pair of ImageNet-style image folders: ``D_P`` from ``pretrain_root``, ``D_H`` from
    ``harmful_root``.

    Each root is either ``<root>/<train_subdir>/<class>/<img>`` (with an optional
    ``<root>/<val_subdir>/...`` validation set) or directly ``<root>/<class>/<img>`` when
    ``<root>/<train_subdir>`` does not exist (then there is no validation set: a warning says
    so, as it does when ``<root>/<val_subdir>`` is missing; ``val_subdir=None`` silences both;
    a ``<root>/<val_subdir>`` without ``<root>/<train_subdir>`` is an error). Samples
    are ``x`` float32 ``(3, image_size, image_size)`` and an int64 class index;
    ``task == "multiclass"``, ``input_dim is None``. The two sides have their own label
    spaces: ``num_classes_pretrain`` and ``num_classes_harmful``; ``num_classes`` is their
    common value, or ``None`` when they differ.

    Args:
        pretrain_root: folder of ``D_P``.
        harmful_root: folder of ``D_H``.
        image_size: square input side; ``None`` keeps the model config's.
        batch_size: per-side batch size (>= 2).
        model_name: timm model whose pretrained data config (mean, std, interpolation,
            crop) is used; ``None``: ImageNet defaults.
        train_subdir: training sub-folder name.
        val_subdir: validation sub-folder name (``None``: no validation).
        max_samples: optional per-side cap on each split, drawn with a permutation seeded
            by ``seed`` (indices kept in folder order).
        augment: use timm's training transform (random crop/flip) for the training sets;
            by default both splits use the deterministic evaluation transform.
            :meth:`full_tensors` always uses the evaluation transform.
        mode: training CombinedLoader mode.
        num_workers: DataLoader workers.
        shuffle: shuffle training loaders.
        seed: seed of the shuffles and of the ``max_samples`` draw. Default: the global seed
            (``seed_everything``, env ``PL_GLOBAL_SEED``), else 0; so the ``max_samples``
            subsets follow ``--seed_everything`` unless ``seed`` is set.
        drop_last: drop the last incomplete training batch.
        check_images: open every image file once at setup (``PIL.Image.verify``) so that an
            empty or corrupt file is an error naming it before training; ``False`` skips this
            for very large folders.

    Attributes:
        class_names: ``{"pretrain": [...], "harmful": [...]}`` (set once built).
    """

    def __init__(
        self,
        pretrain_root: str | Path,
        harmful_root: str | Path,
        image_size: int | None = 224,
        batch_size: int = 64,
        model_name: str | None = None,
        train_subdir: str = "train",
        val_subdir: str | None = "val",
        max_samples: int | None = None,
        augment: bool = False,
        mode: str = "max_size_cycle",
        num_workers: int = 0,
        shuffle: bool = True,
        seed: int | None = None,
        drop_last: bool = False,
        check_images: bool = True,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            mode=mode,
            num_workers=num_workers,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
            task="multiclass",
            num_classes=None,
        )
        if max_samples is not None and max_samples < 1:
            raise ValueError(f"max_samples must be >= 1 or None, got {max_samples}.")
        if image_size is not None and image_size < 1:
            raise ValueError(f"image_size must be >= 1 or None, got {image_size}.")
        self.pretrain_root = Path(pretrain_root)
        self.harmful_root = Path(harmful_root)
        self.image_size = image_size
        self.model_name = model_name
        self.train_subdir = train_subdir
        self.val_subdir = val_subdir
        self.max_samples = max_samples
        self.augment = augment
        self.check_images = check_images
        self.data_config = resolve_image_data_config(model_name, image_size)
        self.class_names: dict[str, list[str]] = {}
        self._train_eval: tuple[Dataset | None, Dataset | None] = (None, None)
        self._set_input_dim(None)
        self.save_hyperparameters()

    def transform(self, training: bool = False) -> Callable:
        """timm transform from :attr:`data_config` (training: with augmentation)."""
        from timm.data import create_transform

        return create_transform(**self.data_config, is_training=training)

    def _limit(self, dataset: Dataset, offset: int) -> Dataset:
        n = len(dataset)  # type: ignore[arg-type]
        if self.max_samples is None or self.max_samples >= n:
            return dataset
        generator = torch.Generator().manual_seed(self.resolved_seed + offset)
        idx = torch.sort(torch.randperm(n, generator=generator)[: self.max_samples]).values
        return Subset(dataset, idx.tolist())

    def _build(self) -> None:
        eval_tf = self.transform(training=False)
        train_tf = self.transform(training=True) if self.augment else eval_tf
        built: dict[str, dict[str, Dataset | None]] = {}
        counts: dict[str, int] = {}
        for offset, (side, root) in enumerate(
            (("pretrain", self.pretrain_root), ("harmful", self.harmful_root))
        ):
            train_dir, has_subdir = _root_and_subdir(root, self.train_subdir)
            self._check_layout(side, root, has_subdir)
            train_folder = _image_folder(train_dir, train_tf, self.check_images)
            classes = list(train_folder.classes)  # type: ignore[attr-defined]
            self.class_names[side] = classes
            counts[side] = len(classes)
            train = self._limit(train_folder, 2 * offset)
            train_eval = train
            if self.augment:
                train_eval = self._limit(_image_folder(train_dir, eval_tf, False), 2 * offset)
            val = None
            if has_subdir and self.val_subdir and (root / self.val_subdir).is_dir():
                val_folder = _image_folder(root / self.val_subdir, eval_tf, self.check_images)
                if list(val_folder.classes) != classes:  # type: ignore[attr-defined]
                    val_classes = set(val_folder.classes)  # type: ignore[attr-defined]
                    raise ValueError(
                        f"{root / self.val_subdir}: class folders differ from those of "
                        f"{train_dir} (only in {self.val_subdir!r}: "
                        f"{sorted(val_classes - set(classes))[:5]}, only in the training folder: "
                        f"{sorted(set(classes) - val_classes)[:5]}); expected the same classes."
                    )
                val = self._limit(val_folder, 2 * offset + 1)
            built[side] = {"train": train, "train_eval": train_eval, "val": val}
        self.pretrain = built["pretrain"]["train"]
        self.harmful = built["harmful"]["train"]
        self.val_pretrain = built["pretrain"]["val"]
        self.val_harmful = built["harmful"]["val"]
        self._train_eval = (built["pretrain"]["train_eval"], built["harmful"]["train_eval"])
        self.num_classes_pretrain = counts["pretrain"]
        self.num_classes_harmful = counts["harmful"]
        same = counts["pretrain"] == counts["harmful"]
        self.num_classes = counts["pretrain"] if same else None

    def _check_layout(self, side: str, root: Path, has_subdir: bool) -> None:
        """Says (once per build) when ``root`` gives no validation set although ``val_subdir``
        asks for one; a ``val_subdir`` without a ``train_subdir`` is an error (it would
        become a class)."""
        train, val = self.train_subdir, self.val_subdir
        if not train or not val:  # the user chose a flat root, or no validation
            return
        if not has_subdir and (root / val).is_dir():
            raise ValueError(
                f"{root} has a {val!r} sub-folder but no {train!r} one: expected "
                f"{root}/{train}/<class>/<image> beside {root}/{val}/<class>/<image>, or "
                f"only class folders directly in {root} (as it is, {val!r} would be a class)."
            )
        if not has_subdir:
            rank_zero_warn(
                f"{root} has no {train!r} sub-folder: its class folders are all the {side} "
                f"training set, and the {side} side has no validation set (expected "
                f"{root}/{train}/<class>/<image> and {root}/{val}/<class>/<image> for one)"
            )
        elif not (root / val).is_dir():
            rank_zero_warn(
                f"{root / val} not found: the {side} side has no validation set (training "
                f"on {root / train}; pass val_subdir=None to say it is intended)"
            )

    def _split_datasets(self, split: str) -> tuple[Dataset | None, Dataset | None]:
        if split == "train":
            return self._train_eval
        return super()._split_datasets(split)
