"""Failures that used to pass silently: each is now an error, a warning, or fixed.

* ``opt`` with κ = inf: NaN gradients used to reach ``optimizer.step()`` (θ became NaN and the
  *next* step blamed the features); now the step is refused, naming the objective and term.
* ``R_max`` on a flat kept spectrum (rank 1 or all-equal) sits at its floor with a zero
  gradient; now it warns once per objective and side.
* ``ridge`` preconditioning used to forward ``D_P`` twice per step (BatchNorm statistics
  updated twice, different dropout masks); now one forward serves both gradients.
* the probing attackers used to report an all-zero feature matrix as trivially probeable.
"""

from __future__ import annotations

import math
import warnings
from functools import partial

import pytest
import torch
from support.helpers import fit
from torch import nn

from lightning_immunize.conditioning import feature_r_max, feature_r_min
from lightning_immunize.models import LinearExtractor, LinearHead
from lightning_immunize.module import ImmunizationModule
from lightning_immunize.objectives import (
    ConditionNumberObjective,
    ConditionNumberOptObjective,
    Objective,
    ObjectiveOutput,
)
from lightning_immunize.preconditioning import (
    input_covariance,
    preconditioning_enabled,
    ridge_solve,
)
from lightning_immunize.probing import (
    ATTACKERS,
    gd_exact_line_search,
    least_squares_solution,
    linear_probe_accuracy,
    run_attackers,
)

F64 = torch.float64


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# --------------------------------------------------------------------------------------------
# 5. non-finite regularizer terms / gradients are refused before optimizer.step()
# --------------------------------------------------------------------------------------------


def opt_with_infinite_kappa() -> tuple[ImmunizationModule, dict]:
    """``D_P`` spans input directions 3, 4 and ``D_H`` directions 1, 2 (both of input rank 2);
    θ is the identity with input direction 1 zeroed: ``S_H`` has rank 1 while the input-rank
    rule keeps 2 eigenvalues, so κ(S_H) = σ/0 = inf and log κ(S_H) = inf."""
    gen = torch.Generator().manual_seed(0)
    b, d = 8, 4
    x_p = torch.zeros(b, d, dtype=F64)
    x_p[:, 2:] = torch.randn(b, 2, generator=gen, dtype=F64)
    x_h = torch.zeros(b, d, dtype=F64)
    x_h[:, :2] = torch.randn(b, 2, generator=gen, dtype=F64)
    extractor = LinearExtractor(d, d, init="identity").double()
    with torch.no_grad():
        extractor.linear.weight[:, 0] = 0.0
    torch.manual_seed(0)
    module = ImmunizationModule(
        extractor,
        LinearHead(d, 1, "binary").double(),
        ConditionNumberOptObjective(lambda_pretrain=1.0, lambda_harmful=1.0),
        optimizer=partial(torch.optim.SGD, lr=0.1),
    )
    batch = {
        "pretrain": (x_p, torch.zeros(b, dtype=F64)),
        "harmful": (x_h, torch.ones(b, dtype=F64)),
    }
    return module, batch


def test_opt_with_infinite_kappa_is_refused_before_the_parameters_move():
    module, batch = opt_with_infinite_kappa()
    before = snapshot(module)
    with pytest.raises(
        ValueError, match=r"objective 'opt'.*log κ\(S_H\) = inf.*training step 0"
    ) as info:
        fit(module, batch, 1)
    assert "log κ(S_P)" not in str(info.value)  # only the bad term is named
    after = snapshot(module)
    for name, value in before.items():
        assert torch.isfinite(after[name]).all(), name
        assert torch.equal(after[name], value), name


class _BrokenObjective(Objective):
    """Finite loss; a term or a gradient that is not (the module must catch both)."""

    name = "broken"

    def __init__(self, what: str) -> None:
        self.what = what

    def backward(self, module, batch) -> ObjectiveOutput:
        z = module.features(batch["pretrain"][0])
        loss = module.task_loss(z, batch["pretrain"][1])
        module.manual_backward(loss)
        term = torch.tensor(1.0, dtype=F64)
        if self.what == "term":
            term = torch.tensor(math.nan, dtype=F64)
        else:
            module.extractor.linear.weight.grad[0, 1] = math.inf
        return ObjectiveOutput(loss=loss.detach(), logs={}, terms={"my term": term})


@pytest.mark.parametrize(
    ("what", "match"),
    [
        ("term", r"objective 'broken'.*my term = nan.*training step 0"),
        (
            "grad",
            r"objective 'broken'.*non-finite gradient.*1 of 16 entries.*extractor\.linear\.weight"
            r".*training step 0",
        ),
    ],
)
def test_non_finite_terms_and_gradients_are_refused(what, match):
    _, batch = opt_with_infinite_kappa()
    torch.manual_seed(0)
    module = ImmunizationModule(
        LinearExtractor(4, 4, seed=0).double(),
        LinearHead(4, 1, "binary").double(),
        _BrokenObjective(what),
    )
    before = snapshot(module)
    with pytest.raises(ValueError, match=match):
        fit(module, batch, 1)
    for name, value in before.items():
        assert torch.equal(module.state_dict()[name], value), name


