"""θ_0 trained here: the "pre-trained model" of deep immunization when no pre-trained weights
exist (deep MNIST halves), cached on disk so every method, seed and later run starts from the
same network.

:class:`PretrainFromScratch` trains the module's extractor *and* head on ``D_P``'s training
split with AdamW and cross-entropy, epoch by epoch, until the held-out accuracy reaches
``min_accuracy`` (at least ``epochs``, at most ``max_epochs`` epochs), then saves both state
dicts. The cache key is a SHA-256 of everything that determines the result: the initial
weights of extractor and head (so the architecture and its seed), the recipe, and the bytes of
``D_P``'s training and held-out tensors. A second run with the same key loads the file
instead of training (``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_immunize.callbacks.report import fingerprint, named_fingerprint
from lightning_immunize.distributed import world_size

__all__ = [
    "PretrainFromScratch",
    "default_cache_dir",
    "state_fingerprint",
    "train_classifier",
]


def default_cache_dir() -> Path:
    """``$LIGHTNING_IMMUNIZE_CACHE``, else ``$XDG_CACHE_HOME/lightning_immunize``, else
    ``~/.cache/lightning_immunize``; θ_0 files go to its ``theta0/`` folder."""
    env = os.environ.get("LIGHTNING_IMMUNIZE_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lightning_immunize"


def state_fingerprint(*modules: nn.Module) -> str:
    """SHA-256 (16 hex digits) of the modules' state dicts: names, dtypes, shapes and bytes."""
    return named_fingerprint(item for m in modules for item in m.state_dict().items())


@torch.no_grad()
def _accuracy(extractor: nn.Module, head: nn.Module, X: Tensor, y: Tensor, batch: int) -> float:
    device = next(head.parameters()).device
    correct = 0
    for i in range(0, X.shape[0], batch):
        logits = head(extractor(X[i : i + batch].to(device)))
        correct += int((logits.argmax(dim=1) == y[i : i + batch].to(device)).sum())
    return correct / max(1, X.shape[0])


