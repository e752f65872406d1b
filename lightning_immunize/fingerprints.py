"""Content fingerprints: which data and which weights a model was immunized and measured on,
recorded without the data (``immunization.json``, exported headers, the θ_0 cache key)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch

__all__ = ["fingerprint", "named_fingerprint"]


def fingerprint(*tensors: torch.Tensor) -> str:
    """SHA-256 (first 16 hex digits) of the tensors' dtypes, shapes and bytes: which data a
    model was immunized and measured on, without the data."""
    return named_fingerprint(("", t) for t in tensors)


def named_fingerprint(items: Iterable[tuple[str, torch.Tensor]]) -> str:
    """:func:`fingerprint` of named tensors (a state dict's items): the names count too."""
    digest = hashlib.sha256()
    for name, t in items:
        t = t.detach().cpu().contiguous()
        digest.update(f"{name}{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # any dtype, bf16 too
    return digest.hexdigest()[:16]
