"""``lightning-immunize fit`` (and ``validate``, ``test``): LightningCLI on a YAML config.

At the end of ``fit`` the relative immunization ratio (Eq. 15) is computed on the training
split, printed, and written to ``immunization.json`` in the run's log directory.
"""

from __future__ import annotations

import signal
from collections.abc import Sequence

__all__ = ["DESCRIPTION", "NAMES", "main"]

#: LightningCLI's own subcommands, run on the same configs.
NAMES = ("fit", "validate", "test")
SUMMARY = "train (immunize) a model from a YAML config: --config configs/<name>.yaml"
DESCRIPTION = "Model immunization from a condition-number perspective (ICML 2025)."


def main(argv: Sequence[str] | None) -> int:
    """Run LightningCLI on ``argv`` (the subcommand first); ``None``: it reads ``sys.argv``.

    Raises:
        Interrupted: the fit was stopped by SIGTERM (Lightning's own stop, a ``SystemExit``
            with status 0, is turned into ours, so the CLI says how to resume).
    """
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from lightning_immunize.build import ImmunizationCLI, known_noise_filtered
    from lightning_immunize.interruption import Interrupted, stop_requests

    try:
        with known_noise_filtered():
            ImmunizationCLI(
                argv,
                save_config_kwargs={"overwrite": True},
                parser_kwargs={"description": DESCRIPTION},
            )
    except SIGTERMException as stop:
        raise Interrupted(signal.SIGTERM, stop_requests.detail) from stop
    return 0
