"""Attacker-aware objectives (``sophon``, ``tar``): their maths against direct formulas.

- ``inner_steps=0``: the terms and the gradient are those of the outer losses on the
  unadapted features (autograd of a direct formula, and central finite differences);
- ``inner_steps ≥ 1``: the gradient is the first-order MAML one, ``∇_{θ_K} L_outer`` at the
  adapted parameters (SGD and Adam attackers, TAR's trajectory average), not the exact one;
- the module head gets the D_P task gradient only, frozen parameters none, and the module's
  BatchNorm statistics move with the D_P forward only;
- same seed, same attacks and gradients (also across a state_dict round trip); bad arguments,
  labels and batches are refused by name; a few Trainer steps on a tiny timm model.
"""

from __future__ import annotations

import copy
import math
from functools import partial

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from support.helpers import image_batch, tiny_timm_module
from support.helpers import linear_module as shared_linear_module
from torch.utils.data import TensorDataset

from lightning_immunize.datamodules import PairedDataModule
from lightning_immunize.models import LinearExtractor, LinearHead, TimmBackbone
from lightning_immunize.module import ImmunizationModule
from lightning_immunize.objectives import (
    OBJECTIVES,
    AttackerAwareConditionNumberObjective,
    ConditionNumberObjective,
    SimulatedAttackObjective,
    TamperResistanceObjective,
    make_objective,
)

F64 = torch.float64
D, K, CLASSES, B = 5, 4, 3, 10


# The module's own optimizer; weights drawn in float64; training_step without a Trainer.
linear_module = partial(
    shared_linear_module, d=D, k=K, task="multiclass", classes=CLASSES, lr=None,
    float64_init=True, backward_outside_trainer=True,
)  # fmt: skip


def linear_batch(task: str = "multiclass", seed: int = 1, b: int = B):
    gen = torch.Generator().manual_seed(seed)
    classes = CLASSES if task == "multiclass" else 2

    def labels():
        y = torch.randint(0, classes, (b,), generator=gen)
        return y if task == "multiclass" else y.to(F64)

    return {
        side: (torch.randn(b, D, generator=gen, dtype=F64), labels())
        for side in ("pretrain", "harmful")
    }


# -- direct formulas ---------------------------------------------------------------------------


def logits(z, weight, bias, task):
    out = z @ weight.T + bias
    return out if task == "multiclass" else out.squeeze(-1)


def probs(out, task):
    if task == "multiclass":
        return out.softmax(-1)
    p1 = torch.sigmoid(out)
    return torch.stack([1 - p1, p1], dim=-1)


def ce(out, y, task):
    if task == "multiclass":
        return F.cross_entropy(out, y.long())
    return F.binary_cross_entropy_with_logits(out, y.to(out.dtype))


def outer(kind, out, y, task):
    """The outer losses written naively from their definitions."""
    p = probs(out, task)
    c = p.shape[-1]
    if kind == "kl_uniform":  # KL(U || p)
        u = torch.full_like(p, 1.0 / c)
        return (u * (u.log() - p.log())).sum(-1).mean()
    if kind == "inverse_ce":  # -log(1 - p_y)
        p_y = p.gather(-1, y.long().unsqueeze(-1)).squeeze(-1)
        return -(1 - p_y).log().mean()
    return (p * p.log()).sum(-1).mean()  # negative entropy


def sgd_or_adam_attack(theta, head, x, y, task, steps, lr, optimizer, create_graph=False):
    """The attacker by hand: ``steps`` SGD or Adam steps (from fresh state) of
    ``(θ, W, b)`` on ``CE(W·(xθᵀ) + b, y)``; returns the trajectory ``[(θ_k, W_k, b_k)]``."""
    params = [theta, *(leaf(t) for t in head)]  # the attacker trains the fresh head too
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    trajectory = []
    for t in range(1, steps + 1):
        loss = ce(logits(x @ params[0].T, params[1], params[2], task), y, task)
        grads = torch.autograd.grad(loss, params, create_graph=create_graph)
        if optimizer == "sgd":
            params = [p - lr * g for p, g in zip(params, grads, strict=True)]
        else:  # torch.optim.Adam's update, betas (0.9, 0.999), eps 1e-8
            m = [0.9 * mi + 0.1 * g for mi, g in zip(m, grads, strict=True)]
            v = [0.999 * vi + 0.001 * g * g for vi, g in zip(v, grads, strict=True)]
            params = [
                p - lr * (mi / (1 - 0.9**t)) / ((vi / (1 - 0.999**t)).sqrt() + 1e-8)
                for p, mi, vi in zip(params, m, v, strict=True)
            ]
        trajectory.append(params)
    return trajectory


