"""`lightning-immunize fit --help`: every option of our classes says what it is, and the
extractor/head options list our classes, not every ``torch.nn.Module`` (issue item 7).

LightningCLI (jsonargparse) takes an option's description from the ``Args:`` entry of the
class docstring with exactly that parameter's name; an option without one shows only
``(type: ..., default: ...)``.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from jsonargparse import ArgumentParser

from lightning_immunize.callbacks import (
    ConditionNumberMonitor,
    ImmunizationReport,
    PretrainFromScratch,
    ProbingCallback,
    RIRCallback,
)
from lightning_immunize.cli import main
from lightning_immunize.datamodules import (
    DigitsPairDataModule,
    MNISTHalvesDataModule,
    MNISTPairDataModule,
    PairedDataModule,
)
from lightning_immunize.models import LinearExtractor, LinearHead, TimmBackbone
from lightning_immunize.module import ImmunizationModule
from lightning_immunize.objectives import (
    ConditionNumberObjective,
    ConditionNumberOptObjective,
    IMMAObjective,
    RMaxOnlyObjective,
)
from lightning_immunize.theta0 import FromCheckpoint, FromScratch

REPO = Path(__file__).resolve().parents[1]
DIGITS = str(REPO / "configs" / "digits.yaml")

#: Every class whose constructor a config sets: each public argument needs an ``Args:`` entry.
OUR_CLASSES = [
    ImmunizationModule,
    ConditionNumberObjective,
    RMaxOnlyObjective,
    ConditionNumberOptObjective,
    IMMAObjective,
    LinearExtractor,
    LinearHead,
    TimmBackbone,
    PairedDataModule,
    DigitsPairDataModule,
    MNISTPairDataModule,
    MNISTHalvesDataModule,
    ImmunizationReport,
    RIRCallback,
    ConditionNumberMonitor,
    ProbingCallback,
    PretrainFromScratch,
    FromScratch,
    FromCheckpoint,
]

#: ``fit --help`` was ~1,930 lines, ~1,350 of them the nn.Module subclasses listed under
#: ``--model.extractor`` and ``--model.head``; without them it is ~600 (at 80 columns), most
#: of it Lightning's own ``--trainer.*`` options. The bound leaves room for those to grow.
MAX_HELP_LINES = 800

_TYPE_SUFFIX = re.compile(r"\((?:required, )?type: ")


def _help(monkeypatch: pytest.MonkeyPatch, *args: str) -> str:
    """What ``lightning-immunize <args>`` prints (``--help`` exits with status 0)."""
    monkeypatch.setenv("COLUMNS", "80")  # the line counts depend on the width
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        main(list(args))
    assert exit_info.value.code in (0, None)
    return out.getvalue()


def _option_texts(help_text: str) -> dict[str, str]:
    """``{option: its whole help text}`` of an argparse help, wrapped lines joined."""
    options: dict[str, list[str]] = {}
    current: str | None = None
    for line in help_text.splitlines():
        if line.startswith("  --"):
            parts = re.split(r"\s{2,}", line.strip(), maxsplit=1)
            current = parts[0].split(" ")[0]
            options[current] = parts[1:]
        elif current is not None and line.startswith("    "):
            options[current].append(line.strip())
        else:
            current = None
    return {name: " ".join(lines) for name, lines in options.items()}


def _options(help_text: str) -> dict[str, str]:
    """``{option: description}``: the help text without jsonargparse's
    ``(type: ..., default: ...)`` suffix."""
    return {
        name: _TYPE_SUFFIX.split(text)[0].strip() for name, text in _option_texts(help_text).items()
    }


def _undescribed(help_text: str, prefix: str) -> list[str]:
    return [
        name for name, text in _options(help_text).items() if name.startswith(prefix) and not text
    ]


def test_options_parser_reads_descriptions():
    text = (
        "usage: x\n\noptions:\n"
        "  --a.b B               the b. (type: int, default: 1)\n"
        "  --a.c C\n"
        "                        (type: float | null, default: null)\n"
        "  --a.d D\n"
        "                        two\n"
        "                        lines (required, type: Module)\n"
    )
    assert _options(text) == {"--a.b": "the b.", "--a.c": "", "--a.d": "two lines"}


@pytest.fixture(scope="module")
def fit_help() -> str:
    with pytest.MonkeyPatch.context() as mp:
        return _help(mp, "fit", "--config", DIGITS, "--help")


def test_every_model_option_is_described(fit_help: str):
    options = _options(fit_help)
    for name in (
        "--model.method",
        "--model.method_args",
        "--model.extractor_lr",
        "--model.head_lr",
        "--model.extractor_weight_decay",
        "--model.head_weight_decay",
        "--model.scheduler_interval",
    ):
        assert options.get(name), f"{name} has no description in `fit --help`"
    assert _undescribed(fit_help, "--model.") == []
    assert _undescribed(fit_help, "--data") == []


@pytest.mark.parametrize(
    ("option", "class_name", "prefix"),
    [
        ("--data.help", "DigitsPairDataModule", "--data."),
        ("--model.objective.help", "ConditionNumberObjective", "--model.objective."),
        ("--model.extractor.help", "LinearExtractor", "--model.extractor."),
        ("--model.head.help", "LinearHead", "--model.head."),
        ("--trainer.callbacks.help", "lightning_immunize.callbacks.RIRCallback", "--trainer."),
    ],
)
def test_every_option_of_a_digits_class_is_described(monkeypatch, option, class_name, prefix):
    text = _help(monkeypatch, "fit", "--config", DIGITS, option, class_name)
    assert len([n for n in _options(text) if n.startswith(prefix)]) >= 1, text
    assert _undescribed(text, prefix) == []


@pytest.mark.parametrize("cls", OUR_CLASSES, ids=lambda c: c.__name__)
def test_every_constructor_argument_has_an_args_entry(cls):
    parser = ArgumentParser()
    parser.add_class_arguments(cls, "x", fail_untyped=False)
    helps = {
        option[len("--x.") :]: action.help
        for action in parser._actions
        for option in action.option_strings
        if option.startswith("--x.") and option.count(".") == 1
    }
    params = [
        name
        for name, p in inspect.signature(cls.__init__).parameters.items()
        if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    assert params
    assert [name for name in params if not helps.get(name)] == []


def test_help_lists_our_extractors_and_heads_not_every_module(fit_help: str):
    texts = _option_texts(fit_help)
    for option, ours in (
        ("--model.extractor", ["LinearExtractor", "TimmBackbone"]),
        ("--model.head", ["LinearHead"]),
    ):
        assert _options(fit_help)[option], f"{option} has no description"
        for name in ours:
            assert f"lightning_immunize.{name}" in texts[option], texts[option]
    assert "torch.nn.ReLU" not in fit_help and "torchvision.models" not in fit_help


def _console_script(*args: str) -> subprocess.CompletedProcess:
    script = shutil.which("lightning-immunize")
    command = [script] if script else [sys.executable, "-m", "lightning_immunize.cli"]
    env = {**os.environ, "COLUMNS": "80"}  # the line counts depend on the width
    return subprocess.run(
        [*command, *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=300
    )


def test_help_line_counts():
    # In a fresh process, as a newcomer runs it: which subclasses a help lists depends on
    # what has been imported.
    counts = {}
    for args in (["fit", "--help"], ["fit", "--config", DIGITS, "--help"]):
        result = _console_script(*args)
        assert result.returncode == 0, result.stderr[-2000:]
        counts[" ".join(args)] = result.stdout.count("\n")
    assert all(n < MAX_HELP_LINES for n in counts.values()), counts


@pytest.mark.parametrize(
    "extractor",
    [
        {"class_path": "torch.nn.Linear", "init_args": {"in_features": 64, "out_features": 64}},
        {"class_path": "torch.nn.Sequential"},
        {
            "class_path": "torchvision.models.resnet.ResNet",
            "init_args": {"block": "torchvision.models.resnet.BasicBlock", "layers": [1, 1, 1, 1]},
        },
    ],
    ids=["Linear", "Sequential", "torchvision-ResNet"],
)
def test_any_torch_module_is_still_accepted_as_extractor(extractor):
    from lightning_immunize.build import instantiate

    cli = instantiate(
        [
            "--config",
            DIGITS,
            "--trainer.logger",
            "false",
            "--model.objective.init_args.preconditioner",
            "none",
            "--model.extractor",
            json.dumps(extractor),
        ]
    )
    assert type(cli.model.extractor).__name__ == extractor["class_path"].rsplit(".", 1)[1]
