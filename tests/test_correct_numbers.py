"""Reported figures against independent NumPy recomputations: the numerical-rank rule on
float32 data, the identity reference when K < rank(X), κ(Σ) from singular values, and the
undefined RIR (inf/inf)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_immunize.conditioning import condition_number, data_rank
from lightning_immunize.metrics import RelativeImmunizationRatio, linear_immunization_ratios

REPO = Path(__file__).resolve().parents[1]
MNIST = REPO.parent / "shared" / "data" / "MNIST"
F64 = torch.float64
EPS64 = np.finfo(np.float64).eps
needs_mnist = pytest.mark.skipif(
    not (MNIST / "raw").is_dir(), reason=f"MNIST test split not found under {MNIST}"
)


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def np_rank(X: np.ndarray) -> int:
    """SPEC §2: rank of the data as given, in float64, σ > max(N, D)·eps₆₄·σ_max."""
    sv = np.linalg.svd(X.astype(np.float64), compute_uv=False)
    return int((sv > max(X.shape) * EPS64 * sv[0]).sum())


def np_rir(theta: np.ndarray, X_P: np.ndarray, X_H: np.ndarray) -> dict[str, float]:
    """Eq. 15 recomputed independently: κ(Σ) over r = rank(X), κ(S(θ)) over min(r, K), both
    from ``np.linalg.svd`` of the float64 matrices."""
    out = {}
    for side, X in (("pretrain", X_P), ("harmful", X_H)):
        X = X.astype(np.float64)
        Z = X @ theta
        r = np_rank(X)
        sx, sz = np.linalg.svd(X, compute_uv=False), np.linalg.svd(Z, compute_uv=False)
        out[f"kappa_{side}_reference"] = float((sx[0] / sx[r - 1]) ** 2)
        out[f"kappa_{side}"] = float((sz[0] / sz[min(r, theta.shape[1]) - 1]) ** 2)
    out["ratio_harmful"] = out["kappa_harmful"] / out["kappa_harmful_reference"]
    out["ratio_pretrain"] = out["kappa_pretrain"] / out["kappa_pretrain_reference"]
    out["rir"] = out["ratio_harmful"] / out["ratio_pretrain"]
    return out


def with_spectrum(n: int, sigma: np.ndarray, seed: int) -> torch.Tensor:
    """``n × len(sigma)`` data with exactly the singular values ``sigma``."""
    rng = np.random.default_rng(seed)
    U, _ = np.linalg.qr(rng.standard_normal((n, len(sigma))))
    V, _ = np.linalg.qr(rng.standard_normal((len(sigma), len(sigma))))
    return torch.from_numpy((U * sigma) @ V.T)


# --------------------------------------------------------------------------- 1. float32 rank


def test_float32_data_rank_uses_float64_eps():
    # singular values 1 … 1e-6: float32 storage moves each by ~1e-7 relative, none is round-off
    X = with_spectrum(200, np.logspace(0, -6, 12), seed=0).float()
    assert data_rank(X) == np_rank(X.numpy()) == 12


@needs_mnist
def test_mnist_digit_one_rank_is_325():
    from lightning_immunize.datamodules import MNISTPairDataModule

    dm = MNISTPairDataModule(root=str(MNIST), split="test", pretrain_digit=5, harmful_digit=1)
    dm.setup("fit")
    _, _, X_H, _ = dm.full_tensors("train")
    assert X_H.dtype == torch.float32 and X_H.shape == (892, 784)
    assert data_rank(X_H) == np_rank(X_H.numpy()) == 325


def test_training_rank_rule_is_the_report_rule():
    from lightning_immunize.models import LinearExtractor
    from lightning_immunize.objectives import ConditionNumberObjective

    X = with_spectrum(40, np.logspace(0, -6, 12), seed=1).float()
    objective = ConditionNumberObjective(rank_rule="input")
    assert objective.rank_for(LinearExtractor(12, 12), X, width=12) == data_rank(X) == 12


def test_house_prices_stay_float64():
    from lightning_immunize.datamodules import HousePricesDataModule

    csv = REPO.parent / "shared" / "data" / "house-prices" / "train.csv"
    if not csv.is_file():
        pytest.skip(f"house prices not found at {csv}")
    dm = HousePricesDataModule(csv_path=str(csv))
    dm.setup("fit")
    X_P, _, X_H, _ = dm.full_tensors("train")
    assert X_P.dtype == X_H.dtype == F64


# --------------------------------------------------------------------------- 2. reference rank


def test_identity_reference_is_over_rank_x_when_k_is_smaller():
    D, K = 8, 3
    g = torch.Generator().manual_seed(2)
    X_P = torch.randn(100, D, generator=g, dtype=F64) * torch.linspace(1, 3, D, dtype=F64)
    X_H = torch.randn(100, D, generator=g, dtype=F64) * torch.linspace(1, 4, D, dtype=F64)
    theta = torch.randn(D, K, generator=g, dtype=F64)
    expected = np_rir(theta.numpy(), X_P.numpy(), X_H.numpy())
    out = linear_immunization_ratios(lambda x: x @ theta, X_P, X_H)
    sx = np.linalg.svd(X_H.numpy(), compute_uv=False)
    assert rel(out["kappa_harmful_reference"], (sx[0] / sx[D - 1]) ** 2) < 1e-12
    for key, value in expected.items():
        assert rel(out[key], value) < 1e-10, key
    assert out["rank_harmful"] == K and out["input_rank_harmful"] == D


# --------------------------------------------------------------------------- 3. κ(Σ) accuracy


def test_reference_kappa_from_singular_values_and_class_equals_function():
    sigma = np.logspace(0, -10, 6)  # κ(Σ) = 1e20: below √eps a Gram matrix cannot resolve
    X = with_spectrum(60, sigma, seed=3)
    out = linear_immunization_ratios(torch.nn.Identity(), X, X)
    assert rel(out["kappa_harmful_reference"], 1e20) < 1e-4
    assert out["input_rank_harmful"] == 6
    metric = RelativeImmunizationRatio()
    for i in range(0, 60, 25):
        metric.update(X[i : i + 25], X[i : i + 25], X[i : i + 25], X[i : i + 25])
    batched = metric.compute()
    for key in ("rir", "kappa_harmful_reference", "kappa_pretrain", "rank_harmful"):
        assert rel(batched[key], out[key]) < 1e-10, key


# --------------------------------------------------------------------------- 4. inf/inf


def test_rir_inf_over_inf_raises_naming_the_kappas():
    D = 5
    g = torch.Generator().manual_seed(4)
    X_P = torch.randn(50, D, generator=g, dtype=F64)
    X_H = torch.randn(50, D, generator=g, dtype=F64)
    theta = torch.eye(D, dtype=F64)
    theta[2] = 0.0  # input direction 2 maps to zero on both sides
    with pytest.raises(ValueError, match=r"κ\(S_P\(θ\)\) and κ\(S_H\(θ\)\) are infinite"):
        linear_immunization_ratios(lambda x: x @ theta, X_P, X_H)
    metric = RelativeImmunizationRatio()
    metric.update(X_P @ theta, X_P, X_H @ theta, X_H)
    with pytest.raises(ValueError, match="inf/inf"):
        metric.compute()


# --------------------------------------------------------------------------- 6. float32 S


def test_condition_number_of_float32_matrix_uses_its_eps():
    g = torch.Generator().manual_seed(5)
    Z = torch.randn(64, 300, generator=g, dtype=F64) * torch.logspace(0, -1, 300, dtype=F64)
    expected = float(condition_number(Z.mT @ Z))  # formed in float64: rank 64
    S32 = Z.float().mT @ Z.float()  # formed in float32: round-off fills the null space
    assert rel(float(condition_number(S32)), expected) < 1e-3
    assert expected < 1e4


# --------------------------------------------------------------------------- acceptance


@needs_mnist
@pytest.mark.parametrize("pair", [(3, 8), (7, 1)])
def test_mnist_fit_rir_matches_numpy(tmp_path, pair):
    from lightning_immunize.cli import main
    from lightning_immunize.datamodules import MNISTPairDataModule

    root = tmp_path / "run"
    main(
        [
            "fit",
            "--config",
            str(REPO / "configs" / "mnist.yaml"),
            "--data.init_args.root",
            str(MNIST),
            "--data.init_args.pretrain_digit",
            str(pair[0]),
            "--data.init_args.harmful_digit",
            str(pair[1]),
            "--trainer.default_root_dir",
            str(root),
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    (run,) = (root / "lightning_logs").iterdir()
    report = json.loads((run / "immunization.json").read_text())
    ckpt = run / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    theta = state["extractor.linear.weight"].to(F64).T.numpy()  # θ (D×K), no bias
    assert not any(k.startswith("extractor.") and k.endswith("bias") for k in state)
    dm = MNISTPairDataModule(
        root=str(MNIST), split="test", pretrain_digit=pair[0], harmful_digit=pair[1]
    )
    dm.setup("fit")
    X_P, _, X_H, _ = dm.full_tensors("train")
    expected = np_rir(theta, X_P.numpy(), X_H.numpy())
    for key, value in expected.items():
        assert rel(report[key], value) < 1e-6, (key, report[key], value)