def leaf(t):
    return t.detach().clone().requires_grad_(True)


# -- inner_steps = 0 ---------------------------------------------------------------------------

ZERO_STEP_CASES = [
    ("sophon", "kl_uniform", "multiclass"),
    ("sophon", "inverse_ce", "multiclass"),
    ("sophon", "kl_uniform", "binary"),
    ("sophon", "inverse_ce", "binary"),
    ("tar", "negative_entropy", "multiclass"),
    ("tar", "negative_entropy", "binary"),
]


def zero_step_objective(method, kind):
    if method == "sophon":
        return SimulatedAttackObjective(
            lambda_harmful=0.7, lambda_pretrain_finetune=0.3, inner_steps=0, outer_loss=kind
        )
    return TamperResistanceObjective(lambda_harmful=0.7, lambda_retain=0.6, inner_steps=0)


def zero_step_total(module, objective, batch, weight, task):
    """``L_P + λ_H·outer(φ_0^H, f_θ(X_H_out)) + λ_PF·CE(φ_0^P, f_θ(X_P_out))`` (sophon) or
    ``λ_R·L_P + λ_H·(−H)`` (tar) by hand, as a function of the extractor weight; and terms."""
    (x_p, y_p), (x_h, y_h) = batch["pretrain"], batch["harmful"]
    heads = objective.last_attack.heads
    h = B // 2
    head = module.head.linear
    task_loss = ce(logits(x_p @ weight.T, head.weight, head.bias, task), y_p, task)
    kind = getattr(objective, "outer_loss", "negative_entropy")
    harmful = outer(kind, logits(x_h[h:] @ weight.T, *heads["harmful"], task), y_h[h:], task)
    if objective.name == "tar":
        return objective.lambda_retain * task_loss + 0.7 * harmful, task_loss, [harmful]
    finetune = ce(logits(x_p[h:] @ weight.T, *heads["pretrain"], task), y_p[h:], task)
    return task_loss + 0.7 * harmful + 0.3 * finetune, task_loss, [harmful, finetune]


@pytest.mark.parametrize(("method", "kind", "task"), ZERO_STEP_CASES)
def test_zero_steps_is_the_outer_loss_on_unadapted_features(method, kind, task):
    objective = zero_step_objective(method, kind)
    module = linear_module(objective, task=task)
    batch = linear_batch(task)
    out = objective.backward(module, batch)
    weight = module.extractor.linear.weight

    w = leaf(weight)
    total, task_loss, terms = zero_step_total(module, objective, batch, w, task)
    assert torch.allclose(out.loss, task_loss, rtol=1e-12, atol=0)
    assert len(out.terms) == len(terms)
    for got, want in zip(out.terms.values(), terms, strict=True):
        assert torch.allclose(torch.as_tensor(got), want, rtol=1e-12, atol=1e-15)
    (want_grad,) = torch.autograd.grad(total, w)
    assert torch.allclose(weight.grad, want_grad, rtol=1e-10, atol=1e-13)
    assert weight.grad.abs().sum() > 0

    # Central finite differences of the direct formula along random directions.
    gen = torch.Generator().manual_seed(5)
    eps = 1e-6
    for _ in range(3):
        e = torch.randn(weight.shape, generator=gen, dtype=F64)
        with torch.no_grad():
            plus = zero_step_total(module, objective, batch, weight + eps * e, task)[0]
            minus = zero_step_total(module, objective, batch, weight - eps * e, task)[0]
        fd = (plus - minus) / (2 * eps)
        assert float(fd) == pytest.approx(float((weight.grad * e).sum()), rel=1e-6, abs=1e-9)


# -- inner_steps ≥ 1: first-order MAML -----------------------------------------------------------

