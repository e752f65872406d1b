"""Renamed public names keep working for one release, with a DeprecationWarning."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from lightning_immunize.models import ClassifierHead, LinearHead
from lightning_immunize.objectives import ConditionNumberOptObjective, IMMAObjective


def test_classifier_head_is_a_deprecated_linear_head():
    with pytest.warns(DeprecationWarning, match="LinearHead"):
        head = ClassifierHead(4, 1, "binary")
    assert isinstance(head, LinearHead)
    assert set(head.state_dict()) == set(LinearHead(4, 1, "binary").state_dict())


def test_baselines_lambda_is_deprecated_and_maps_to_the_shared_names():
    with pytest.warns(DeprecationWarning, match="lambda_pretrain and lambda_harmful"):
        opt = ConditionNumberOptObjective(lambda_=0.5)
    assert (opt.lambda_pretrain, opt.lambda_harmful) == (0.5, 0.5)
    with pytest.warns(DeprecationWarning, match="lambda_harmful"):
        imma = IMMAObjective(lambda_=0.25)
    assert imma.lambda_harmful == 0.25
    assert "lambda_" not in opt.hyperparameters()


def test_old_preconditioning_context_manager_warns():
    from lightning_immunize.preconditioning import PreconditionedLinear, preconditioning

    layer = PreconditionedLinear(3, 2, bias=False, precondition=False)
    with pytest.warns(DeprecationWarning, match="preconditioning_enabled"):
        with preconditioning(layer, enabled=True):
            assert layer.precondition
    assert not layer.precondition


def test_callbacks_old_function_names_warn():
    import lightning_immunize.callbacks as callbacks
    from lightning_immunize.evaluation.report import immunization_report

    with pytest.warns(DeprecationWarning, match="lightning_immunize.evaluation.report"):
        assert callbacks.immunization_report is immunization_report
    assert "immunization_report" not in callbacks.__all__


def test_objectives_still_importable_from_module():
    from lightning_immunize import module, objectives

    assert module.ConditionNumberObjective is objectives.ConditionNumberObjective


@pytest.mark.parametrize(
    "first",
    [
        "import lightning_immunize.preconditioning",
        "from lightning_immunize import convert_linear_layers",
    ],
)
def test_preconditioning_attribute_is_the_submodule_whatever_the_import_order(first):
    code = (
        f"{first}\n"
        "import lightning_immunize as li, types\n"
        "assert isinstance(li.preconditioning, types.ModuleType), li.preconditioning\n"
        "from lightning_immunize import preconditioning\n"
        "assert isinstance(preconditioning, types.ModuleType)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_top_level_names_resolve():
    import lightning_immunize as li

    for name in li.__all__:
        assert getattr(li, name) is not None, name
    assert li.ImmunizationModule.__name__ == "ImmunizationModule"
    assert torch.is_tensor(li.condition_number(torch.eye(2)))


@pytest.mark.parametrize(
    ("old", "name", "new"),
    [
        ("lightning_immunize.experiments", "run_sweep", "lightning_immunize.commands.reproduce"),
        (
            "lightning_immunize.experiments",
            "attack_checkpoint",
            "lightning_immunize.commands.attack",
        ),
        ("lightning_immunize.experiments", "probe_table", "lightning_immunize.evaluation.tables"),
        ("lightning_immunize.module", "ConditionNumberObjective", "lightning_immunize.objectives"),
        ("lightning_immunize.module", "OBJECTIVES", "lightning_immunize.objectives"),
        (
            "lightning_immunize.attacks.attacker",
            "run_attack",
            "lightning_immunize.attacks.training",
        ),
    ],
)
def test_moved_names_still_import_with_a_warning_naming_the_new_home(old, name, new):
    import importlib

    with pytest.warns(DeprecationWarning, match=new.replace(".", r"\.")):
        value = getattr(importlib.import_module(old), name)
    assert value is getattr(importlib.import_module(new), name)


def test_the_old_attacker_aware_module_warns_and_hands_on_the_same_classes():
    import importlib
    import sys

    sys.modules.pop("lightning_immunize.attacker_aware", None)
    with pytest.warns(DeprecationWarning, match="lightning_immunize.objectives"):
        old = importlib.import_module("lightning_immunize.attacker_aware")
    from lightning_immunize.objectives import SimulatedAttackObjective

    assert old.SimulatedAttackObjective is SimulatedAttackObjective


def test_pretrain_from_scratch_warns_and_is_the_from_scratch_source(tmp_path):
    from lightning_immunize.callbacks import PretrainFromScratch
    from lightning_immunize.theta0 import FromScratch

    with pytest.warns(DeprecationWarning, match="theta0"):
        callback = PretrainFromScratch(cache_dir=tmp_path, epochs=2, max_epochs=4)
    assert isinstance(callback.source, FromScratch)
    assert callback.recipe == FromScratch(cache_dir=tmp_path, epochs=2, max_epochs=4).recipe
