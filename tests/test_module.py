"""ImmunizationModule: Algorithm 1 steps on a linear and a tiny timm extractor."""

from __future__ import annotations

import math
from functools import partial

import lightning.pytorch as pl
import pytest
import torch
from support.helpers import fit, linear_module
from torch.utils.data import DataLoader, TensorDataset

from lightning_immunize.conditioning import feature_condition_number
from lightning_immunize.datamodules import PairedDataModule
from lightning_immunize.models import LinearExtractor, LinearHead, TimmBackbone
from lightning_immunize.module import ImmunizationModule
from lightning_immunize.objectives import ConditionNumberObjective, make_objective
from lightning_immunize.preconditioning import convert_linear_layers

F64 = torch.float64


def linear_batch(seed: int = 0, b: int = 32, d: int = 8):
    gen = torch.Generator().manual_seed(seed)
    x_p = torch.randn(b, d, generator=gen, dtype=F64) * torch.linspace(0.5, 3.0, d, dtype=F64)
    x_h = torch.randn(b, d, generator=gen, dtype=F64) * torch.linspace(3.0, 0.5, d, dtype=F64)
    y_p = torch.zeros(b, dtype=F64)
    return {"pretrain": (x_p, y_p), "harmful": (x_h, torch.ones(b, dtype=F64))}


def kappas(module, batch):
    with torch.no_grad():
        return [
            float(feature_condition_number(module.extractor(batch[s][0])))
            for s in ("pretrain", "harmful")
        ]


@pytest.mark.parametrize("mode", ["exact", "ridge", "none"])
def test_regularizer_steps_move_kappa_the_right_way(mode):
    batch = linear_batch()
    # regularizers only: λ large against a zero-lr head is not possible, so compare with λ = 0
    for lam_p, lam_h, side, sign in ((1.0, 0.0, 0, -1), (0.0, 1.0, 1, +1)):
        module = linear_module(ConditionNumberObjective(lam_p, lam_h, preconditioner=mode), lr=1e-3)
        if mode == "ridge":
            assert module.extractor.linear.ridge == 1e-3  # converted by the objective
            convert_linear_layers(module.extractor, ridge=1e-6)
        before = kappas(module, batch)
        baseline = linear_module(ConditionNumberObjective(0.0, 0.0, preconditioner=mode), lr=1e-3)
        fit(module, batch, 3)
        fit(baseline, batch, 3)
        after, plain = kappas(module, batch), kappas(baseline, batch)
        assert sign * (after[side] - plain[side]) > 0, (mode, side, before, after, plain)


def test_exact_step_adds_closed_form_gradient():
    batch = linear_batch(1)
    module = linear_module(ConditionNumberObjective(0.0, 2.0, preconditioner="exact"))
    module.trainer = None
    module.manual_backward = lambda loss: loss.backward()  # no trainer attached
    module.extractor.zero_grad()
    module.objective.backward(module, batch)
    got = module.extractor.linear.weight.grad.clone()
    # reference: task-loss gradient + 2·λ·θ∇_S R_max with S = ZᵀZ/B
    theta = module.extractor.theta.detach()
    module.extractor.zero_grad()
    module.task_loss(module.extractor(batch["pretrain"][0]), batch["pretrain"][1]).backward()
    task_grad = module.extractor.linear.weight.grad.clone()
    x_h = batch["harmful"][0]
    S = (x_h @ theta).T @ (x_h @ theta) / x_h.shape[0]
    from lightning_immunize.conditioning import spectral_gradient

    _, grad_S = spectral_gradient(S, "r_max", rank=8)
    expected = task_grad + (2 * 2.0 * theta @ grad_S).T
    assert torch.allclose(got, expected, rtol=1e-9, atol=1e-12)


def test_logs_and_optimizer_groups():
    batch = linear_batch(2)
    module = ImmunizationModule(
        LinearExtractor(8, 8, seed=0).double(),
        LinearHead(8, 1, "binary").double(),
        ConditionNumberObjective(1.0, 1.0),
        optimizer=partial(torch.optim.AdamW, lr=1e-3),
        head_lr=1e-2,
        extractor_weight_decay=0.0,
        head_weight_decay=2e-5,
        scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5),
        gradient_clip_val=1.0,
    )
    fit(module, batch, 2)
    logged = module.trainer.logged_metrics
    for key in ("task_loss", "r_min", "r_max", "kappa_pretrain", "kappa_harmful"):
        assert math.isfinite(float(logged[f"train/{key}"])), key
    groups = {g["name"]: g for g in module.trainer.optimizers[0].param_groups}
    assert groups["head"]["weight_decay"] == 2e-5 and groups["extractor"]["weight_decay"] == 0.0
    assert groups["head"]["lr"] == pytest.approx(1e-2 * 0.5**2)  # two epochs of one step each


