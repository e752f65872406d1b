"""Attacker families: what of the released model an attacker trains.

- ``probe``: a linear head on frozen features (the paper's attacker, Section 3);
- ``probe-whitened``: the same on features whitened by the attacker's own covariance
  estimate of its training features — adaptive to a conditioning defence, which changes the
  features' condition number (Definition 3.1) and nothing a whitening attacker cannot undo;
- ``gd`` / ``adam``: full-batch gradient descent / Adam probes (the linear protocols'
  attackers with a searched step size);
- ``gd-exact``: the paper's attacker itself (Eq. 16): gradient descent with exact line search
  on the squared loss of a linear probe, from zero weights — nothing to search;
- ``finetune-immunized``: the parameters the immunization trained, plus the head;
- ``finetune-all``: every parameter, plus the head;
- ``lora``: LoRA adapters (``peft``) on the conv/linear layers of the trained blocks, plus
  the head.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from lightning_immunize.metrics import extract_features
from lightning_immunize.models import LinearExtractor, evaluating

PROBE_FAMILIES = ("probe", "probe-whitened", "gd", "adam", "gd-exact")
FULL_BATCH_FAMILIES = ("gd", "adam", "gd-exact")
#: Families with no hyperparameter: one trial per study.
DETERMINISTIC_FAMILIES = ("gd-exact",)
NETWORK_FAMILIES = ("finetune-immunized", "finetune-all", "lora")
FAMILIES = PROBE_FAMILIES + NETWORK_FAMILIES
#: LoRA adapters' rank and scale (``lora_alpha``), fixed for every model compared.
LORA_RANK = 8
LORA_ALPHA = 16
#: The whitening attacker keeps the directions of its covariance estimate whose eigenvalue
#: exceeds this fraction of the largest (an estimate from few samples is rank-deficient, and
#: whitening its null space would only amplify noise).
WHITENING_FLOOR = 1e-6
FEATURE_CHUNK = 512


def check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown attacker family {family!r}; expected one of {list(FAMILIES)}")


def supported_families(extractor: nn.Module) -> tuple[str, ...]:
    """Families that apply to ``extractor``: probes always; the network families need a
    non-linear extractor with trainable conv/linear layers."""
    if isinstance(extractor, LinearExtractor):
        return PROBE_FAMILIES
    return FAMILIES


def check_supported(extractor: nn.Module, family: str, name: str = "given") -> None:
    """Raise ``ValueError`` when ``family`` cannot attack ``extractor`` (the ``name`` model)."""
    check_family(family)
    supported = supported_families(extractor)
    if family not in supported:
        raise ValueError(
            f"attacker family {family!r} cannot attack the {name} model "
            f"({type(extractor).__name__}); it supports {list(supported)}"
        )
    if family in ("finetune-immunized", "lora") and not _trained_parameter_names(extractor):
        raise ValueError(
            f"attacker family {family!r} trains the blocks the immunization trained, but "
            f"{type(extractor).__name__} has no parameter with requires_grad"
        )
    if family == "lora" and not lora_target_modules(extractor):
        raise ValueError(
            f"attacker family 'lora' needs conv or linear layers in the trained blocks of "
            f"{type(extractor).__name__}; found none"
        )


def _trained_parameter_names(extractor: nn.Module) -> list[str]:
    return [n for n, p in extractor.named_parameters() if p.requires_grad]


def lora_target_modules(extractor: nn.Module) -> list[str]:
    """Names of the ``nn.Conv2d``/``nn.Linear`` layers whose weights the immunization trained."""
    trained = set(_trained_parameter_names(extractor))
    return [
        name
        for name, module in extractor.named_modules()
        if isinstance(module, (nn.Conv2d, nn.Linear)) and f"{name}.weight" in trained
    ]


@torch.no_grad()
def frozen_features(extractor: nn.Module, x: Tensor) -> Tensor:
    """Features ``(N, K)`` of inputs ``x`` in eval mode, in the extractor's dtype."""
    dtype = next((p.dtype for p in extractor.parameters()), x.dtype)
    with evaluating(extractor):
        return extract_features(extractor, x, FEATURE_CHUNK).to(dtype)


def whitening(z: Tensor) -> tuple[Tensor, Tensor]:
    """``(mean, W)`` such that ``(z − mean) @ W`` has identity covariance on the span of the
    attacker's own samples ``z`` ``(N, K)``; ``W`` is ``(K, r)``, ``r`` the number of
    covariance eigenvalues above ``WHITENING_FLOOR`` × the largest (float64).

    Example:
        >>> scale = torch.tensor([10.0, 1.0, 0.1, 0.0], dtype=torch.float64)
        >>> z = torch.randn(50, 4, dtype=torch.float64) * scale
        >>> mean, w = whitening(z)
        >>> cov = torch.cov(((z - mean) @ w).T)
        >>> w.shape[1], bool(torch.allclose(cov, torch.eye(3, dtype=torch.float64), atol=1e-8))
        (3, True)
    """
    z64 = z.double()
    mean = z64.mean(0)
    centered = z64 - mean
    cov = centered.T @ centered / max(z64.shape[0] - 1, 1)
    evals, evecs = torch.linalg.eigh(cov)
    keep = evals > WHITENING_FLOOR * evals.max().clamp_min(torch.finfo(torch.float64).tiny)
    w = evecs[:, keep] * evals[keep].rsqrt()
    return mean.to(z.dtype), w.to(z.dtype)


def prepare_features(
    extractor: nn.Module, data, family: str, cache: dict | None = None
) -> tuple[nn.Module, Tensor, Tensor]:
    """``(nn.Identity(), train features, eval features)`` for a probe family; the frozen
    features come from ``cache`` when it holds them for this extractor and data."""
    check_supported(extractor, family)
    key = (id(extractor), data.name)
    if cache is not None and key in cache:
        z_train, z_eval = cache[key]
    else:
        z_train = frozen_features(extractor, data.train_x)
        z_eval = frozen_features(extractor, data.eval_x)
        if cache is not None:
            cache[key] = (z_train, z_eval)
    if family == "probe-whitened":
        mean, w = whitening(z_train)
        z_train, z_eval = (z_train - mean) @ w, (z_eval - mean) @ w
    return nn.Identity(), z_train, z_eval


def prepare_network(extractor: nn.Module, family: str) -> nn.Module:
    """A copy of ``extractor`` with the parameters ``family`` trains set to ``requires_grad``
    (LoRA adapters injected for ``lora``); ``extractor`` itself is untouched."""
    check_supported(extractor, family)
    targets = lora_target_modules(extractor) if family == "lora" else []
    model = copy.deepcopy(extractor)
    if family == "finetune-all":
        for p in model.parameters():
            p.requires_grad_(True)
    elif family == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        for p in model.parameters():
            p.requires_grad_(False)
        config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=targets)
        model = inject_adapter_in_model(config, model)
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)
    return model