FIRST_ORDER_CASES = [
    # method, outer kind, inner steps, optimizer, average trajectory (tar)
    ("sophon", "kl_uniform", 1, "sgd", None),
    ("sophon", "inverse_ce", 1, "sgd", None),
    ("sophon", "kl_uniform", 2, "adam", None),
    ("tar", "negative_entropy", 1, "sgd", True),
    ("tar", "negative_entropy", 3, "sgd", True),
    ("tar", "negative_entropy", 3, "adam", False),
]


@pytest.mark.parametrize(("method", "kind", "steps", "optimizer", "average"), FIRST_ORDER_CASES)
def test_attack_steps_give_the_first_order_maml_gradient(method, kind, steps, optimizer, average):
    lr = 0.5 if optimizer == "sgd" else 0.05
    common = {"inner_steps": steps, "inner_lrs": (lr, lr), "inner_optimizers": [optimizer]}
    if method == "sophon":
        objective = SimulatedAttackObjective(
            lambda_harmful=0.7, lambda_pretrain_finetune=0.3, outer_loss=kind, **common
        )
    else:
        objective = TamperResistanceObjective(
            lambda_harmful=0.7, lambda_retain=0.6, average_trajectory=average, **common
        )
    module = linear_module(objective)
    batch = linear_batch()
    out = objective.backward(module, batch)
    attack = objective.last_attack
    assert (attack.optimizer, attack.lr) == (optimizer, lr)

    weight = module.extractor.linear.weight
    (x_p, y_p), (x_h, y_h) = batch["pretrain"], batch["harmful"]
    h, task = B // 2, "multiclass"
    head = module.head.linear

    def attacked(x, y, side, second_order):
        theta = leaf(weight)
        trajectory = sgd_or_adam_attack(
            theta, attack.heads[side], x[:h], y[:h], task, steps, lr, optimizer, second_order
        )
        return theta, trajectory

    w = leaf(weight)
    task_loss = ce(logits(x_p @ w.T, head.weight, head.bias, task), y_p, task)
    lam_p = 1.0 if method == "sophon" else 0.6
    (expected,) = torch.autograd.grad(lam_p * task_loss, w)
    exact = expected.clone()
    # Trajectory points the outer loss is taken at (TAR averages over all K of them).
    points = range(steps) if method == "tar" and average else [steps - 1]
    sides = [("harmful", kind, 0.7)]
    if method == "sophon":
        sides.append(("pretrain", "ce", 0.3))
    for (side, loss_kind, lam), term in zip(sides, out.terms.values(), strict=True):
        x, y = (x_h, y_h) if side == "harmful" else (x_p, y_p)

        def loss_at(theta, weight_k, bias_k, x=x, y=y, loss_kind=loss_kind):
            out_k = logits(x[h:] @ theta.T, weight_k, bias_k, task)
            if loss_kind == "ce":
                return ce(out_k, y[h:], task)
            return outer(loss_kind, out_k, y[h:], task)

        _, trajectory = attacked(x, y, side, second_order=False)
        theta_exact, trajectory_exact = attacked(x, y, side, second_order=True)
        values = []
        for k in points:
            theta_k, w_k, b_k = (leaf(t) for t in trajectory[k])
            values.append(loss_at(theta_k, w_k.detach(), b_k.detach()))
            (g,) = torch.autograd.grad(values[-1], theta_k)  # first order: ∇ at θ_k
            expected += lam / len(points) * g
            loss_exact = loss_at(*trajectory_exact[k])  # through the attack: second order
            exact += (
                lam
                / len(points)
                * torch.autograd.grad(loss_exact, theta_exact, retain_graph=True)[0]
            )
        mean = torch.stack(values).mean()
        assert torch.allclose(torch.as_tensor(term), mean, rtol=1e-10), side
    assert torch.allclose(weight.grad, expected, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(weight.grad, exact, rtol=1e-4, atol=1e-8)  # first order only


# -- what gets a gradient ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "objective",
    [
        SimulatedAttackObjective(inner_steps=2, inner_optimizers="adam", seed=1),
        TamperResistanceObjective(lambda_retain=0.5, inner_steps=2, seed=1),
    ],
    ids=["sophon", "tar"],
)
def test_head_gets_the_task_gradient_only_and_frozen_parameters_none(objective):
    module = tiny_timm_module(objective)
    reference = copy.deepcopy(module)
    batch = image_batch()
    objective.backward(module, batch)

    x_p, y_p = batch["pretrain"]
    task_loss = reference.task_loss(reference.features(x_p), y_p)
    scale = getattr(objective, "lambda_retain", 1.0)
    (scale * task_loss).backward()
    for (name, p), ref in zip(
        module.head.named_parameters(), reference.head.parameters(), strict=True
    ):
        assert torch.allclose(p.grad, ref.grad, rtol=1e-5, atol=1e-7), name
    params = dict(module.extractor.named_parameters())
    for name, p in params.items():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        else:
            assert p.grad is None, name
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())
    # The extractor gradient differs from the task loss's alone: the attack terms reach it.
    ref_grads = dict(reference.extractor.named_parameters())
    assert any(
        not torch.allclose(p.grad, ref_grads[n].grad)
        for n, p in params.items()
        if p.grad is not None
    )
    # The module's BatchNorm statistics moved with the D_P forward only (as the reference's).
    for (name, buf), ref in zip(
        module.extractor.named_buffers(), reference.extractor.buffers(), strict=True
    ):
        assert torch.equal(buf, ref), name


