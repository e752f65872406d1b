"""Global-batch collectives for the regularizers under DDP (``docs/distributed.md``).

``S = ZᵀZ`` is a sum over samples, so every rank must see the global batch. Features are
all-gathered with the *differentiable* collective of ``torch.distributed.nn``: its backward
sums, over ranks, the gradient that every rank computes for each rank's rows. Each rank thus
receives ``W·∂R/∂Z_r``, and DDP's averaging of parameter gradients over the ``W`` ranks
brings that back to exactly ``∂R/∂θ`` of the global batch — the same figure as one process
holding the concatenated batch.

Outside an initialised process group (one process, a laptop, CI) every function is the
identity, so nothing here requires ``torch.distributed`` to be set up.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["world_size", "gather_rows", "all_reduce_sum"]


def world_size() -> int:
    """Number of processes of the default group (1 when not distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def gather_rows(t: Tensor, differentiable: bool = True) -> Tensor:
    """Concatenate ``t`` (B, ...) of every rank along dim 0, in rank order.

    Every rank must pass the same trailing shape; batch sizes may differ. With
    ``differentiable=True`` gradients flow back to each rank's own rows (summed over ranks).
    """
    if world_size() == 1:
        return t
    sizes = _gather_sizes(t.shape[0], t.device)
    if len(set(sizes)) > 1:  # pad to a common size: all_gather needs equal shapes
        pad = max(sizes) - t.shape[0]
        t = torch.cat([t, t.new_zeros((pad, *t.shape[1:]))]) if pad else t
    if differentiable:
        import torch.distributed.nn.functional as dist_nn

        parts = dist_nn.all_gather(t)
    else:
        parts = [torch.empty_like(t) for _ in range(world_size())]
        torch.distributed.all_gather(parts, t.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)])


def _gather_sizes(n: int, device: torch.device) -> list[int]:
    local = torch.tensor([n], device=device)
    sizes = [torch.zeros_like(local) for _ in range(world_size())]
    torch.distributed.all_gather(sizes, local)
    return [int(s) for s in sizes]


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum of ``t`` over ranks (a new tensor; not differentiable)."""
    if world_size() == 1:
        return t
    out = t.detach().clone()
    torch.distributed.all_reduce(out)
    return out
