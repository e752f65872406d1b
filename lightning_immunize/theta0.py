"""θ_0, the pre-trained model that immunization starts from, as configuration.

The ``theta0:`` group of a config says how θ_0 is obtained; the builder
(:class:`~lightning_immunize.build.ImmunizationCLI`) resolves it before any callback runs:

* :class:`AsBuilt` (the default): the extractor as its config builds it — timm's pretrained
  weights (``pretrained: true``) or its ``checkpoint_path``;
* :class:`FromScratch`: trained from scratch on D_P with a recipe and cached on disk, so every
  method, seed and later run starts from the same network (deep MNIST halves);
* :class:`FromCheckpoint`: the extractor's and head's weights from a file.

Example (a config)::

    theta0:
      class_path: lightning_immunize.theta0.FromScratch
      init_args: {epochs: 3, max_epochs: 10, min_accuracy: 0.97}
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_immunize.distributed import world_size
from lightning_immunize.pretraining import (
    check_epochs,
    default_cache_dir,
    save_theta0,
    state_fingerprint,
    theta0_key,
    train_classifier,
)

__all__ = ["AsBuilt", "FromCheckpoint", "FromScratch", "Theta0"]


def _info(message: str) -> None:
    from lightning.pytorch.utilities import rank_zero_info

    rank_zero_info(message)


class Theta0:
    """How θ_0 is obtained: :meth:`apply` puts it into ``module.extractor`` and
    ``module.head``. Subclass it for another source and implement :meth:`load`.

    Attributes:
        info: after :meth:`apply`, what was done (a source's own keys) and ``fingerprint``,
            of the θ_0 weights: applying again to a module that already holds them (built
            before a fit, then the fit's setup) does nothing.
    """

    def __init__(self) -> None:
        self.info: dict[str, Any] = {}

    def apply(self, module: nn.Module, datamodule: Any, trainer: Any = None) -> dict[str, Any]:
        """Make ``module``'s extractor and head θ_0, unless they are already; ``trainer`` (when
        a fit runs) lets rank 0 do the work under DDP while the others wait. Returns
        :attr:`info`."""
        if self.info and state_fingerprint(module.extractor, module.head) == self.info.get(
            "fingerprint"
        ):
            return self.info
        self.info = self.load(module, datamodule, trainer)
        self.info["fingerprint"] = state_fingerprint(module.extractor, module.head)
        return self.info

    def load(self, module: nn.Module, datamodule: Any, trainer: Any = None) -> dict[str, Any]:
        """Put θ_0 into ``module``; returns what was done, for :attr:`info`."""
        raise NotImplementedError


class AsBuilt(Theta0):
    """θ_0 is the extractor as its config builds it (timm's pretrained weights with
    ``pretrained: true``, its ``checkpoint_path``, or a linear extractor's ``init``)."""

    def load(self, module: nn.Module, datamodule: Any, trainer: Any = None) -> dict[str, Any]:
        return {"source": "as built"}


class FromCheckpoint(Theta0):
    """θ_0's extractor and head weights from ``path``: a Lightning checkpoint (its
    ``state_dict``'s ``extractor.*`` and ``head.*`` entries) or a ``torch.save`` file holding
    ``{"extractor": state_dict, "head": state_dict}`` (the θ_0 cache's format).

    Args:
        path: the file.
        strict: refuse missing or unexpected parameter names.

    Raises:
        FileNotFoundError: at :meth:`apply`, when ``path`` does not exist.
    """

    def __init__(self, path: str | os.PathLike[str], strict: bool = True) -> None:
        super().__init__()
        self.path = Path(path)
        self.strict = strict

    def load(self, module: nn.Module, datamodule: Any, trainer: Any = None) -> dict[str, Any]:
        if not self.path.is_file():
            raise FileNotFoundError(
                f"θ_0 checkpoint {self.path} not found; expected a Lightning checkpoint or a "
                "torch.save file with 'extractor' and 'head' state dicts."
            )
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        if "state_dict" in state:
            flat = state["state_dict"]
            state = {
                part: {k[len(part) + 1 :]: v for k, v in flat.items() if k.startswith(f"{part}.")}
                for part in ("extractor", "head")
            }
        module.extractor.load_state_dict(state["extractor"], strict=self.strict)
        if state.get("head") and module.head is not None:
            module.head.load_state_dict(state["head"], strict=self.strict)
        return {"source": "checkpoint", "path": str(self.path)}


class FromScratch(Theta0):
    """θ_0 trained from scratch on D_P and cached: loads it from the cache, or trains it
    (:func:`~lightning_immunize.pretraining.train_classifier`) and caches it. The cache key
    covers the module's initial weights, the recipe and the data, so every method, seed and
    later run starts from the same network.

    The data module must give ``full_tensors("train")`` and ``full_tensors("val")`` (held-out
    images, for the accuracy). Under DDP rank 0 trains and writes while the others wait, then
    every rank loads the same file.

    Args:
        cache_dir: folder of the cached files (default
            :func:`~lightning_immunize.pretraining.default_cache_dir` ``/ "theta0"``).
        epochs: train at least this many epochs (``1 ≤ epochs ≤ max_epochs``), then stop
            once the held-out accuracy reaches ``min_accuracy``.
        max_epochs: train at most this many epochs.
        min_accuracy: the held-out accuracy, in [0, 1], to reach.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        batch_size: training batch size.
        seed: seed of the shuffles (a private generator; the global RNG is untouched).
        progress: show a progress bar while training.
        require_accuracy: raise if the held-out accuracy stays below ``min_accuracy`` after
            ``max_epochs`` (otherwise a warning is printed and the model is used anyway).

    Raises:
        ValueError: ``epochs`` outside ``[1, max_epochs]`` or ``min_accuracy`` outside [0, 1].

    Attributes:
        info: after :meth:`apply`: ``path``, ``key``, ``cached`` (loaded, not trained),
            ``val_accuracy`` (the final held-out accuracy), ``epochs``, ``seconds``,
            ``fingerprint`` (of the θ_0 weights: applying again to a module that already holds
            them does nothing).
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike[str] | None = None,
        epochs: int = 3,
        max_epochs: int = 10,
        min_accuracy: float = 0.97,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        batch_size: int = 128,
        seed: int = 0,
        progress: bool = True,
        require_accuracy: bool = True,
    ) -> None:
        super().__init__()
        check_epochs(epochs, max_epochs, "FromScratch")
        if not 0.0 <= min_accuracy <= 1.0:
            raise ValueError(
                f"FromScratch's min_accuracy must be in [0, 1] (a fraction), got {min_accuracy!r}."
            )
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.recipe = {
            "epochs": epochs,
            "max_epochs": max_epochs,
            "min_accuracy": min_accuracy,
            "lr": lr,
            "weight_decay": weight_decay,
            "batch_size": batch_size,
            "seed": seed,
        }
        self.progress = progress
        self.require_accuracy = require_accuracy

    @property
    def directory(self) -> Path:
        """The folder of the cached θ_0 files."""
        return self.cache_dir if self.cache_dir is not None else default_cache_dir() / "theta0"

    def cache_key(self, module: nn.Module, datamodule: Any) -> str:
        """The key of θ_0 for this module's initial weights, the recipe and ``D_P``."""
        x, y, _, _ = datamodule.full_tensors("train")
        x_val, y_val, _, _ = datamodule.full_tensors("val")
        return theta0_key(module.extractor, module.head, self.recipe, (x, y, x_val, y_val))

    def load(self, module: nn.Module, datamodule: Any, trainer: Any = None) -> dict[str, Any]:
        datamodule.setup("fit")
        key = self.cache_key(module, datamodule)
        path = self.directory / f"theta0-{key}.pt"
        cached = path.is_file()
        is_zero = trainer is None or trainer.is_global_zero
        if not cached and is_zero:
            self._train_and_save(module, datamodule, path, key)
        if trainer is not None and world_size() > 1:
            trainer.strategy.barrier("lightning_immunize.theta0")
        if not path.is_file():
            raise FileNotFoundError(
                f"θ_0 cache file {path} was not written; expected rank 0 to write it in a "
                "folder every rank can read."
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        module.extractor.load_state_dict(state["extractor"])
        module.head.load_state_dict(state["head"])
        if cached:
            accuracy = state["info"]["val_accuracy"]
            _info(f"θ_0 loaded from cache {path} (held-out accuracy {accuracy:.4f})")
        return {"path": str(path), "key": key, "cached": cached, **state["info"]}

    def _train_and_save(self, module: nn.Module, datamodule: Any, path: Path, key: str) -> None:
        x, y, _, _ = datamodule.full_tensors("train")
        x_val, y_val, _, _ = datamodule.full_tensors("val")
        dtype = next(module.head.parameters()).dtype
        result = train_classifier(
            module.extractor,
            module.head,
            x.to(dtype),
            y,
            x_val.to(dtype),
            y_val,
            progress=self.progress,
            **self.recipe,
        )
        accuracy = result["val_accuracy"][-1]
        _info(
            f"θ_0 trained from scratch: held-out accuracy {accuracy:.4f} after "
            f"{result['epochs']} epoch(s), {result['seconds']:.1f} s"
        )
        if accuracy < self.recipe["min_accuracy"]:
            message = (
                f"θ_0 reached held-out accuracy {accuracy:.4f} < min_accuracy "
                f"{self.recipe['min_accuracy']} after max_epochs={self.recipe['max_epochs']}"
            )
            if self.require_accuracy:
                raise RuntimeError(message + "; raise max_epochs or lr, or lower min_accuracy.")
            _info("warning: " + message)
        info = {
            "val_accuracy": accuracy,
            "val_accuracy_history": result["val_accuracy"],
            "epochs": result["epochs"],
            "seconds": result["seconds"],
            "recipe": self.recipe,
        }
        save_theta0(path, module.extractor, module.head, info)
