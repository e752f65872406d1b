"""Deep MNIST halves: data module, seeded timm init, θ_0 from scratch with its cache, the
accuracy-curve probes and a shortened `reproduce deep-mnist` end to end (tiny timm model)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml

from lightning_immunize.datamodules import MNISTHalvesDataModule
from lightning_immunize.evaluation.study import probe_accuracy_curves
from lightning_immunize.models import TimmBackbone
from lightning_immunize.module import ImmunizationModule
from lightning_immunize.pretraining import state_fingerprint
from lightning_immunize.theta0 import FromScratch

ROOT = Path(__file__).resolve().parents[1]
MNIST = ROOT.parent / "shared" / "data" / "MNIST"
needs_mnist = pytest.mark.skipif(
    not (MNIST / "raw").is_dir(), reason="../shared/data/MNIST is not there"
)


def _tiny_module(**kwargs) -> ImmunizationModule:
    extractor = TimmBackbone(
        "test_resnet", in_chans=1, num_classes=5, seed=0, trainable=["layer3", "layer4"]
    )
    return ImmunizationModule(extractor, method="ours", method_args=kwargs or None)


@needs_mnist
def test_halves_split_labels_and_fixed_holdout():
    dm = MNISTHalvesDataModule(MNIST, max_samples=200, seed=1)
    x_p, y_p, x_h, y_h = dm.full_tensors("train")
    v_p, w_p, v_h, w_h = dm.full_tensors("val")
    assert x_p.shape == (160, 1, 28, 28) and v_p.shape == (40, 1, 28, 28)
    assert set(y_h.tolist()) <= set(range(5)) and set(y_p.tolist()) <= set(range(5))
    assert dm.num_classes_pretrain == dm.num_classes_harmful == 5 and dm.task == "multiclass"
    # The held-out images do not depend on the run seed (only on split_seed).
    other = MNISTHalvesDataModule(MNIST, max_samples=200, seed=7)
    assert torch.equal(other.full_tensors("val")[0], v_p)
    # D_H labels are positions in its digit group: 5 → 0 … 9 → 4.
    images, labels = __import__(
        "lightning_immunize.datamodules.mnist", fromlist=["load_mnist_idx"]
    ).load_mnist_idx(MNIST)
    full = MNISTHalvesDataModule(MNIST, harmful_digits=(9, 5))
    _, _, _, y = full.full_tensors("train")
    _, _, _, yv = full.full_tensors("val")
    assert int((y == 0).sum() + (yv == 0).sum()) == int((labels == 9).sum())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"pretrain_digits": (0, 1), "harmful_digits": (1, 2)}, "share"),
        ({"pretrain_digits": (0,)}, "at least two"),
        ({"pretrain_digits": (0, 0, 1)}, "repeats"),
        ({"harmful_digits": (5, 10)}, "0..9"),
        ({"holdout_fraction": 1.0}, "holdout_fraction"),
        ({"max_samples": 2}, "max_samples"),
    ],
)
def test_halves_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MNISTHalvesDataModule(MNIST, **kwargs)


def test_halves_missing_files_names_them(tmp_path):
    dm = MNISTHalvesDataModule(tmp_path)
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte"):
        dm.setup("fit")


def test_timm_seed_fixes_initial_weights_and_keeps_global_rng():
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a = TimmBackbone("test_resnet", in_chans=1, num_classes=5, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.manual_seed(999)
    b = TimmBackbone("test_resnet", in_chans=1, num_classes=5, seed=3)
    c = TimmBackbone("test_resnet", in_chans=1, num_classes=5, seed=4)
    assert state_fingerprint(a) == state_fingerprint(b) != state_fingerprint(c)
    assert a.make_head().linear.out_features == 5


@needs_mnist
def test_theta0_trained_once_then_loaded_from_cache(tmp_path):
    dm = MNISTHalvesDataModule(MNIST, max_samples=120)
    recipe = dict(epochs=1, max_epochs=1, min_accuracy=0.0, batch_size=32, progress=False)
    first = FromScratch(cache_dir=tmp_path, **recipe)
    m1 = _tiny_module()
    initial = state_fingerprint(m1.extractor, m1.head)
    info = first.apply(m1, dm)
    assert not info["cached"] and len(list(tmp_path.glob("theta0-*.pt"))) == 1
    assert state_fingerprint(m1.extractor, m1.head) != initial
    # Frozen flags survive the from-scratch training.
    assert not any(p.requires_grad for p in m1.extractor.model.conv1.parameters())
    assert all(p.requires_grad for p in m1.extractor.model.layer4.parameters())
    # Applying again to a module that holds θ_0 is a no-op (fit's setup after the runner's).
    assert first.apply(m1, dm) is first.info and len(list(tmp_path.glob("*.pt"))) == 1
    # A fresh module with the same initial weights loads the same θ_0 from the cache.
    m2 = _tiny_module()
    second = FromScratch(cache_dir=tmp_path, **recipe)
    assert second.apply(m2, dm)["cached"]
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # Another recipe is another θ_0.
    other = FromScratch(cache_dir=tmp_path, **{**recipe, "lr": 3e-3})
    assert other.cache_key(_tiny_module(), dm) != info["key"]


@needs_mnist
def test_theta0_below_min_accuracy_raises(tmp_path):
    dm = MNISTHalvesDataModule(MNIST, max_samples=60)
    cb = FromScratch(
        cache_dir=tmp_path, epochs=1, max_epochs=1, min_accuracy=1.0, lr=1e-9, progress=False
    )
    with pytest.raises(RuntimeError, match="min_accuracy"):
        cb.apply(_tiny_module(), dm)
    assert not list(tmp_path.glob("*.pt"))  # nothing cached


def test_pretrain_bad_recipe():
    with pytest.raises(ValueError, match="epochs"):
        FromScratch(epochs=3, max_epochs=2)
    with pytest.raises(ValueError, match="min_accuracy"):
        FromScratch(min_accuracy=97)


@needs_mnist
def test_probe_accuracy_curves_shapes():
    dm = MNISTHalvesDataModule(MNIST, max_samples=80)
    curves = probe_accuracy_curves(_tiny_module().extractor, dm, epochs=3)
    assert set(curves) == {"harmful", "pretrain"}
    for side in curves.values():
        assert set(side) == {"sgd", "adam"}
        assert all(len(c) == 4 and all(0.0 <= a <= 1.0 for a in c) for c in side.values())
    with pytest.raises(ValueError, match="unknown probe optimizer"):
        probe_accuracy_curves(_tiny_module().extractor, dm, optimizers=["lbfgs"])


def _short_config(tmp_path: Path) -> Path:
    """configs/cnn_mnist.yaml, shortened: tiny timm model, 150 images a side, 2 batches."""
    cfg = yaml.safe_load((ROOT / "configs" / "cnn_mnist.yaml").read_text())
    cfg["trainer"].update(max_epochs=1, limit_train_batches=2, logger=False)
    cfg["trainer"]["enable_checkpointing"] = False
    theta0 = cfg["theta0"]["init_args"]
    theta0.update(cache_dir=str(tmp_path / "cache"), epochs=1, max_epochs=1, min_accuracy=0.0)
    theta0["progress"] = False
    cfg["model"]["extractor"]["init_args"]["model_name"] = "test_resnet"
    cfg["data"]["init_args"].update(root=str(MNIST), max_samples=150, batch_size=16)
    path = tmp_path / "cnn_mnist_short.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@needs_mnist
def test_fit_writes_deep_report(tmp_path):
    from lightning_immunize.cli import main

    config = _short_config(tmp_path)
    main(["fit", "--config", str(config), "--trainer.default_root_dir", str(tmp_path / "run")])
    report = json.loads((tmp_path / "run" / "immunization.json").read_text())
    for key in ("rir", "ratio_harmful", "ratio_pretrain", "rir_std", "task_metric"):
        assert key in report
    assert report["task_metric_name"] == "accuracy" and "task_metric_before" in report
    assert report["num_groups"] == 20 and report["group_size"] == 100


@needs_mnist
def test_reproduce_deep_mnist_shortened_end_to_end(tmp_path):
    from lightning_immunize.commands.reproduce import run_sweep

    spec = yaml.safe_load((ROOT / "configs" / "reproduce.yaml").read_text())
    deep = spec["deep-mnist"]
    deep["config"] = str(_short_config(tmp_path))
    deep["probe"].update(num_groups=3, group_size=20, epochs=2)
    spec_path = tmp_path / "reproduce.yaml"
    spec_path.write_text(yaml.safe_dump({"deep-mnist": deep}))
    out = tmp_path / "out"
    methods = ["reference", "ours", "rmax_only", "opt", "imma"]
    table = run_sweep(
        "deep-mnist", out, methods=methods, seeds=[1], spec_path=spec_path, progress=False
    )
    rows = list(csv.DictReader((out / "runs.csv").open()))
    assert [r["method"] for r in rows] == methods
    identity = rows[0]
    assert float(identity["rir"]) == pytest.approx(1.0)
    assert identity["task_metric"] == identity["task_metric_before"]
    assert all(r["task_metric_before"] == identity["task_metric_before"] for r in rows)
    assert len(list((out / "probes").glob("*.json"))) == 5
    assert (out / "probe_accuracy.png").stat().st_size > 0
    text = table.read_text()
    assert "| sgd | D_H | ours |" in text and "epochs to threshold" in text
    # Resuming repeats nothing.
    run_sweep("deep-mnist", out, methods=methods, seeds=[1], spec_path=spec_path, progress=False)
    assert len(list(csv.DictReader((out / "runs.csv").open()))) == 5