def test_ours_reports_its_terms_by_name():
    module, batch = opt_with_infinite_kappa()
    module.objective = ConditionNumberObjective(1.0, 1.0)
    module.manual_backward = lambda loss: loss.backward()
    out = module.objective.backward(module, batch)
    assert set(out.terms) == {"r_min on pretrain", "r_max on harmful"}
    assert all(torch.isfinite(torch.as_tensor(v)) for v in out.terms.values())


# --------------------------------------------------------------------------------------------
# 7. R_max at its floor (flat kept spectrum) warns once per objective and side
# --------------------------------------------------------------------------------------------


def rank_one_harmful_batch(b: int = 12, d: int = 6) -> dict:
    gen = torch.Generator().manual_seed(1)
    x_p = torch.randn(b, d, generator=gen, dtype=F64)
    v = torch.randn(d, generator=gen, dtype=F64)
    x_h = torch.linspace(0.5, 2.0, b, dtype=F64)[:, None] * v  # identical up to scale: rank 1
    return {
        "pretrain": (x_p, torch.zeros(b, dtype=F64)),
        "harmful": (x_h, torch.ones(b, dtype=F64)),
    }


@pytest.mark.parametrize("covariance", ["batch", "ema"])
@pytest.mark.parametrize("mode", ["exact", "none", "ridge"])
def test_rmax_at_its_floor_warns_once(mode, covariance):
    torch.manual_seed(0)
    module = ImmunizationModule(
        LinearExtractor(6, 6, seed=0).double(),
        LinearHead(6, 1, "binary").double(),
        ConditionNumberObjective(1.0, 1.0, preconditioner=mode, covariance=covariance),
        optimizer=partial(torch.optim.SGD, lr=1e-3),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(module, rank_one_harmful_batch(), 2)
    flat = [w for w in caught if "R_max on the harmful batch" in str(w.message)]
    assert len(flat) == 1, [str(w.message) for w in caught]
    message = str(flat[0].message)
    assert "training step 0" in message and "zero gradient" in message


def test_rmax_on_a_spread_spectrum_does_not_warn():
    gen = torch.Generator().manual_seed(2)
    batch = rank_one_harmful_batch()
    batch["harmful"] = (torch.randn(12, 6, generator=gen, dtype=F64), batch["harmful"][1])
    torch.manual_seed(0)
    module = ImmunizationModule(
        LinearExtractor(6, 6, seed=0).double(),
        LinearHead(6, 1, "binary").double(),
        ConditionNumberObjective(1.0, 1.0),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(module, batch, 1)
    assert not [w for w in caught if "R_max on the" in str(w.message)]


# --------------------------------------------------------------------------------------------
# 8. ridge: one forward of each side per step
# --------------------------------------------------------------------------------------------


def two_sided_batch(b: int = 16, d: int = 6, seed: int = 3) -> dict:
    gen = torch.Generator().manual_seed(seed)
    x_p = torch.randn(b, d, generator=gen, dtype=F64) * torch.linspace(0.5, 3.0, d, dtype=F64)
    x_h = torch.randn(b, d, generator=gen, dtype=F64) * torch.linspace(3.0, 0.5, d, dtype=F64)
    return {
        "pretrain": (x_p, torch.zeros(b, dtype=F64)),
        "harmful": (x_h, torch.ones(b, dtype=F64)),
    }


def ridge_module(extractor: nn.Module, lam_p: float = 0.5, lam_h: float = 2.0, k: int = 6):
    torch.manual_seed(0)
    module = ImmunizationModule(
        extractor.double(),
        LinearHead(k, 1, "binary").double(),
        ConditionNumberObjective(lam_p, lam_h, preconditioner="ridge", ridge=1e-3),
    )
    module.manual_backward = lambda loss, *args, **kwargs: loss.backward(*args, **kwargs)
    return module


def test_ridge_forwards_each_side_once_per_step():
    module = ridge_module(LinearExtractor(6, 6, seed=0))
    calls = []
    module.extractor.register_forward_hook(lambda m, args, out: calls.append(args[0]))
    batch = two_sided_batch()
    module.objective.backward(module, batch)
    assert len(calls) == 2
    assert calls[0] is batch["pretrain"][0] and calls[1] is batch["harmful"][0]


def test_ridge_updates_batchnorm_running_stats_once_per_step():
    extractor = nn.Sequential(nn.BatchNorm1d(6), nn.Linear(6, 6))
    module = ridge_module(extractor).train()
    bn = extractor[0]
    batch = two_sided_batch()
    module.objective.backward(module, batch)
    assert int(bn.num_batches_tracked) == 1
    x_p = batch["pretrain"][0]
    expected_mean = 0.9 * torch.zeros(6, dtype=F64) + 0.1 * x_p.mean(0)
    assert torch.allclose(bn.running_mean, expected_mean, rtol=1e-12, atol=1e-15)
    module.objective.backward(module, batch)
    assert int(bn.num_batches_tracked) == 2


def test_ridge_gradient_is_plain_task_gradient_plus_preconditioned_regularizers():
    """Algorithm 1 with the ridge preconditioner, by hand for a linear extractor:
    ``∇_θ L + Σ_side λ·(Σ_side + ρI)⁻¹ ∇_θ R_side`` with ``Σ = XᵀX/B``."""
    module = ridge_module(LinearExtractor(6, 6, seed=0))
    batch = two_sided_batch()
    module.objective.backward(module, batch)
    got = {n: p.grad.clone() for n, p in module.named_parameters()}

    weight = module.extractor.linear.weight
    module.zero_grad()
    with preconditioning_enabled(module.extractor, enabled=False):
        module.task_loss(module.extractor(batch["pretrain"][0]), batch["pretrain"][1]).backward()
    expected = {n: p.grad.clone() for n, p in module.named_parameters()}
    theta = weight.detach().T.clone().requires_grad_(True)
    for side, reg, lam in (("pretrain", feature_r_min, 0.5), ("harmful", feature_r_max, 2.0)):
        x = batch[side][0]
        value = reg(x @ theta / math.sqrt(x.shape[0]), rank=6)
        (grad_theta,) = torch.autograd.grad(value, theta)
        pre = ridge_solve(input_covariance(x), grad_theta, 1e-3)
        expected["extractor.linear.weight"] += lam * pre.T
    for name, value in expected.items():
        assert torch.allclose(got[name], value, rtol=1e-10, atol=1e-10), name
    assert not torch.allclose(got["extractor.linear.weight"], weight.grad)  # it did precondition


def test_ridge_gradient_equals_the_two_forward_result_on_a_deep_extractor():
    """Hidden layer, biases, a non-linearity: the one-forward gradient equals the old
    two-forward one (task loss plain; each regularizer from a forward with the layers on)."""

    def mlp() -> nn.Module:
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 6))

    module = ridge_module(mlp())
    batch = two_sided_batch(seed=4)
    module.objective.backward(module, batch)
    got = {n: p.grad.clone() for n, p in module.named_parameters()}

    reference = ridge_module(mlp())
    reference.load_state_dict(module.state_dict())
    reference.zero_grad()
    extractor = reference.extractor
    reference.task_loss(extractor(batch["pretrain"][0]), batch["pretrain"][1]).backward()
    for side, reg, lam in (("pretrain", feature_r_min, 0.5), ("harmful", feature_r_max, 2.0)):
        x = batch[side][0]
        with preconditioning_enabled(extractor, enabled=True):
            z = extractor(x)
        (lam * reg(z / math.sqrt(x.shape[0]))).backward()
    for name, p in reference.named_parameters():
        assert torch.allclose(got[name], p.grad, rtol=1e-10, atol=1e-10), name


