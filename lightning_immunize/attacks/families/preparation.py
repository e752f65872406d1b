"""What families compute once per model and data: BatchNorm statistics recomputed on the
attacker's samples, frozen features, and the output of a network's frozen prefix."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from lightning_immunize.attacks.families.base import BATCHNORMS
from lightning_immunize.metrics import extract_features
from lightning_immunize.models import evaluating

#: Samples per forward pass when features or statistics are computed (memory only).
FEATURE_CHUNK = 512
RECALIBRATION_CHUNK = 256


def memoised(cache: dict | None, key: tuple, data, make):
    """``make()`` memoised in ``cache`` under ``key``; ``data`` is kept alive beside the value
    (keys hold ``id``s, which Python may reuse once an object is gone)."""
    if cache is None:
        return make()
    if key not in cache:
        cache[key] = (data, make())
    return cache[key][1]


def recalibrated(extractor: nn.Module, data, batchnorm: str, cache: dict | None) -> nn.Module:
    """``extractor`` itself (``batchnorm="keep"``) or a copy whose BatchNorm running
    statistics are recomputed on ``data.train_x`` (:func:`recalibrate_batchnorm`)."""
    if batchnorm == "keep":
        return extractor

    def make() -> nn.Module:
        model = copy.deepcopy(extractor)
        recalibrate_batchnorm(model, data.train_x)
        return model

    return memoised(cache, ("recalibrated", id(extractor), id(data)), data, make)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, x: Tensor) -> nn.Module:
    """Recompute the running statistics of every BatchNorm layer of ``model`` — frozen ones
    included — as the cumulative average over ``x`` ``(N, …)`` (what
    ``torch.optim.swa_utils.update_bn`` does, except that ``update_bn`` calls
    ``model.train()``, which a model keeping its frozen blocks in eval mode answers by leaving
    their BatchNorm layers out). Every other layer runs in eval mode. Returns ``model``.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)).eval()
        >>> _ = recalibrate_batchnorm(net, torch.full((8, 3), 2.0))
        >>> int(net[1].num_batches_tracked), net.training, net[1].training
        (1, False, False)
    """
    norms = [m for m in model.modules() if isinstance(m, BATCHNORMS) and m.track_running_stats]
    if not norms:
        return model
    modes = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in norms}
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the batches
        m.train()
    dtype = next((p.dtype for p in model.parameters()), x.dtype)
    try:
        for i in range(0, x.shape[0], RECALIBRATION_CHUNK):
            model(x[i : i + RECALIBRATION_CHUNK].to(dtype))
    finally:
        for m, momentum in momenta.items():
            m.momentum = momentum
        for m, mode in modes.items():
            m.training = mode
    return model


@torch.no_grad()
def frozen_features(extractor: nn.Module, x: Tensor) -> Tensor:
    """Features ``(N, K)`` of inputs ``x`` in eval mode, in the extractor's dtype."""
    dtype = next((p.dtype for p in extractor.parameters()), x.dtype)
    with evaluating(extractor):
        return extract_features(extractor, x, FEATURE_CHUNK).to(dtype)


def cached_features(
    extractor: nn.Module, data, batchnorm: str, cache: dict | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Frozen features of ``data``'s train, eval and scoring splits, after the attacker's
    BatchNorm choice."""
    model = recalibrated(extractor, data, batchnorm, cache)

    def make():
        score = None if data.score_x is None else frozen_features(model, data.score_x)
        return frozen_features(model, data.train_x), frozen_features(model, data.eval_x), score

    return memoised(cache, ("features", id(extractor), id(data), batchnorm), data, make)


def _sequence(model: nn.Module) -> tuple[nn.Module, list[tuple[str, nn.Module]]]:
    """The innermost single-child wrapper of ``model`` and its children, in order."""
    inner = model
    while len(children := list(inner.named_children())) == 1:
        inner = children[0][1]
    return inner, list(inner.named_children())


@torch.no_grad()
def split_frozen_prefix(
    model: nn.Module, probe: Tensor
) -> tuple[nn.Sequential, nn.Sequential] | None:
    """``(prefix, rest)`` with ``rest(prefix(x)) == model(x)`` and no trainable parameter in
    ``prefix`` — the children of ``model`` (through single-child wrappers such as
    :class:`~lightning_immunize.models.TimmBackbone`) before the first one that trains —
    or ``None`` when the children do not chain into the model's forward (checked on
    ``probe``, a couple of inputs, in eval mode) or the first child trains."""
    _, children = _sequence(model)
    first = next(
        (i for i, (_, m) in enumerate(children) if any(p.requires_grad for p in m.parameters())),
        None,
    )
    if not first:
        return None
    prefix = nn.Sequential(*[m for _, m in children[:first]])
    rest = nn.Sequential(*[m for _, m in children[first:]])
    dtype = next((p.dtype for p in model.parameters()), probe.dtype)
    with evaluating(model):
        try:
            chained = rest(prefix(probe.to(dtype)))
        except Exception:  # noqa: BLE001 - a forward that is not a chain of its children
            return None
        whole = model(probe.to(dtype))
    if chained.shape != whole.shape or not torch.allclose(chained, whole, rtol=1e-5, atol=1e-6):
        return None
    return prefix, rest


@torch.no_grad()
def prefix_outputs(prefix: nn.Module, x: Tensor) -> Tensor:
    """``prefix`` (frozen, eval mode) applied to ``x`` in chunks."""
    dtype = next((p.dtype for p in prefix.parameters()), x.dtype)
    with evaluating(prefix):
        return torch.cat(
            [
                prefix(x[i : i + FEATURE_CHUNK].to(dtype))
                for i in range(0, x.shape[0], FEATURE_CHUNK)
            ]
        )
