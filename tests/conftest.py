"""Shared fixtures: the command line run as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUPPORT = Path(__file__).resolve().parent / "support"


def cli_env() -> dict[str, str]:
    """The environment of a ``lightning-immunize`` subprocess: this checkout first, and the
    fault-injection callbacks of ``tests/support`` importable from configs."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(SUPPORT), str(ROOT)])}


@pytest.fixture(scope="session")
def cli() -> Callable[..., subprocess.CompletedProcess]:
    """``cli(*args, cwd=ROOT)``: runs ``lightning-immunize ARGS`` in a subprocess (5 min at
    most) and returns it, stdout and stderr captured as text."""

    def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "lightning_immunize.cli", *args],
            cwd=cwd,
            env=cli_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )

    return run