# -- reproducibility and arguments ---------------------------------------------------------------


@pytest.mark.parametrize("cls", [SimulatedAttackObjective, TamperResistanceObjective])
def test_same_seed_gives_identical_gradients(cls):
    def gradients(seed, steps=2):
        objective = cls(inner_steps=2, seed=seed, inner_optimizers=("sgd", "momentum", "adam"))
        module = linear_module(objective)
        grads = []
        for i in range(steps):
            module.zero_grad()
            objective.backward(module, linear_batch(seed=i))
            grads.append(module.extractor.linear.weight.grad.clone())
        return grads, objective

    first, objective = gradients(3)
    second, _ = gradients(3)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    other, _ = gradients(4)
    assert not torch.equal(first[0], other[0])
    assert not torch.equal(first[0], first[1])  # a new attack (and batch) every step

    # Resuming from the objective's state draws the attacks that would have come next.
    fresh = cls(inner_steps=2, seed=3)
    state = fresh.state_dict()
    module = linear_module(fresh)
    fresh.backward(module, linear_batch())
    drawn = fresh.last_attack
    resumed = cls(inner_steps=2, seed=99)
    resumed.load_state_dict(state)
    resumed.backward(linear_module(resumed), linear_batch())
    assert resumed.last_attack.lr == drawn.lr
    assert torch.equal(resumed.last_attack.heads["harmful"][0], drawn.heads["harmful"][0])


@pytest.mark.parametrize(
    ("cls", "kwargs", "message"),
    [
        (SimulatedAttackObjective, {"lambda_harmful": -1.0}, r"lambda_harmful .* got -1\.0"),
        (
            SimulatedAttackObjective,
            {"lambda_pretrain_finetune": math.nan},
            r"lambda_pretrain_finetune .* got nan",
        ),
        (TamperResistanceObjective, {"lambda_retain": "1"}, r"lambda_retain .* got '1'"),
        (SimulatedAttackObjective, {"inner_steps": -1}, r"inner_steps must be an integer ≥ 0"),
        (TamperResistanceObjective, {"inner_steps": 1.5}, r"inner_steps .* got 1\.5"),
        (SimulatedAttackObjective, {"inner_lrs": (0.1, 0.01)}, r"inner_lrs .* low ≤ high"),
        (SimulatedAttackObjective, {"inner_lrs": (0.0, 0.1)}, r"inner_lrs .* 0 < low"),
        (TamperResistanceObjective, {"inner_lrs": 0.1}, r"inner_lrs must be a pair .* got 0\.1"),
        (
            SimulatedAttackObjective,
            {"inner_optimizers": ("sgd", "lbfgs")},
            r"inner_optimizers .* \(unknown: \['lbfgs'\]\)",
        ),
        (TamperResistanceObjective, {"inner_optimizers": []}, r"inner_optimizers .* non-empty"),
        (SimulatedAttackObjective, {"outer_loss": "mse"}, r"outer_loss 'mse'.*kl_uniform"),
        (SimulatedAttackObjective, {"seed": -2}, r"seed must be an integer ≥ 0, got -2"),
        (TamperResistanceObjective, {"num_classes_harmful": 1}, r"num_classes_harmful .* ≥ 2"),
        (TamperResistanceObjective, {"average_trajectory": 1}, r"average_trajectory .* got 1"),
    ],
)
def test_bad_arguments_are_refused_by_name(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)