def test_tiny_timm_model_step_runs_and_changes_trainable_blocks_only():
    torch.manual_seed(0)
    backbone = TimmBackbone("resnet18", pretrained=False, in_chans=1, trainable="last:1")
    head = backbone.make_head()
    module = ImmunizationModule(
        backbone,
        head,
        ConditionNumberObjective(1e-3, 10.0),
        optimizer=partial(torch.optim.SGD, lr=1e-3, momentum=0.9, nesterov=True),
        label_smoothing=0.1,
    )
    gen = torch.Generator().manual_seed(0)
    x_p, x_h = torch.randn(8, 1, 32, 32, generator=gen), torch.randn(8, 1, 32, 32, generator=gen)
    y = torch.randint(0, 5, (8,), generator=gen)
    frozen = {
        k: v.clone() for k, v in backbone.state_dict().items() if k.startswith("model.layer1")
    }
    trained = backbone.model.layer4[0].conv1.weight.clone()
    fit(module, {"pretrain": (x_p, y), "harmful": (x_h, y)}, 2)
    assert module.objective.mode_for(backbone) == "none"
    for k, v in backbone.state_dict().items():
        if k in frozen:
            assert torch.equal(v, frozen[k]), k
    assert not torch.equal(trained, backbone.model.layer4[0].conv1.weight)
    assert math.isfinite(float(module.trainer.logged_metrics["train/r_max"]))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lambda_harmful": -1.0}, "lambda_harmful must be a finite number ≥ 0, got -1.0"),
        ({"preconditioner": "inverse"}, "unknown preconditioner mode 'inverse'"),
        ({"rank_rule": "maybe"}, "unknown rank_rule 'maybe'"),
    ],
)
def test_bad_objective_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ConditionNumberObjective(**kwargs)


def test_unknown_method_and_exact_on_deep_net():
    with pytest.raises(ValueError, match="unknown method 'magic'"):
        make_objective("magic")
    assert make_objective("rmax_only", lambda_harmful=3.0).lambda_pretrain == 0.0
    objective = ConditionNumberObjective(preconditioner="exact")
    with pytest.raises(ValueError, match="needs a LinearExtractor"):
        objective.mode_for(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_single_sample_batch_is_refused():
    module = linear_module(ConditionNumberObjective())
    with pytest.raises(ValueError, match="harmful batch has 1 sample"):
        module.features(torch.randn(1, 8, dtype=F64), side="harmful")


def test_default_dataloader_sizes_work_with_paired_loader():
    batch = linear_batch(3, b=20)
    module = linear_module(ConditionNumberObjective())
    dm = PairedDataModule(
        TensorDataset(*batch["pretrain"]), TensorDataset(*batch["harmful"]), batch_size=8
    )
    assert isinstance(dm.train_dataloader().flattened[0], DataLoader)
    trainer = pl.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, dm)
    assert trainer.global_step == 3


@pytest.mark.parametrize("mode", ["exact", "none"])
def test_ema_covariance_runs_and_keeps_its_running_estimate(mode, tmp_path):
    batch = linear_batch(4)
    objective = ConditionNumberObjective(
        1.0, 1.0, preconditioner=mode, covariance="ema", ema_decay=0.5
    )
    module = linear_module(objective, lr=1e-3)
    module.manual_backward = lambda loss: loss.backward()
    module.objective.backward(module, batch)
    first = {k: v.clone() for k, v in objective.state_dict().items()}
    x_p = batch["pretrain"][0]
    with torch.no_grad():
        z = module.extractor(x_p)
    assert torch.allclose(first["running_pretrain"], z.T @ z / z.shape[0])  # step 1: the batch
    module.objective.backward(module, batch)
    second = objective.state_dict()["running_pretrain"]
    assert torch.allclose(second, 0.5 * first["running_pretrain"] + 0.5 * (z.T @ z) / z.shape[0])
    # the running estimate travels with the checkpoint
    checkpoint = {}
    module.on_save_checkpoint(checkpoint)
    fresh = linear_module(ConditionNumberObjective(covariance="ema"))
    fresh.on_load_checkpoint(checkpoint)
    assert torch.equal(fresh.objective.state_dict()["running_pretrain"], second)


