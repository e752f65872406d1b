"""The paper's deep configs in our units (docs/reference-units.md).

The reference code forms ``S = ZᵀZ`` summed over the batch; we use the batch mean
``S = ZᵀZ/B``. Under ``S → c·S``, ``R_min`` scales as ``c²`` and ``R_max`` as ``1/c²``, so the
reference's ``λ_P, λ_H`` become ``λ_P·B²`` and ``λ_H/B²`` here. These tests pin that identity,
the converted numbers in the four paper configs, and their trainable blocks.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from lightning_immunize.conditioning import feature_r_max, feature_r_min, r_max, r_min
from lightning_immunize.models import TimmBackbone
from lightning_immunize.module import ImmunizationModule
from lightning_immunize.objectives import ConditionNumberObjective

REPO = Path(__file__).resolve().parents[1]

#: The reference code's (λ_P, λ_H), in its units (S = ZᵀZ summed over the batch), and the
#: paper's batch size, for each of our paper configs.
REFERENCE = {
    "resnet18_cars": (1.0e-4, 2.0e6, 64),
    "resnet18_country211": (1.0e-4, 2.0e6, 64),
    "vit_cars": (3.0e-6, 3.0e8, 64),
    "vit_country211": (1.0e-6, 1.0e8, 32),
}
RESNET_TRAINABLE = ["layer4"]
VIT_TRAINABLE = {"blocks.11", "norm_pre", "norm"} | {
    f"blocks.{i}.{norm}" for i in range(11) for norm in ("norm1", "norm2")
}


def _config(name: str) -> dict:
    return yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ----------------------------------------------------------------------------- the identity


@pytest.mark.parametrize(("B", "K"), [(64, 32), (16, 40)], ids=["covariance", "gram"])
def test_converted_lambdas_give_the_reference_objective(B: int, K: int) -> None:
    """λ_P·B²·R_min(ZᵀZ/B) + λ_H/B²·R_max(ZᵀZ/B) == λ_P·R_min(ZᵀZ) + λ_H·R_max(ZᵀZ),
    value and gradient w.r.t. both feature batches (B < K exercises the Gram route)."""
    g = torch.Generator().manual_seed(0)
    lam_p, lam_h = 1.0e-4, 2.0e6
    ours_p, ours_h = lam_p * B**2, lam_h / B**2

    def total(zp, zh, scale, lp, lh):
        return lp * feature_r_min(zp * scale) + lh * feature_r_max(zh * scale)

    zp = torch.randn(B, K, generator=g, dtype=torch.float64).requires_grad_()
    zh = torch.randn(B, K, generator=g, dtype=torch.float64) * torch.linspace(0.5, 2, K)
    zh.requires_grad_()
    ref = total(zp, zh, 1.0, lam_p, lam_h)
    ref_grads = torch.autograd.grad(ref, (zp, zh))
    ours = total(zp, zh, 1.0 / math.sqrt(B), ours_p, ours_h)
    our_grads = torch.autograd.grad(ours, (zp, zh))

    assert float(ref.detach()) > 0
    assert float(ours.detach()) == pytest.approx(float(ref.detach()), rel=1e-9)
    for mine, theirs in zip(our_grads, ref_grads, strict=True):
        assert float(theirs.norm()) > 0
        assert _rel_err(mine, theirs) < 1e-9

    # Each term on its own, on explicit matrices: R_min(S/B)·B² = R_min(S), R_max(S/B)/B² = …
    S_p, S_h = zp.detach().mT @ zp.detach(), zh.detach().mT @ zh.detach()
    assert float(r_min(S_p / B)) * B**2 == pytest.approx(float(r_min(S_p)), rel=1e-9)
    assert float(r_max(S_h / B)) / B**2 == pytest.approx(float(r_max(S_h)), rel=1e-9)


def test_objective_regularizer_uses_the_batch_mean_covariance() -> None:
    """The conversion assumes ConditionNumberObjective sees S = ZᵀZ/B (not ZᵀZ)."""
    g = torch.Generator().manual_seed(1)
    B, K = 64, 32
    z = torch.randn(B, K, generator=g, dtype=torch.float64)
    objective = ConditionNumberObjective()
    for kind, ref, power in (("r_min", feature_r_min, 2), ("r_max", feature_r_max, -2)):
        value = objective._regularizer(kind, z, None, "pretrain")
        assert float(value) * B**power == pytest.approx(float(ref(z)), rel=1e-9)


# ----------------------------------------------------------------------------- the configs


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_paper_config_lambdas_are_in_our_units(name: str) -> None:
    ref_p, ref_h, paper_batch = REFERENCE[name]
    cfg = _config(name)
    B = cfg["data"]["init_args"]["batch_size"]
    assert B == paper_batch
    lambdas = cfg["model"]["objective"]["init_args"]
    assert lambdas["lambda_pretrain"] == pytest.approx(ref_p * B**2, rel=1e-12)
    assert lambdas["lambda_harmful"] == pytest.approx(ref_h / B**2, rel=1e-12)
    trainable = cfg["model"]["extractor"]["init_args"]["trainable"]
    if name.startswith("resnet18"):
        assert trainable == RESNET_TRAINABLE
    else:
        assert len(trainable) == len(VIT_TRAINABLE) and set(trainable) == VIT_TRAINABLE
    assert cfg["model"]["head"] is None  # the timm model's own classifier, trained


def _trainable_names(name: str) -> tuple[TimmBackbone, set[str]]:
    """Build the config's module with pretrained=False; names of what its optimizer updates."""
    cfg = _config(name)
    init_args = dict(cfg["model"]["extractor"]["init_args"], pretrained=False)
    extractor = TimmBackbone(**init_args)
    module = ImmunizationModule(
        extractor=extractor,
        head=None,
        objective=ConditionNumberObjective(**cfg["model"]["objective"]["init_args"]),
        optimizer=lambda groups: torch.optim.SGD(groups, lr=1e-5, momentum=0.9, nesterov=True),
    )
    optimizer = module.configure_optimizers()
    updated = {id(p) for group in optimizer.param_groups for p in group["params"]}
    names = {n for n, p in module.named_parameters() if id(p) in updated}
    assert names == {n for n, p in module.named_parameters() if p.requires_grad}
    return extractor, names


def test_resnet18_config_trains_layer4_and_the_classifier() -> None:
    extractor, names = _trainable_names("resnet18_cars")
    model = extractor.model
    expected = {
        f"extractor.model.{n}" for n, _ in model.named_parameters() if n.startswith("layer4.")
    }
    expected |= {"head.linear.weight", "head.linear.bias"}  # a copy of timm's fc (make_head)
    assert names == expected
    assert extractor.trainable_parameter_names() == [
        n for n, _ in model.named_parameters() if n.startswith("layer4.")
    ]


def test_vit_config_trains_the_last_block_every_norm_and_the_head() -> None:
    extractor, names = _trainable_names("vit_cars")
    model = extractor.model
    norm_params = {
        f"{m_name}.{p_name}"
        for m_name, m in model.named_modules()
        if isinstance(m, nn.LayerNorm)
        for p_name, _ in m.named_parameters(recurse=False)
    }
    last_block = {n for n, _ in model.named_parameters() if n.startswith("blocks.11.")}
    assert {"norm_pre.weight", "norm.weight", "blocks.0.norm1.weight"} <= norm_params
    expected = {f"extractor.model.{n}" for n in norm_params | last_block}
    expected |= {"head.linear.weight", "head.linear.bias"}  # a copy of timm's head (make_head)
    assert names == expected
    assert not any(".attn." in n or ".mlp." in n for n in names if "blocks.11." not in n)
