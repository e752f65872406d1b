"""The data seed follows the global seed (``seed_everything`` / ``PL_GLOBAL_SEED``) unless a
data module is given an explicit ``seed``; ``split_seed`` stays fixed (docs/seeds.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from lightning_immunize.datamodules import DigitsPairDataModule, MNISTHalvesDataModule

ROOT = Path(__file__).resolve().parents[1]
MNIST = ROOT.parent / "shared" / "data" / "MNIST"
needs_mnist = pytest.mark.skipif(
    not (MNIST / "raw").is_dir(), reason="../shared/data/MNIST is not there"
)
SEED_VARS = ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")


@pytest.fixture
def clean_seed_env(monkeypatch):
    """No global seed in the environment; whatever the test (or ``seed_everything``) sets
    is undone afterwards (set first so that ``delenv`` records the original value)."""
    for name in SEED_VARS:
        monkeypatch.setenv(name, "0")
        monkeypatch.delenv(name)
    return monkeypatch


def _order(dm: DigitsPairDataModule) -> list[torch.Tensor]:
    """The first training epoch's inputs, per side, in the order the loaders serve them."""
    batches = [batch for batch, _, _ in dm.train_dataloader()]
    return [torch.cat([b[side][0] for b in batches]) for side in ("pretrain", "harmful")]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _digits(**kwargs) -> DigitsPairDataModule:
    return DigitsPairDataModule(3, 8, batch_size=16, **kwargs)


def test_global_seed_sets_the_shuffles(clean_seed_env):
    clean_seed_env.setenv("PL_GLOBAL_SEED", "1")
    one = _order(_digits())
    again = _order(_digits())
    clean_seed_env.setenv("PL_GLOBAL_SEED", "7")
    seven = _digits()
    assert seven.resolved_seed == 7
    assert _same(one, again)
    assert not _same(one, _order(seven))


def test_explicit_seed_overrides_the_global_seed(clean_seed_env):
    clean_seed_env.setenv("PL_GLOBAL_SEED", "7")
    explicit = _digits(seed=1)
    assert explicit.seed == 1 and explicit.resolved_seed == 1
    clean_seed_env.delenv("PL_GLOBAL_SEED")
    assert _same(_order(explicit), _order(_digits(seed=1)))
    clean_seed_env.setenv("PL_GLOBAL_SEED", "1")
    assert _same(_order(_digits(seed=1)), _order(_digits()))


def test_no_global_seed_means_seed_0(clean_seed_env):
    default = _digits()
    assert default.seed is None and default.resolved_seed == 0
    assert _same(_order(default), _order(_digits(seed=0)))
    assert not _same(_order(_digits()), _order(_digits(seed=1)))
    assert "seed=0" in repr(default)


def test_seed_is_resolved_lazily_and_then_kept(clean_seed_env):
    """Built before ``seed_everything`` (the env is read at the first use, not in
    ``__init__``); once resolved, a later change of the global seed changes nothing."""
    dm = _digits(val_fraction=0.25)
    clean_seed_env.setenv("PL_GLOBAL_SEED", "7")
    dm.setup("fit")
    assert dm.resolved_seed == 7
    first = _order(dm)
    clean_seed_env.setenv("PL_GLOBAL_SEED", "1")
    assert dm.resolved_seed == 7
    # The validation draw follows the data seed too.
    seven = _digits(val_fraction=0.25, seed=7)
    assert torch.equal(dm.full_tensors("val")[0], seven.full_tensors("val")[0])
    assert not torch.equal(
        dm.full_tensors("val")[0], _digits(val_fraction=0.25, seed=1).full_tensors("val")[0]
    )
    assert _same(first, _order(_digits(val_fraction=0.25, seed=7)))


@needs_mnist
def test_halves_holdout_ignores_the_global_seed(clean_seed_env):
    clean_seed_env.setenv("PL_GLOBAL_SEED", "1")
    one = MNISTHalvesDataModule(MNIST, max_samples=60)
    one.setup("fit")
    clean_seed_env.setenv("PL_GLOBAL_SEED", "7")
    seven = MNISTHalvesDataModule(MNIST, max_samples=60)
    seven.setup("fit")
    assert one.resolved_seed == 1 and seven.resolved_seed == 7
    assert torch.equal(one.full_tensors("val")[0], seven.full_tensors("val")[0])
    assert torch.equal(one.full_tensors("train")[0], seven.full_tensors("train")[0])


# ---------------------------------------------------------------- the acceptance
def _short_cnn_mnist(tmp_path: Path, cache: Path) -> Path:
    """configs/cnn_mnist.yaml, shortened like tests/test_deep_mnist.py (tiny timm model,
    150 images a side, 2 training batches, θ_0 cached under ``cache``)."""
    cfg = yaml.safe_load((ROOT / "configs" / "cnn_mnist.yaml").read_text())
    cfg["trainer"].update(max_epochs=1, limit_train_batches=2, logger=False)
    cfg["trainer"]["enable_checkpointing"] = False
    theta0 = cfg["theta0"]["init_args"]
    theta0.update(cache_dir=str(cache), epochs=1, max_epochs=1, min_accuracy=0.0, progress=False)
    cfg["model"]["extractor"]["init_args"]["model_name"] = "test_resnet"
    cfg["data"]["init_args"].update(root=str(MNIST), max_samples=150, batch_size=16)
    path = tmp_path / "cnn_mnist_short.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
@needs_mnist
def test_seed_everything_changes_the_cnn_mnist_run(tmp_path, clean_seed_env):
    from lightning_immunize.cli import main

    clean_seed_env.setattr("sys.argv", ["lightning-immunize"])  # not pytest's arguments
    config = _short_cnn_mnist(tmp_path, tmp_path / "cache")

    def rir(seed: int, name: str) -> float:
        run = tmp_path / name
        main(
            [
                "fit",
                "--config",
                str(config),
                "--seed_everything",
                str(seed),
                "--trainer.default_root_dir",
                str(run),
                "--trainer.enable_progress_bar",
                "false",
            ]
        )
        return json.loads((run / "immunization.json").read_text())["rir"]

    one, seven, one_again = rir(1, "seed1"), rir(7, "seed7"), rir(1, "seed1_again")
    assert one == one_again
    assert one != seven
