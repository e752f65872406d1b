"""Numerical robustness of the module's regularizer step (hypothesis-driven)."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_immunize.models import LinearExtractor, LinearHead
from lightning_immunize.module import ImmunizationModule
from lightning_immunize.objectives import ConditionNumberObjective


def module_for(width: int, mode: str) -> ImmunizationModule:
    torch.manual_seed(0)
    module = ImmunizationModule(
        LinearExtractor(width, width, seed=0).double(),
        LinearHead(width, 1, "binary").double(),
        ConditionNumberObjective(1.0, 1.0, preconditioner=mode),
    )
    module.manual_backward = lambda loss: loss.backward()
    return module


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(2, 24),
    width=st.integers(2, 16),
    log_scale=st.floats(-6.0, 6.0),
    rank_frac=st.floats(0.0, 1.0),
    repeated=st.booleans(),
    mode=st.sampled_from(["exact", "none", "ridge"]),
    seed=st.integers(0, 2**16),
)
def test_regularizer_step_stays_finite(batch, width, log_scale, rank_frac, repeated, mode, seed):
    """Features at scales 1e-6…1e6, rank-deficient batches, repeated / all-equal spectra."""
    gen = torch.Generator().manual_seed(seed)
    rank = max(1, round(rank_frac * min(batch, width)))
    x = {}
    for side in ("pretrain", "harmful"):
        if repeated:  # orthonormal rows: every non-zero singular value equal
            q, _ = torch.linalg.qr(
                torch.randn(
                    max(batch, width), max(batch, width), generator=gen, dtype=torch.float64
                )
            )
            x[side] = q[:batch, :width] * 10.0**log_scale
        else:
            x[side] = (
                torch.randn(batch, rank, generator=gen, dtype=torch.float64)
                @ torch.randn(rank, width, generator=gen, dtype=torch.float64)
                * 10.0**log_scale
            )
    if not all(v.abs().max() > 0 for v in x.values()):
        return
    module = module_for(width, mode)
    y = {
        "pretrain": torch.zeros(batch, dtype=torch.float64),
        "harmful": torch.ones(batch, dtype=torch.float64),
    }
    out = module.objective.backward(module, {s: (x[s], y[s]) for s in x})
    for p in module.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()
    for name, value in out.logs.items():
        assert math.isfinite(float(value)), name
