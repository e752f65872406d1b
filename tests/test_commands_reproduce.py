"""The reproduce runner: planning, resuming without repeats, summary and figures; baselines."""

from __future__ import annotations

import math

import pytest
import torch

import lightning_immunize.commands.reproduce as experiments
from lightning_immunize.commands.reproduce import plan_runs, read_runs, run_sweep
from lightning_immunize.evaluation.tables import summary_table
from lightning_immunize.models import LinearExtractor, LinearHead
from lightning_immunize.module import ImmunizationModule
from lightning_immunize.objectives import OBJECTIVES, make_objective

PAIRS = [(0, 1), (3, 8)]


def test_plan_covers_every_pair_seed_and_method():
    runs = plan_runs("digits", ["reference", "ours"], [1, 2], None)
    assert len(runs) == 90 * 2 * 2 and len({r.key for r in runs}) == len(runs)
    assert len(plan_runs("house-prices", ["ours", "opt"], [1, 2, 3], None)) == 6
    with pytest.raises(ValueError, match=r"unknown method 'magic'; expected one of 'reference'"):
        plan_runs("digits", ["magic"], [1], None)


def test_sweep_resumes_after_interruption_without_repeating(tmp_path, monkeypatch):
    real = experiments._execute
    calls = []

    def failing_after_two(spec, run, curves_dir):
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated interruption")
        calls.append(run.key)
        return real(spec, run, curves_dir)

    monkeypatch.setattr(experiments, "_execute", failing_after_two)
    with pytest.raises(KeyboardInterrupt):
        run_sweep("digits", tmp_path, ["reference", "ours"], [1], PAIRS, progress=False)
    first = read_runs(tmp_path / "runs.csv")
    assert len(first) == 2

    monkeypatch.setattr(
        experiments, "_execute", lambda s, r, c: calls.append(r.key) or real(s, r, c)
    )
    table = run_sweep("digits", tmp_path, ["reference", "ours"], [1], PAIRS, progress=False)
    rows = read_runs(tmp_path / "runs.csv")
    assert len(rows) == 4 and rows[:2] == first
    assert len(calls) == 4 and len(set(calls)) == 4  # nothing ran twice
    text = table.read_text()
    assert "| ours | 2 |" in text and "| reference (identity) | 2 |" in text
    assert (tmp_path / "heatmap_ours.png").stat().st_size > 5_000
    identity = [r for r in rows if r["method"] == "reference"]
    assert all(float(r["rir"]) == pytest.approx(1.0) for r in identity)

    monkeypatch.setattr(
        experiments, "_execute", lambda *a: pytest.fail("a finished run was repeated")
    )
    run_sweep("digits", tmp_path, ["reference", "ours"], [1], PAIRS, progress=False)


def test_summary_table_counts_immunized():
    rows = [
        {
            "method": "ours",
            "rir": "4",
            "ratio_harmful": "2",
            "ratio_pretrain": "0.5",
            "immunized": "True",
            "task_metric": "1",
            "task_metric_name": "accuracy",
            "seconds": "1",
        },
        {
            "method": "ours",
            "rir": "0.5",
            "ratio_harmful": "0.5",
            "ratio_pretrain": "1",
            "immunized": "False",
            "task_metric": "1",
            "task_metric_name": "accuracy",
            "seconds": "3",
        },
    ]
    table = summary_table(rows)
    assert "| ours | 2 | 1.25 ± 0.75 | 0.75 ± 0.25 | 2.25 ± 1.75 | 2.25 | 1 / 2 |" in table


@pytest.mark.parametrize("method", sorted(OBJECTIVES))
def test_every_objective_takes_a_finite_step(method):
    torch.manual_seed(0)
    module = ImmunizationModule(
        LinearExtractor(6, 6, seed=0).double(),
        LinearHead(6, 1, "binary").double(),
        method=method,
    )
    module.manual_backward = lambda loss: loss.backward()
    gen = torch.Generator().manual_seed(0)
    batch = {
        "pretrain": (
            torch.randn(16, 6, generator=gen, dtype=torch.float64),
            torch.zeros(16, dtype=torch.float64),
        ),
        "harmful": (
            torch.randn(16, 6, generator=gen, dtype=torch.float64),
            torch.ones(16, dtype=torch.float64),
        ),
    }
    out = module.objective.backward(module, batch)
    grad = module.extractor.linear.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert all(math.isfinite(float(v)) for v in out.logs.values())
    assert module.objective.name == method


def test_imma_differentiates_through_the_inner_steps():
    objective = make_objective("imma", lambda_harmful=1.0, inner_steps=3, inner_lr=0.5)
    torch.manual_seed(0)
    module = ImmunizationModule(
        LinearExtractor(4, 4, seed=0).double(),
        LinearHead(4, 1, "regression").double(),
        objective,
    )
    module.manual_backward = lambda loss: loss.backward()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(12, 4, generator=gen, dtype=torch.float64)
    batch = {
        "pretrain": (x, torch.zeros(12, dtype=torch.float64)),
        "harmful": (x * 2, torch.randn(12, generator=gen, dtype=torch.float64)),
    }
    objective.backward(module, batch)
    with_inner = module.extractor.linear.weight.grad.clone()
    module.zero_grad()
    objective.inner_steps = 1
    objective.backward(module, batch)
    assert not torch.allclose(with_inner, module.extractor.linear.weight.grad)


def test_method_and_objective_are_exclusive():
    with pytest.raises(ValueError, match="either objective or method"):
        ImmunizationModule(
            LinearExtractor(2, 2),
            LinearHead(2, 1, "binary"),
            objective=make_objective("ours"),
            method="opt",
        )


def test_old_identity_rows_and_name_still_work(tmp_path, monkeypatch):
    """Runs recorded as ``identity`` (the reference row's old name) count as done; the old
    name on the command line maps to ``reference`` with a DeprecationWarning."""
    with pytest.warns(DeprecationWarning, match="'identity' is now called 'reference'"):
        runs = plan_runs("digits", ["identity"], [1], [(0, 1)])
    assert [r.method for r in runs] == ["reference"]
    (tmp_path / "runs.csv").write_text(
        "method,seed,pretrain,harmful,rir,ratio_harmful,ratio_pretrain,immunized,seconds\n"
        "identity,1,0,1,1.0,1.0,1.0,False,0.1\n"
    )
    monkeypatch.setattr(
        experiments, "_execute", lambda *a: pytest.fail("a finished run was repeated")
    )
    table = run_sweep("digits", tmp_path, ["reference"], [1], [(0, 1)], progress=False)
    assert read_runs(tmp_path / "runs.csv")[0]["method"] == "reference"
    assert "| reference (identity) | 1 |" in table.read_text()


def test_every_registered_method_can_be_planned_and_a_new_one_too():
    from lightning_immunize.objectives import Objective, register_objective, unregister_objective

    assert [
        r.method for r in plan_runs("house-prices", ["sophon", "tar", "ours_sa"], [1], None)
    ] == [
        "sophon",
        "tar",
        "ours_sa",
    ]

    class Plain(Objective):
        name = "plain"

    register_objective("plain", Plain)
    try:
        assert [r.method for r in plan_runs("house-prices", ["plain"], [1], None)] == ["plain"]
        with pytest.raises(ValueError, match="'plain' is taken"):
            register_objective("plain", Plain)
    finally:
        unregister_objective("plain")
    with pytest.raises(ValueError, match="unknown method 'plain'"):
        plan_runs("house-prices", ["plain"], [1], None)