def train_classifier(
    extractor: nn.Module,
    head: nn.Module,
    X: Tensor,
    y: Tensor,
    X_val: Tensor,
    y_val: Tensor,
    *,
    epochs: int = 3,
    max_epochs: int = 10,
    min_accuracy: float = 0.97,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    batch_size: int = 128,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Trains ``head(extractor(x))`` on ``(X, y)`` with AdamW and cross-entropy, every
    parameter trainable and every layer in train mode, whatever their flags were (restored
    afterwards). Stops after ``epochs`` epochs once the held-out accuracy is
    ``≥ min_accuracy``, or after ``max_epochs``. Shuffling uses a private generator seeded
    with ``seed``; the global RNG is untouched.

    Shapes: ``X`` ``(N, C, H, W)`` (any input the extractor takes), ``y`` ``(N,)`` int64.

    Returns:
        ``{"val_accuracy": [per epoch], "epochs": int, "seconds": float}``.
    """
    if not 1 <= epochs <= max_epochs:
        raise ValueError(f"need 1 <= epochs <= max_epochs, got epochs={epochs}, {max_epochs=}")
    params = [*extractor.parameters(), *head.parameters()]
    flags = [p.requires_grad for p in params]
    modes = {m: m.training for m in (*extractor.modules(), *head.modules())}
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    device = params[0].device
    history: list[float] = []
    start = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_epochs, desc="θ_0 from scratch", unit="epoch", leave=False)
    try:
        for epoch in range(1, max_epochs + 1):
            for m in modes:
                m.train()
            perm = torch.randperm(X.shape[0], generator=gen)
            for i in range(0, X.shape[0], batch_size):
                idx = perm[i : i + batch_size]
                if idx.numel() < 2:  # BatchNorm cannot train on one sample
                    continue
                optimizer.zero_grad()
                logits = head(extractor(X[idx].to(device)))
                loss = nn.functional.cross_entropy(logits, y[idx].to(device))
                loss.backward()
                optimizer.step()
            for m in modes:
                m.eval()
            history.append(_accuracy(extractor, head, X_val, y_val, 4 * batch_size))
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"held-out accuracy {history[-1]:.4f}")
            if epoch >= epochs and history[-1] >= min_accuracy:
                break
    finally:
        if bar is not None:
            bar.close()
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
        for m, mode in modes.items():
            m.training = mode
    return {"val_accuracy": history, "epochs": len(history), "seconds": time.perf_counter() - start}


class PretrainFromScratch(pl.Callback):
    """Makes the module's extractor and head θ_0: loads them from the cache, or trains them
    from scratch on ``D_P`` (:func:`train_classifier`) and caches them. Runs in ``setup`` of
    ``fit`` (before a checkpoint is restored and before any callback keeps θ_0 as the
    reference), so list it before other callbacks.

    The data module must give ``full_tensors("train")`` and ``full_tensors("val")`` (held-out
    images, for the accuracy). Under DDP rank 0 trains and writes while the others wait, then
    every rank loads the same file.

    Args:
        cache_dir: folder of the cached files (default :func:`default_cache_dir` ``/ "theta0"``).
        epochs, max_epochs, min_accuracy, lr, weight_decay, batch_size, seed, progress:
            the recipe, see :func:`train_classifier`.
        require_accuracy: raise if the held-out accuracy stays below ``min_accuracy`` after
            ``max_epochs`` (otherwise a warning is printed and the model is used anyway).

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
        if not 1 <= epochs <= max_epochs:
            raise ValueError(f"need 1 <= epochs <= max_epochs, got {epochs=}, {max_epochs=}")
        if not 0.0 <= min_accuracy <= 1.0:
            raise ValueError(f"min_accuracy must be in [0, 1], got {min_accuracy!r}")
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
        self.info: dict[str, Any] = {}

    @property
    def directory(self) -> Path:
        return self.cache_dir if self.cache_dir is not None else default_cache_dir() / "theta0"

    def cache_key(self, module: nn.Module, datamodule: Any) -> str:
        """The key of θ_0 for this module's initial weights, the recipe and ``D_P``."""
        x, y, _, _ = datamodule.full_tensors("train")
        x_val, y_val, _, _ = datamodule.full_tensors("val")
        parts = {
            "initial": state_fingerprint(module.extractor, module.head),
            "recipe": self.recipe,
            "data": fingerprint(x, y, x_val, y_val),
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]

    def apply(self, module: nn.Module, datamodule: Any, trainer: pl.Trainer | None = None) -> dict:
        """Loads or trains θ_0 into ``module.extractor`` and ``module.head``; returns ``info``."""
        if (
            self.info
            and state_fingerprint(module.extractor, module.head) == self.info["fingerprint"]
        ):
            return self.info  # already θ_0 (applied before fit, then again in setup)
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
            raise FileNotFoundError(f"θ_0 cache file {path} was not written")
        state = torch.load(path, map_location="cpu", weights_only=True)
        module.extractor.load_state_dict(state["extractor"])
        module.head.load_state_dict(state["head"])
        self.info = {"path": str(path), "key": key, "cached": cached, **state["info"]}
        self.info["fingerprint"] = state_fingerprint(module.extractor, module.head)
        if cached:
            rank_zero_info(
                f"θ_0 loaded from cache {path} (held-out accuracy {self.info['val_accuracy']:.4f})"
            )
        return self.info

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
        rank_zero_info(
            f"θ_0 trained from scratch: held-out accuracy {accuracy:.4f} after "
            f"{result['epochs']} epoch(s), {result['seconds']:.1f} s"
        )
        if accuracy < self.recipe["min_accuracy"]:
            message = (
                f"θ_0 reached held-out accuracy {accuracy:.4f} < min_accuracy "
                f"{self.recipe['min_accuracy']} after max_epochs={self.recipe['max_epochs']}"
            )
            if self.require_accuracy:
                raise RuntimeError(message + "; raise max_epochs or lr, or lower min_accuracy")
            rank_zero_info("warning: " + message)
        info = {
            "val_accuracy": accuracy,
            "val_accuracy_history": result["val_accuracy"],
            "epochs": result["epochs"],
            "seconds": result["seconds"],
            "recipe": self.recipe,
        }
        state = {
            "extractor": {k: v.detach().cpu() for k, v in module.extractor.state_dict().items()},
            "head": {k: v.detach().cpu() for k, v in module.head.state_dict().items()},
            "info": info,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(state, tmp)
        os.replace(tmp, path)  # atomic: a killed run never leaves a half-written θ_0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.apply(pl_module, trainer.datamodule, trainer)
