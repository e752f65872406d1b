"""θ_0 as configuration: the ``theta0:`` group, resolved by the builder before any callback."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from lightning_immunize.build import ConfigError, instantiate, load_theta0
from lightning_immunize.callbacks.theta0 import Theta0Setup
from lightning_immunize.models import LinearExtractor, LinearHead
from lightning_immunize.module import ImmunizationModule
from lightning_immunize.theta0 import AsBuilt, FromCheckpoint, FromScratch

ROOT = Path(__file__).resolve().parents[1]


def _digits_config(tmp_path: Path, **extra) -> Path:
    config = yaml.safe_load((ROOT / "configs" / "digits.yaml").read_text())
    config.update(extra)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_no_theta0_group_is_as_built_and_its_setup_runs_first(tmp_path):
    cli = instantiate(["--config", str(_digits_config(tmp_path)), "--trainer.logger", "false"])
    assert isinstance(cli.theta0, AsBuilt)
    assert isinstance(cli.trainer.callbacks[0], Theta0Setup)
    before = cli.model.extractor.linear.weight.clone()
    load_theta0(cli)
    assert torch.equal(cli.model.extractor.linear.weight, before)


def test_theta0_from_a_checkpoint_is_loaded_before_any_callback(tmp_path):
    module = ImmunizationModule(LinearExtractor(64, 64, seed=3), LinearHead(64, 1, "binary"))
    torch.save({"state_dict": module.state_dict()}, tmp_path / "theta0.ckpt")
    group = {"class_path": "lightning_immunize.theta0.FromCheckpoint",
             "init_args": {"path": str(tmp_path / "theta0.ckpt")}}  # fmt: skip
    callbacks = [{"class_path": "lightning_immunize.callbacks.RIRCallback"}]
    path = _digits_config(tmp_path, theta0=group)
    cli = instantiate(
        [
            "--config",
            str(path),
            "--trainer.logger",
            "false",
            "--trainer.callbacks",
            yaml.safe_dump(callbacks),
        ]  # fmt: skip
    )
    assert isinstance(cli.theta0, FromCheckpoint)
    assert isinstance(cli.trainer.callbacks[0], Theta0Setup)  # ahead of the config's own
    load_theta0(cli)
    assert torch.equal(cli.model.extractor.linear.weight, module.extractor.linear.weight.to(
        cli.model.extractor.linear.weight.dtype))  # fmt: skip


def test_a_missing_theta0_checkpoint_names_the_file(tmp_path):
    module = ImmunizationModule(LinearExtractor(4, 4), LinearHead(4, 1, "binary"))
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        FromCheckpoint(tmp_path / "nope.ckpt").apply(module, None)


def test_theta0_said_twice_is_refused_before_anything_runs(tmp_path):
    group = {"class_path": "lightning_immunize.theta0.FromScratch"}
    legacy = [{"class_path": "lightning_immunize.callbacks.pretrain.PretrainFromScratch"}]
    path = _digits_config(tmp_path, theta0=group)
    with pytest.raises(ConfigError, match="twice"):
        instantiate(
            [
                "--config",
                str(path),
                "--trainer.logger",
                "false",
                "--trainer.callbacks",
                yaml.safe_dump(legacy),
            ]  # fmt: skip
        )


def test_from_scratch_refuses_a_bad_recipe_naming_the_values():
    with pytest.raises(ValueError, match="epochs=3 and max_epochs=2"):
        FromScratch(epochs=3, max_epochs=2)
    with pytest.raises(ValueError, match="got 97"):
        FromScratch(min_accuracy=97)


def test_a_theta0_setup_listed_among_the_callbacks_is_the_source_not_dropped(tmp_path):
    module = ImmunizationModule(LinearExtractor(64, 64, seed=3), LinearHead(64, 1, "binary"))
    torch.save({"state_dict": module.state_dict()}, tmp_path / "theta0.ckpt")
    source = {"class_path": "lightning_immunize.theta0.FromCheckpoint",
              "init_args": {"path": str(tmp_path / "theta0.ckpt")}}  # fmt: skip
    listed = [{"class_path": "lightning_immunize.callbacks.theta0.Theta0Setup",
               "init_args": {"source": source}}]  # fmt: skip
    cli = instantiate(
        [
            "--config",
            str(_digits_config(tmp_path)),
            "--trainer.logger",
            "false",
            "--trainer.callbacks",
            yaml.safe_dump(listed),
        ]  # fmt: skip
    )
    assert isinstance(cli.theta0, FromCheckpoint)
    assert sum(isinstance(cb, Theta0Setup) for cb in cli.trainer.callbacks) == 1


def test_applying_theta0_again_to_a_module_that_holds_it_loads_nothing(tmp_path, monkeypatch):
    module = ImmunizationModule(LinearExtractor(4, 4, seed=1), LinearHead(4, 1, "binary"))
    torch.save({"state_dict": module.state_dict()}, tmp_path / "theta0.ckpt")
    target = ImmunizationModule(LinearExtractor(4, 4, seed=2), LinearHead(4, 1, "binary"))
    source = FromCheckpoint(tmp_path / "theta0.ckpt")
    info = source.apply(target, None)
    assert torch.equal(target.extractor.linear.weight, module.extractor.linear.weight)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("θ_0 was loaded twice"))
    assert source.apply(target, None) is info  # e.g. built before a fit, then in its setup
