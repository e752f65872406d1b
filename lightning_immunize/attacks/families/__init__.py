"""Attacker families: what of the released model an attacker trains, one class each in one
registry (:mod:`.base`). The built-in ones:

- probes (:mod:`.probes`): ``probe``, ``probe-whitened``, ``gd``, ``adam``, ``gd-exact``;
- networks (:mod:`.networks`): ``finetune-immunized``, ``finetune-all``, ``lora``.

A new family is a subclass of :class:`AttackerFamily` decorated with
:func:`register_family`; nothing else needs editing.
"""

from __future__ import annotations

from torch import nn

from lightning_immunize.attacks.families.base import (
    BATCHNORM_CHOICES,
    FAMILY_REGISTRY,
    OPTIMIZERS,
    SCHEDULES,
    AttackerFamily,
    Prepared,
    check_family,
    check_supported,
    family_name,
    family_names,
    get_family,
    has_batchnorm,
    lr_factor,
    register_family,
    supported_families,
    unregister_family,
)
from lightning_immunize.attacks.families.networks import (
    LORA_ALPHA,
    LORA_RANK,
    FinetuneAll,
    FinetuneImmunized,
    Lora,
    NetworkFamily,
    lora_target_modules,
)
from lightning_immunize.attacks.families.preparation import frozen_features
from lightning_immunize.attacks.families.probes import (
    WHITENING_FLOOR,
    ExactLineSearch,
    FullBatchAdam,
    FullBatchGD,
    FullBatchProbe,
    Probe,
    WhitenedProbe,
    whitening,
)

#: The built-in families, by kind (the registry may hold more).
PROBE_FAMILIES = ("probe", "probe-whitened", "gd", "adam", "gd-exact")
FULL_BATCH_FAMILIES = ("gd", "adam", "gd-exact")
DETERMINISTIC_FAMILIES = ("gd-exact",)
NETWORK_FAMILIES = ("finetune-immunized", "finetune-all", "lora")
FAMILIES = PROBE_FAMILIES + NETWORK_FAMILIES


def prepare_network(extractor: nn.Module, family: str) -> nn.Module:
    """A copy of ``extractor`` with the parameters network family ``family`` trains set to
    ``requires_grad`` (LoRA adapters injected for ``lora``); ``extractor`` is untouched."""
    chosen = get_family(family)
    chosen.check(extractor)
    if not isinstance(chosen, NetworkFamily):
        raise ValueError(
            f"attacker family {family!r} does not train the network; expected one of "
            f"{[n for n, f in FAMILY_REGISTRY.items() if isinstance(f, NetworkFamily)]}."
        )
    return chosen.trainable_copy(extractor)


__all__ = [
    "AttackerFamily", "Prepared", "register_family", "unregister_family", "get_family",
    "check_family", "check_supported", "supported_families", "family_name", "family_names",
    "has_batchnorm", "lr_factor", "FAMILY_REGISTRY", "OPTIMIZERS", "SCHEDULES", "BATCHNORM_CHOICES",
    "NetworkFamily", "FinetuneImmunized", "FinetuneAll", "Lora", "lora_target_modules",
    "LORA_RANK", "LORA_ALPHA", "Probe", "WhitenedProbe", "FullBatchGD", "FullBatchAdam",
    "FullBatchProbe", "ExactLineSearch", "whitening", "WHITENING_FLOOR", "frozen_features",
    "prepare_network",
    "PROBE_FAMILIES", "FULL_BATCH_FAMILIES", "DETERMINISTIC_FAMILIES", "NETWORK_FAMILIES",
    "FAMILIES",
]  # fmt: skip
