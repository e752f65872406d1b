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
