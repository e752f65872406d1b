"""Tests of the immunization metric classes (SPEC §2, §6) against NumPy on the full data."""

from __future__ import annotations

import os
import socket
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_immunize.conditioning import data_rank, feature_condition_number
from lightning_immunize.metrics import (
    ConditionNumber,
    DeepRelativeImmunizationRatio,
    FeatureCovariance,
    RelativeImmunizationRatio,
    linear_immunization_ratios,
)

F64 = torch.float64
EPS = np.finfo(np.float64).eps
RATIO_KEYS = (
    "rir",
    "ratio_harmful",
    "ratio_pretrain",
    "kappa_harmful",
    "kappa_pretrain",
    "kappa_harmful_reference",
    "kappa_pretrain_reference",
)
DEEP_KEYS = (
    "rir",
    "ratio_harmful",
    "ratio_pretrain",
    "rir_std",
    "ratio_harmful_std",
    "ratio_pretrain_std",
    "kappa_harmful",
    "kappa_pretrain",
    "kappa_harmful_reference",
    "kappa_pretrain_reference",
)


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def low_rank(n: int, d: int, r: int, seed: int, dtype=F64) -> torch.Tensor:
    """``n × d`` data of rank exactly ``r`` (generic otherwise)."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, r, generator=g, dtype=F64)
    B = torch.randn(r, d, generator=g, dtype=F64)
    return (A @ B).to(dtype)


def chunks(n: int, sizes=(7, 1, 30, 13)) -> list[slice]:
    """Uneven batch boundaries covering ``range(n)`` (a size-0 batch included)."""
    out, i, k = [slice(0, 0)], 0, 0
    while i < n:
        step = sizes[k % len(sizes)]
        out.append(slice(i, min(i + step, n)))
        i, k = i + step, k + 1
    return out


# --------------------------------------------------------------------------- NumPy references


def np_kappa(S: np.ndarray, rank: int | None = None) -> float:
    """κ of a symmetric PSD ``S`` over its top ``rank`` eigenvalues, else by the tolerance rule."""
    sigma = np.sort(np.abs(np.linalg.eigvalsh(S)))[::-1]
    if rank is None:
        rank = int((sigma > S.shape[0] * EPS * sigma[0]).sum())
    return float(sigma[0] / sigma[rank - 1])


def np_linear_rir(theta: np.ndarray, X_P: np.ndarray, X_H: np.ndarray) -> dict[str, float]:
    """Eq. 15 with the input-rank rule, from singular values: κ(Σ) over r = matrix_rank(X)
    (the identity extractor's own rank), κ(S(θ)) over min(r, K)."""
    out = {}
    for side, X in (("pretrain", X_P), ("harmful", X_H)):
        Z = X @ theta
        r = int(np.linalg.matrix_rank(X))
        rz = min(r, theta.shape[1])
        sz, sx = np.linalg.svd(Z, compute_uv=False), np.linalg.svd(X, compute_uv=False)
        out[f"kappa_{side}"] = float((sz[0] / sz[rz - 1]) ** 2)
        out[f"kappa_{side}_reference"] = float((sx[0] / sx[r - 1]) ** 2)
        out[f"rank_{side}"] = rz
    out["ratio_harmful"] = out["kappa_harmful"] / out["kappa_harmful_reference"]
    out["ratio_pretrain"] = out["kappa_pretrain"] / out["kappa_pretrain_reference"]
    out["rir"] = out["ratio_harmful"] / out["ratio_pretrain"]
    return out


# --------------------------------------------------------------------------- FeatureCovariance


def test_feature_covariance_matches_numpy_and_is_batch_invariant():
    Z = low_rank(101, 6, 6, seed=0) + 0.5
    Zn = Z.numpy()
    one = FeatureCovariance()
    one.update(Z)
    many = FeatureCovariance(normalize=False)
    for s in chunks(101):
        many.update(Z[s])
    assert one.compute().dtype == F64
    np.testing.assert_allclose(one.compute().numpy(), Zn.T @ Zn / 101, rtol=1e-12)
    np.testing.assert_allclose(many.compute().numpy(), Zn.T @ Zn, rtol=1e-12)
    assert int(many.num_samples) == 101


@pytest.mark.filterwarnings("ignore:.*was called before the ``update``")
def test_feature_covariance_flattens_float32_and_checks_width():
    Z = torch.randn(8, 2, 3)
    metric = FeatureCovariance(num_features=6)
    metric.update(Z)
    Z64 = Z.reshape(8, 6).double()
    torch.testing.assert_close(metric.compute(), Z64.T @ Z64 / 8, rtol=1e-14, atol=0)
    with pytest.raises(ValueError, match=r"had 6, this one has 5"):
        metric.update(torch.randn(4, 5))
    with pytest.raises(ValueError, match=r"\(B, K\)"):
        metric.update(torch.randn(4))
    with pytest.raises(ValueError, match="no features yet"):
        FeatureCovariance().compute()
    with pytest.raises(ValueError, match="num_features"):
        FeatureCovariance(num_features=0)


@pytest.mark.filterwarnings("ignore:.*was called before the ``update``")
def test_forward_and_merge_state_equal_one_update():
    Z = torch.randn(40, 5, dtype=F64)
    ref = FeatureCovariance()
    ref.update(Z)
    stepped = FeatureCovariance()  # lazy width: forward's first state merge is (0, 0) + (5, 5)
    batch_value = stepped(Z[:10])
    torch.testing.assert_close(batch_value, Z[:10].T @ Z[:10] / 10)
    stepped(Z[10:])
    torch.testing.assert_close(stepped.compute(), ref.compute(), rtol=1e-13, atol=0)

    a, b, empty = FeatureCovariance(), FeatureCovariance(), FeatureCovariance()
    a.update(Z[:25])
    b.update(Z[25:])
    a.merge_state(b)
    a.merge_state(empty)
    torch.testing.assert_close(a.compute(), ref.compute(), rtol=1e-13, atol=0)
    empty.merge_state(a)
    torch.testing.assert_close(empty.compute(), ref.compute(), rtol=1e-13, atol=0)


# --------------------------------------------------------------------------- ConditionNumber


@pytest.mark.parametrize("rank", [None, 3, 2])
def test_condition_number_matches_numpy_on_known_rank(rank):
    Z = low_rank(120, 7, 3, seed=1)  # S has rank 3: the tolerance rule must find it
    Zn = Z.numpy()
    S = Zn.T @ Zn
    sigma = np.sort(np.linalg.eigvalsh(S))[::-1]
    assert sigma[3] < 0.1 * 7 * EPS * sigma[0]  # the round-off eigenvalues are well below rtol
    expected = np_kappa(S, 3 if rank is None else rank)
    one, many = ConditionNumber(rank=rank), ConditionNumber(rank=rank)
    one.update(Z)
    for s in chunks(120):
        many.update(Z[s])
    assert rel(float(one.compute()), expected) < 1e-9
    assert rel(float(many.compute()), float(one.compute())) < 1e-12
    full = float(feature_condition_number(Z, rank=rank))
    assert rel(float(one.compute()), full) < 1e-12


def test_condition_number_input_rank_rule_and_rtol():
    # a direction squeezed to 1e-9: the tolerance rule drops it, the input-rank rule keeps it
    Z = torch.randn(50, 3, dtype=F64) @ torch.diag(torch.tensor([3.0, 1.0, 1e-9], dtype=F64))
    tol, ranked = ConditionNumber(), ConditionNumber(rank=data_rank(torch.randn(50, 3)))
    tol.update(Z)
    ranked.update(Z)
    S = (Z.T @ Z).numpy()
    assert rel(float(tol.compute()), np_kappa(S, 2)) < 1e-9
    assert float(ranked.compute()) > 1e15
    loose = ConditionNumber(rtol=0.99)  # keeps σ_max only
    loose.update(Z)
    assert float(loose.compute()) == 1.0


# --------------------------------------------------------------------------- linear RIR


@pytest.mark.parametrize("K", [5, 12])
def test_linear_rir_matches_numpy_eq15(K):
    D = 8
    X_P = low_rank(90, D, 5, seed=2)  # rank-deficient side: r = 5
    X_H = low_rank(70, D, D, seed=3)
    theta = torch.randn(D, K, generator=torch.Generator().manual_seed(4), dtype=F64)
    expected = np_linear_rir(theta.numpy(), X_P.numpy(), X_H.numpy())
    metric = RelativeImmunizationRatio()
    metric.update(X_P @ theta, X_P, X_H @ theta, X_H)
    out = metric.compute()
    assert out["rank_pretrain"] == expected["rank_pretrain"] == min(5, K)
    assert out["rank_harmful"] == expected["rank_harmful"] == min(D, K)
    for key in RATIO_KEYS:
        assert rel(out[key], expected[key]) < 1e-9, key
    functional = linear_immunization_ratios(lambda x: x @ theta, X_P, X_H)
    for key in RATIO_KEYS:
        assert rel(out[key], functional[key]) < 1e-9, key
    assert out["immunized"] == functional["immunized"]


def test_linear_rir_batch_invariant_with_uneven_sides():
    D, K = 6, 4
    X_P, X_H = low_rank(100, D, D, seed=5), low_rank(61, D, 3, seed=6)
    theta = torch.randn(D, K, generator=torch.Generator().manual_seed(7), dtype=F64)
    one = RelativeImmunizationRatio()
    one.update(X_P @ theta, X_P, X_H @ theta, X_H)
    many = RelativeImmunizationRatio()
    sp, sh = chunks(100), chunks(61, sizes=(16,))
    for i in range(max(len(sp), len(sh))):
        p = sp[i] if i < len(sp) else None
        h = sh[i] if i < len(sh) else None
        many.update(
            None if p is None else X_P[p] @ theta,
            None if p is None else X_P[p],
            None if h is None else X_H[h] @ theta,
            None if h is None else X_H[h],
        )
    a, b = one.compute(), many.compute()
    for key in RATIO_KEYS:
        assert rel(b[key], a[key]) < 1e-12, key
    assert (a["rank_pretrain"], a["rank_harmful"]) == (b["rank_pretrain"], b["rank_harmful"])


def test_linear_rir_identity_is_one_and_merge_state():
    X_P, X_H = low_rank(40, 5, 5, seed=8), low_rank(40, 5, 4, seed=9)
    left, right = RelativeImmunizationRatio(), RelativeImmunizationRatio()
    left.update(X_P[:15], X_P[:15], X_H[:30], X_H[:30])
    right.update(X_P[15:], X_P[15:], X_H[30:], X_H[30:])
    left.merge_state(right)
    out = left.compute()
    assert out["rir"] == out["ratio_harmful"] == out["ratio_pretrain"] == 1.0
    assert out["rank_harmful"] == 4 and not out["immunized"]


def test_linear_rir_float32_inputs_rank_in_float64():
    # float32 storage of rank-3 data adds real (if tiny) directions: the data *as given* are
    # full-rank by float64's eps, and the metric, the function and data_rank agree on it
    X = low_rank(80, 6, 3, seed=10, dtype=torch.float32)
    metric = RelativeImmunizationRatio()
    metric.update(X, X, X, X)
    out = metric.compute()
    assert out["input_rank_pretrain"] == data_rank(X) == np.linalg.matrix_rank(X.double().numpy())
    assert linear_immunization_ratios(torch.nn.Identity(), X, X)["rank_pretrain"] == 6


def test_linear_rir_errors():
    metric = RelativeImmunizationRatio()
    with pytest.raises(ValueError, match="same samples"):
        metric.update(torch.randn(4, 3), torch.randn(5, 3), None, None)
    with pytest.raises(ValueError, match="together"):
        metric.update(torch.randn(4, 3), None, None, None)
    metric.update(torch.randn(4, 3), torch.randn(4, 2), None, None)
    with pytest.raises(ValueError, match="had 2, this one has 3"):
        metric.update(torch.randn(4, 3), torch.randn(4, 2), torch.randn(4, 3), torch.randn(4, 3))
        metric.update(torch.randn(4, 3), torch.randn(4, 3), None, None)
    assert int(metric.num_pretrain) == 8 and int(metric.num_harmful) == 4
    with pytest.raises(ValueError, match="had 3, this one has 5"):  # validated before adding
        metric.update(torch.randn(4, 3), torch.randn(4, 2), torch.randn(4, 5), torch.randn(4, 3))
    assert int(metric.num_pretrain) == 8 and int(metric.num_harmful) == 4
    with pytest.raises(ValueError, match="no harmful samples"):
        RelativeImmunizationRatio().forward(torch.randn(4, 3), torch.randn(4, 2), None, None)


# --------------------------------------------------------------------------- deep RIR


def np_deep_rir(Zs: dict[str, np.ndarray], groups: dict[str, np.ndarray]) -> dict[str, float]:
    ratios, out = {}, {}
    for side in ("pretrain", "harmful"):
        k = np.array([np_kappa(Zs[side][g].T @ Zs[side][g]) for g in groups[side]])
        k0 = np.array(
            [np_kappa(Zs[side + "_ref"][g].T @ Zs[side + "_ref"][g]) for g in groups[side]]
        )
        ratios[side] = k / k0
        out[f"kappa_{side}"], out[f"kappa_{side}_reference"] = k.mean(), k0.mean()
    per_group = {
        "rir": ratios["harmful"] / ratios["pretrain"],
        "ratio_harmful": ratios["harmful"],
        "ratio_pretrain": ratios["pretrain"],
    }
    for key, v in per_group.items():
        out[key], out[f"{key}_std"] = float(v.mean()), float(v.std())
    return out


def deep_features(seed: int = 11):
    g = torch.Generator().manual_seed(seed)
    Z_P, Z_H = torch.randn(150, 6, generator=g), torch.randn(130, 6, generator=g)
    return {
        "pretrain": Z_P @ torch.randn(6, 6, generator=g),
        "pretrain_ref": Z_P,
        "harmful": Z_H @ torch.diag(torch.tensor([1.0, 2.0, 3.0, 5.0, 8.0, 13.0])),
        "harmful_ref": Z_H,
    }


def test_deep_rir_matches_numpy_on_the_same_groups():
    Z = deep_features()
    metric = DeepRelativeImmunizationRatio(num_groups=7, group_size=40, seed=3)
    metric.update(Z["pretrain"], Z["pretrain_ref"], Z["harmful"], Z["harmful_ref"])
    out = metric.compute()
    gen = torch.Generator().manual_seed(3)  # the documented draw: D_P's groups, then D_H's
    groups = {
        side: [torch.randperm(n, generator=gen)[:40].numpy() for _ in range(7)]
        for side, n in (("pretrain", 150), ("harmful", 130))
    }
    expected = np_deep_rir({k: v.double().numpy() for k, v in Z.items()}, groups)
    for key in DEEP_KEYS:
        assert abs(out[key] - expected[key]) <= 1e-9 * max(abs(expected[key]), 1.0), key
    assert out["num_groups"] == 7 and out["group_size"] == 40
    assert out["ratio_harmful"] > 1 and out["ratio_harmful_std"] > 0


def test_deep_rir_identity_is_exactly_one_and_reproducible():
    Z = deep_features()
    same = DeepRelativeImmunizationRatio(num_groups=5, group_size=30, seed=0)
    same.update(Z["pretrain"], Z["pretrain"], Z["harmful"], Z["harmful"])
    out = same.compute()
    for key in ("rir", "ratio_harmful", "ratio_pretrain"):
        assert out[key] == 1.0 and out[f"{key}_std"] == 0.0
    assert not out["immunized"]

    def run(seed, split):
        m = DeepRelativeImmunizationRatio(num_groups=5, group_size=30, seed=seed)
        for s in chunks(150, sizes=(split,)):
            h = slice(min(s.start, 130), min(s.stop, 130))
            m.update(Z["pretrain"][s], Z["pretrain_ref"][s], Z["harmful"][h], Z["harmful_ref"][h])
        return m.compute()

    a, b, c = run(1, 150), run(1, 17), run(2, 150)
    assert a == b  # same seed: same groups, whatever the batching
    assert a["rir"] != c["rir"]


def test_deep_rir_errors():
    metric = DeepRelativeImmunizationRatio(num_groups=2, group_size=50)
    metric.update(torch.randn(60, 4), torch.randn(60, 4), torch.randn(49, 4), torch.randn(49, 4))
    with pytest.raises(ValueError, match="harmful side has 49 samples, fewer than group_size=50"):
        metric.compute()
    with pytest.raises(ValueError, match="pretrain side has 0 samples"):
        m = DeepRelativeImmunizationRatio(num_groups=2, group_size=5)
        m.update(None, None, torch.randn(9, 4), torch.randn(9, 4))
        m.compute()
    with pytest.raises(ValueError, match="same samples"):
        metric.update(torch.randn(3, 4), torch.randn(2, 4), None, None)
    with pytest.raises(ValueError, match="had 4, this one has 5"):
        metric.update(torch.randn(3, 5), torch.randn(3, 5), None, None)
    with pytest.raises(ValueError, match="group_size"):
        DeepRelativeImmunizationRatio(group_size=0)


# --------------------------------------------------------------------------- DDP (gloo, 2 ranks)


def _ddp_data():
    D, K = 6, 4
    X_P, X_H = low_rank(80, D, 4, seed=20), low_rank(64, D, D, seed=21)
    theta = torch.randn(D, K, generator=torch.Generator().manual_seed(22), dtype=F64)
    return X_P, X_H, theta


def _ddp_metrics():
    return (
        FeatureCovariance(),
        ConditionNumber(),
        RelativeImmunizationRatio(),
        DeepRelativeImmunizationRatio(num_groups=4, group_size=30, seed=5),
    )


def _ddp_update(metrics, X_P, X_H, theta):
    cov, kappa, rir, deep = metrics
    cov.update(X_P @ theta)
    kappa.update(X_P @ theta)
    rir.update(X_P @ theta, X_P, X_H @ theta, X_H)
    deep.update(X_P @ theta, X_P, X_H @ theta, X_H)


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        X_P, X_H, theta = _ddp_data()
        half_p, half_h = slice(rank * 40, rank * 40 + 40), slice(rank * 32, rank * 32 + 32)
        metrics = _ddp_metrics()
        _ddp_update(metrics, X_P[half_p], X_H[half_h], theta)
        results = [m.compute() for m in metrics]
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_sync_equals_single_process(tmp_path):
    metrics = _ddp_metrics()
    _ddp_update(metrics, *_ddp_data())
    single = [m.compute() for m in metrics]

    ctx = mp.start_processes(
        _ddp_worker,
        args=(2, _free_port(), str(tmp_path)),
        nprocs=2,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + 60
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.terminate()
            pytest.fail("the 2-process gloo run did not finish within 60 s")
    for rank in range(2):
        cov, kappa, rir, deep = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        torch.testing.assert_close(cov, single[0], rtol=1e-13, atol=0)
        assert rel(float(kappa), float(single[1])) < 1e-12
        for key in RATIO_KEYS:
            assert rel(rir[key], single[2][key]) < 1e-12, key
        assert deep == single[3]  # rank-ordered gather = the single-process order here
