"""Shared fixtures: the command line run as a user runs it, and the digits runs that several
files read. Plain helpers (called with arguments from module-level code): ``support.helpers``."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

# Lightning must not be imported here (see support/helpers.py): caplog would miss its logs.
from support.helpers import fit_digits, run_cli, run_fit


@pytest.fixture(scope="session")
def cli() -> Callable[..., subprocess.CompletedProcess]:
    """``cli(*args, cwd=ROOT, timeout=300)``: runs ``lightning-immunize ARGS`` in a subprocess
    and returns it, stdout and stderr captured as text (:func:`support.helpers.run_cli`)."""
    return run_cli


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    """A digits fit of 5 epochs, in this process: its run folder (one per test module)."""
    return fit_digits(tmp_path_factory.mktemp("digits"), 5)


@pytest.fixture(scope="module")
def digits_cli_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A digits fit of 2 epochs, run as a user runs it (a subprocess): its run folder and the
    finished process (one per test module)."""
    root = tmp_path_factory.mktemp("digits")
    out = run_fit("digits", root, "--trainer.max_epochs", "2")
    assert out.returncode == 0, out.stderr[-3000:]
    return root / "lightning_logs" / "version_0", out