def test_registered_by_name():
    assert {"sophon", "tar"} <= set(OBJECTIVES)
    sophon = make_objective("sophon", inner_steps=1, outer_loss="inverse_ce")
    assert isinstance(sophon, SimulatedAttackObjective) and sophon.name == "sophon"
    assert sophon.inner_steps == 1 and sophon.outer_loss == "inverse_ce"
    module = ImmunizationModule(LinearExtractor(D, K), LinearHead(K, 2, "multiclass"), method="tar")
    assert isinstance(module.objective, TamperResistanceObjective)
    assert module.objective.hyperparameters()["inner_optimizers"] == ("sgd", "adam")
    with pytest.raises(TypeError, match="outer_loss"):
        make_objective("tar", outer_loss="kl_uniform")


def test_bad_heads_labels_and_batches_are_refused():
    with pytest.raises(ValueError, match="regression head; set num_classes_harmful"):
        ImmunizationModule(LinearExtractor(D, K), LinearHead(K, 1, "regression"), method="tar")
    # With the D_H classes given, a regression D_P works (its fine-tuning term is an MSE).
    regression = ImmunizationModule(
        LinearExtractor(D, K, dtype=F64),
        LinearHead(K, 1, "regression").double(),
        method="sophon",
        method_args={"num_classes_harmful": 3, "inner_steps": 1},
    )
    regression.manual_backward = lambda loss: loss.backward()
    batch = linear_batch()
    batch["pretrain"] = (batch["pretrain"][0], torch.randn(B, dtype=F64))
    out = regression.objective.backward(regression, batch)
    assert all(math.isfinite(float(v)) for v in out.terms.values())

    module = linear_module(SimulatedAttackObjective(inner_steps=1))
    bad = linear_batch()
    bad["harmful"] = (bad["harmful"][0], torch.full((B,), CLASSES))
    with pytest.raises(ValueError, match=r"harmful batch .* labels \[3\] .* \[0, 3\)"):
        module.objective.backward(module, bad)
    small = linear_batch(b=3)
    with pytest.raises(ValueError, match="has 3 samples; a simulated attack needs at least 4"):
        module.objective.backward(module, small)


# -- ours, attacker-aware ------------------------------------------------------------------------


def _gradients(objective, batch):
    module = linear_module(objective)
    module.zero_grad()
    out = objective.backward(module, batch)
    return [p.grad.clone() for p in module.parameters()], out


@pytest.mark.parametrize("preconditioner", ["exact", "none"])
def test_ours_sa_without_the_attack_is_ours(preconditioner):
    settings = {"lambda_pretrain": 0.3, "lambda_harmful": 2.0, "preconditioner": preconditioner}
    batch = linear_batch(b=12)
    ours, ours_out = _gradients(ConditionNumberObjective(**settings), batch)
    both, both_out = _gradients(
        AttackerAwareConditionNumberObjective(
            **settings, lambda_attack=0.0, lambda_pretrain_finetune=0.0
        ),
        batch,
    )
    assert all(torch.equal(a, b) for a, b in zip(ours, both, strict=True))
    assert both_out.terms.keys() == ours_out.terms.keys()


