"""Deprecated path: the attacker-aware objectives live in
:mod:`lightning_immunize.objectives.attacker_aware`; this name goes away in the next release."""

import warnings

from lightning_immunize.objectives.attacker_aware import *  # noqa: F403
from lightning_immunize.objectives.attacker_aware import __all__  # noqa: F401

warnings.warn(
    "lightning_immunize.attacker_aware is deprecated: import from "
    "lightning_immunize.objectives (class_path: lightning_immunize.objectives.<Class> in "
    "configs); the old path goes away in the next release.",
    DeprecationWarning,
    stacklevel=2,
)
