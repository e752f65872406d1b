"""θ_0 trained from scratch: the "pre-trained model" of deep immunization when no pre-trained
weights exist (deep MNIST halves), and the file cache that lets every method, seed and later
run start from the same network (used by
:class:`~lightning_immunize.callbacks.PretrainFromScratch`)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_immunize.fingerprints import fingerprint, named_fingerprint

__all__ = [
    "check_epochs",
    "default_cache_dir",
    "save_theta0",
    "state_fingerprint",
    "theta0_key",
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


def check_epochs(epochs: int, max_epochs: int, who: str) -> None:
    """A ``ValueError`` naming ``who`` unless ``1 <= epochs <= max_epochs``."""
    if not 1 <= epochs <= max_epochs:
        raise ValueError(
            f"{who} needs 1 <= epochs <= max_epochs, got epochs={epochs} and "
            f"max_epochs={max_epochs}."
        )


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
    check_epochs(epochs, max_epochs, "train_classifier")
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


def theta0_key(
    extractor: nn.Module, head: nn.Module, recipe: dict[str, Any], data: tuple[Tensor, ...]
) -> str:
    """Cache key of θ_0 (16 hex digits): a SHA-256 of everything that determines the result —
    the initial weights of extractor and head (so the architecture and its seed), the training
    recipe, and the bytes of ``data`` (D_P's training and held-out tensors)."""
    parts = {
        "initial": state_fingerprint(extractor, head),
        "recipe": recipe,
        "data": fingerprint(*data),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def save_theta0(path: Path, extractor: nn.Module, head: nn.Module, info: dict[str, Any]) -> Path:
    """Write θ_0 (both state dicts on the CPU, and ``info``) to ``path`` atomically: a killed
    run never leaves a half-written file. Read it back with ``torch.load(weights_only=True)``."""
    state = {
        "extractor": {k: v.detach().cpu() for k, v in extractor.state_dict().items()},
        "head": {k: v.detach().cpu() for k, v in head.state_dict().items()},
        "info": info,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path