def test_bad_covariance_estimator():
    with pytest.raises(ValueError, match="unknown covariance estimator 'mean'"):
        ConditionNumberObjective(covariance="mean")
    with pytest.raises(ValueError, match="ema_decay must be in"):
        ConditionNumberObjective(covariance="ema", ema_decay=1.0)


@pytest.mark.parametrize("side", ["pretrain", "harmful"])
def test_nan_inputs_are_named_with_step_and_dataset(side):
    batch = linear_batch(5)
    x = batch[side][0].clone()
    x[3, 2] = float("nan")
    batch[side] = (x, batch[side][1])
    module = linear_module(ConditionNumberObjective())
    with pytest.raises(
        ValueError,
        match=rf"non-finite inputs .*1 of 256 entries.* {side} dataset's batch at training step 0",
    ):
        fit(module, batch, 1)


def test_nan_loss_is_reported():
    batch = linear_batch(6)
    batch["pretrain"] = (batch["pretrain"][0], torch.full_like(batch["pretrain"][1], float("nan")))
    module = linear_module(ConditionNumberObjective(0.0, 0.0))
    with pytest.raises(ValueError, match="non-finite task loss .* training step 0"):
        fit(module, batch, 1)


def test_ridge_needs_linear_layers():
    extractor = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Tanh())
    with pytest.raises(ValueError, match="'ridge' needs nn.Linear layers.*Sequential"):
        ImmunizationModule(
            extractor,
            LinearHead(4, 1, "binary"),
            ConditionNumberObjective(preconditioner="ridge"),
        )


class _CountSteps(pl.Callback):
    steps = 0

    def on_train_batch_start(self, *args) -> None:
        _CountSteps.steps += 1


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("zero_harmful", "harmful dataset's first 8 training inputs are all zero: .*rank 0"),
        ("zero_pretrain", "pretrain dataset's first 8 training inputs are all zero"),
        ("nan_harmful", "non-finite inputs .* harmful dataset"),
        ("zero_features", "all-zero features: .*rank 0"),
    ],
)
def test_degenerate_data_is_refused_before_the_first_step(case, match):
    batch = linear_batch(3, b=20)
    (x_p, y_p), (x_h, y_h) = batch["pretrain"], batch["harmful"]
    if case == "zero_harmful":
        x_h = torch.zeros_like(x_h)
    elif case == "zero_pretrain":
        x_p = torch.zeros_like(x_p)
    elif case == "nan_harmful":
        x_h = x_h.clone()
        x_h[2, 3] = float("nan")
    module = linear_module(ConditionNumberObjective())
    if case == "zero_features":
        with torch.no_grad():
            module.extractor.linear.weight.zero_()
    dm = PairedDataModule(TensorDataset(x_p, y_p), TensorDataset(x_h, y_h), batch_size=8)
    trainer = pl.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[_CountSteps()],
    )
    _CountSteps.steps = 0
    with pytest.raises(ValueError, match=match):
        trainer.fit(module, dm)
    assert _CountSteps.steps == 0 and trainer.global_step == 0


@pytest.mark.parametrize("harmful_bn_stats", [False, True])
def test_harmful_forward_leaves_batchnorm_running_stats(harmful_bn_stats):
    backbone = TimmBackbone("test_resnet", in_chans=1, num_classes=3, seed=0)
    module = ImmunizationModule(backbone, harmful_bn_stats=harmful_bn_stats).train()
    bn = backbone.model.layer4[0].bn1
    x = torch.randn(4, 1, 28, 28)
    before = bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked)
    z = module.features(x, side="harmful")
    moved = not torch.equal(bn.running_mean, before[0])
    assert moved == harmful_bn_stats
    assert int(bn.num_batches_tracked) == before[2] + int(harmful_bn_stats)
    assert bn.momentum == 0.1  # restored
    z.square().sum().backward()  # autograd is intact
    assert backbone.model.layer4[0].conv1.weight.grad is not None
    # Same features either way: the forward normalises with the batch statistics.
    other = ImmunizationModule(
        TimmBackbone("test_resnet", in_chans=1, num_classes=3, seed=0),
        harmful_bn_stats=not harmful_bn_stats,
    ).train()
    assert torch.allclose(other.features(x, side="harmful"), z)
    module.features(x, side="pretrain")
    assert not torch.equal(bn.running_mean, before[0])