# --------------------------------------------------------------------------------------------
# 9. an all-zero feature matrix is refused by the probing attackers
# --------------------------------------------------------------------------------------------


ZERO = torch.zeros(10, 3, dtype=F64)
Y = torch.randn(10, generator=torch.Generator().manual_seed(0), dtype=F64)
DEAD = r"Z of shape \(10, 3\) is all zero.*dead extractor"


@pytest.mark.parametrize("name", sorted(ATTACKERS))
def test_every_attacker_refuses_all_zero_features(name):
    with pytest.raises(ValueError, match=DEAD):
        ATTACKERS[name](ZERO, Y, steps=5)


def test_entry_points_refuse_all_zero_features():
    with pytest.raises(ValueError, match=DEAD):
        gd_exact_line_search(ZERO, Y)
    with pytest.raises(ValueError, match=DEAD):
        run_attackers(ZERO, Y, steps=5)
    with pytest.raises(ValueError, match=DEAD):
        least_squares_solution(ZERO, Y)
    labels = torch.tensor([0, 1] * 5)
    Z = torch.randn(10, 3, dtype=F64)
    with pytest.raises(ValueError, match=r"Z_train of shape \(10, 3\) is all zero"):
        linear_probe_accuracy(ZERO, labels, Z, labels, 2, epochs=1)
    with pytest.raises(ValueError, match=r"Z_test of shape \(10, 3\) is all zero"):
        linear_probe_accuracy(Z, labels, ZERO, labels, 2, epochs=1)
