"""The README's pipeline example runs as written, importing from the top-level package."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _pipeline_example() -> str:
    text = README.read_text()
    section = text[text.index("## Use it in your own pipeline") :]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "the README's pipeline section has no python block"
    return match.group(1)


@pytest.mark.slow
def test_readme_pipeline_example_runs(tmp_path, monkeypatch):
    code = _pipeline_example()
    assert "from lightning_immunize import (" in code
    monkeypatch.chdir(tmp_path)  # the example writes lightning_logs/ into the working folder
    exec(compile(code, str(README), "exec"), {"__name__": "readme_example"})
    (report,) = tmp_path.glob("lightning_logs/version_*/immunization.json")
    figures = json.loads(report.read_text())
    assert {"rir", "ratio_harmful", "ratio_pretrain", "immunized"} <= set(figures)


def test_readme_own_method_example_registers_a_method_that_trains():
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import TensorDataset

    from lightning_immunize import PairedDataModule
    from lightning_immunize.objectives import unregister_objective

    text = README.read_text()
    section = text[text.index("### Your own method") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {"__name__": "readme_own_method"}
    try:
        exec(compile(code, str(README), "exec"), namespace)
        model = namespace["model"]
        assert model.objective.name == "shrink"
        data = PairedDataModule(
            TensorDataset(torch.randn(64, 32), torch.randint(0, 2, (64,)).float()),
            TensorDataset(torch.randn(64, 32), torch.randint(0, 2, (64,)).float()),
            batch_size=32,
        )
        before = model.extractor.linear.weight.detach().clone()
        quiet = {"enable_progress_bar": False, "enable_model_summary": False}
        trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, **quiet)
        trainer.fit(model, data)
        assert not torch.equal(model.extractor.linear.weight, before)
    finally:
        unregister_objective("shrink")