@pytest.mark.parametrize("steps", [0, 2])
def test_ours_sa_adds_the_simulated_attack_terms_to_ours(steps):
    attack = {"inner_steps": steps, "seed": 5, "outer_loss": "inverse_ce"}
    batch = linear_batch(b=12)
    ours_settings = {"lambda_pretrain": 0.3, "lambda_harmful": 2.0, "preconditioner": "none"}
    ours, _ = _gradients(ConditionNumberObjective(**ours_settings), batch)
    sophon, _ = _gradients(SimulatedAttackObjective(lambda_harmful=0.7, **attack), batch)
    plain, _ = _gradients(
        SimulatedAttackObjective(lambda_harmful=0.0, lambda_pretrain_finetune=0.0), batch
    )  # the task loss alone
    both, out = _gradients(
        AttackerAwareConditionNumberObjective(**ours_settings, lambda_attack=0.7, **attack),
        batch,
    )
    # ours + sophon − the task loss counted twice
    for g_both, g_ours, g_sophon, g_plain in zip(both, ours, sophon, plain, strict=True):
        torch.testing.assert_close(g_both, g_ours + g_sophon - g_plain, rtol=1e-10, atol=1e-12)
    assert {"r_min on pretrain", "r_max on harmful"} <= set(out.terms)
    assert "harmful inverse_ce after the simulated attack" in out.terms
    assert "harmful_accuracy_after_attack" in out.logs and "kappa_harmful" in out.logs


def test_ours_sa_is_registered_and_keeps_its_attack_state():
    objective = make_objective("ours_sa", lambda_attack=2.0, inner_steps=1, seed=4)
    assert isinstance(objective, AttackerAwareConditionNumberObjective)
    settings = objective.hyperparameters()
    assert settings["lambda_attack"] == 2.0 and settings["lambda_harmful"] == 1.0
    assert settings["inner_steps"] == 1 and "lambda_pretrain_finetune" in settings
    state = objective.state_dict()
    module = linear_module(objective)
    objective.backward(module, linear_batch())
    resumed = make_objective("ours_sa", inner_steps=1, seed=99)
    resumed.load_state_dict(state)
    resumed.backward(linear_module(resumed), linear_batch())
    assert resumed.last_attack.lr == objective.last_attack.lr
    with pytest.raises(ValueError, match=r"lambda_harmful .* got -1"):
        make_objective("ours_sa", lambda_harmful=-1)
    with pytest.raises(ValueError, match=r"lambda_harmful .* got -2"):  # λ_A is SOPHON's λ_H
        make_objective("ours_sa", lambda_attack=-2)


# -- end to end --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "method_args"),
    [
        ("sophon", {"inner_steps": 2, "outer_loss": "inverse_ce"}),
        ("tar", {"inner_steps": 2, "inner_optimizers": ["adamw", "momentum"]}),
        ("ours_sa", {"inner_steps": 1, "lambda_harmful": 10.0}),
        ("ours_kfac", {"lambda_pretrain": 0.1, "lambda_harmful": 1.0}),  # every-layer objectives
        ("erasure", {"lambda_harmful": 1.0}),
    ],
)
def test_a_few_trainer_steps_on_a_tiny_timm_model(method, method_args):
    torch.manual_seed(0)
    backbone = TimmBackbone("test_resnet", in_chans=1, num_classes=5, seed=0, trainable=["layer4"])
    module = ImmunizationModule(backbone, None, method=method, method_args=method_args)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    gen = torch.Generator().manual_seed(0)
    data = [
        TensorDataset(torch.randn(24, 1, 16, 16, generator=gen), torch.randint(0, 5, (24,)))
        for _ in range(2)
    ]
    dm = PairedDataModule(*data, batch_size=8, task="multiclass", num_classes=5, seed=0)
    trainer = pl.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, dm)
    assert trainer.global_step == 3
    changed = set()
    for name, p in module.named_parameters():
        assert torch.isfinite(p).all(), name
        if not torch.equal(p, before[name]):
            changed.add(name)
        if not p.requires_grad:
            assert name not in changed, name
    assert any(n.startswith("extractor.model.layer4") for n in changed)
    assert {"head.linear.weight", "head.linear.bias"} <= changed
    logged = trainer.logged_metrics
    simulated = ["harmful_accuracy_after_attack", "harmful_ce_after_attack"]
    outer = {
        "sophon": [*simulated, "harmful_inverse_ce"],
        "tar": [*simulated, "harmful_negative_entropy"],
        "ours_sa": [*simulated, "harmful_kl_uniform", "r_max", "r_min", "kappa_harmful"],
        "ours_kfac": ["r_max", "r_min", "mean_log_kappa_harmful"],
        "erasure": ["erasure", "r2_layer4_batch", "r2_head_running"],
    }[method]
    outer = ["task_loss", *outer]
    for key in outer:
        assert math.isfinite(float(logged[f"train/{key}"])), key
