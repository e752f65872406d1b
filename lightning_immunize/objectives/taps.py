"""Which layers of an extractor an objective looks inside, and what flows through them.

The every-block objectives (:mod:`.layerwise`, :mod:`.erasure`) regularize activations in the
middle of the extractor, not only its output features. They name layers as
:class:`~lightning_immunize.models.TimmBackbone`'s ``trainable`` does (relative to the timm
model, ``"layer3"``, ``"layer4.0.conv1"``), or relative to the extractor for any other
module, and record a layer's input or output with forward hooks during the forward the
module runs anyway (:meth:`ObjectiveHost.features`), so no layer is run twice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager

from torch import Tensor, nn

from lightning_immunize.models import TimmBackbone, evaluating
from lightning_immunize.objectives.base import Objective, ObjectiveHost, check_lambda
from lightning_immunize.validation import unknown_choice

__all__ = [
    "BATCHNORM_MODES",
    "HEAD_INPUT",
    "batchnorm_mode",
    "check_batchnorm_modes",
    "LayerChoice",
    "LayeredObjective",
    "TAP_POINTS",
    "check_weights",
    "layer_root",
    "recording",
    "resolve_layers",
    "tapped_layers",
    "trainable_layers",
]

#: The name of the classifier's input (the extractor's output features) among the layers.
HEAD_INPUT = "head"

#: How BatchNorm normalises a D_H forward: with the batch's own statistics (what an attacker
#: who recalibrates BatchNorm on harmful images sees) or with the running ones from D_P (an
#: attacker who keeps them); the durability card searches both.
BATCHNORM_MODES = ("batch", "running")
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)

#: What a tap records: the layer's input (K-FAC's activation factor) or its output (a block's
#: representation).
TAP_POINTS = ("input", "output")


def layer_root(extractor: nn.Module) -> nn.Module:
    """The module layer names are relative to: a TimmBackbone's timm model (as its
    ``trainable``), otherwise the extractor itself."""
    return extractor.model if isinstance(extractor, TimmBackbone) else extractor


def resolve_layers(extractor: nn.Module, names: Sequence[str]) -> dict[str, nn.Module]:
    """``{name: sub-module}`` for ``names`` (relative to :func:`layer_root`), in order.

    Raises:
        ValueError: for no names, a repeated name, or a name that is not a sub-module; the
            message lists the top-level children one may use.
    """
    if isinstance(names, str):
        names = [names]
    if not names:
        raise ValueError("layers is empty; expected at least one layer name.")
    root = layer_root(extractor)
    found: dict[str, nn.Module] = {}
    for name in names:
        if name in found:
            raise ValueError(f"layer {name!r} is named twice; expected each layer once.")
        try:
            found[name] = root.get_submodule(name)
        except AttributeError:
            children = ", ".join(repr(n) for n, _ in root.named_children()) or "none"
            raise ValueError(
                f"layer {name!r} is not a sub-module of {type(root).__name__}; expected a "
                f"dotted name under one of its children: {children}."
            ) from None
    return found


def tapped_layers(extractor: nn.Module, names: Sequence[str]) -> dict[str, nn.Module]:
    """:func:`resolve_layers` of ``names`` without :data:`HEAD_INPUT` (the features, which
    the objective has without a hook); ``{}`` when that is all there is."""
    inner = [n for n in names if n != HEAD_INPUT]
    return resolve_layers(extractor, inner) if inner else {}


def check_weights(
    what: str, weights: Mapping[str, float] | None, names: Sequence[str] | None = None
) -> dict[str, float]:
    """``weights`` (``{layer: w ≥ 0}``) as floats; with ``names``, also that each key is one
    of them.

    Raises:
        TypeError: if ``weights`` is not a mapping.
        ValueError: for a negative or non-finite weight, or a key not in ``names``.
    """
    if weights is None:
        return {}
    if not isinstance(weights, Mapping):
        raise TypeError(f"{what} must be a mapping of layer name to weight, got {weights!r}.")
    checked = {str(k): check_lambda(f"{what}[{k!r}]", v) for k, v in weights.items()}
    unknown = sorted(set(checked) - set(names)) if names is not None else []
    if unknown:
        raise ValueError(
            f"{what} names {', '.join(map(repr, unknown))}, which are not regularized; "
            f"expected some of {', '.join(map(repr, names or []))}."
        )
    return checked


def trainable_layers(
    extractor: nn.Module, kinds: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)
) -> list[str]:
    """Names (relative to :func:`layer_root`) of the layers of type ``kinds`` whose weight is
    trainable, in forward-definition order."""
    root = layer_root(extractor)
    return [
        name
        for name, m in root.named_modules()
        if isinstance(m, kinds)
        and getattr(m, "weight", None) is not None
        and m.weight.requires_grad
    ]


def check_batchnorm_modes(modes: Sequence[str] | str) -> tuple[str, ...]:
    """``modes`` as a tuple of :data:`BATCHNORM_MODES`, each at most once.

    Raises:
        ValueError: for no mode, an unknown or a repeated one.
    """
    modes = (modes,) if isinstance(modes, str) else tuple(modes)
    if not modes:
        raise ValueError(f"batchnorm is empty; expected some of {BATCHNORM_MODES}.")
    for mode in modes:
        if mode not in BATCHNORM_MODES:
            raise unknown_choice("batchnorm mode", mode, BATCHNORM_MODES)
    if len(set(modes)) != len(modes):
        raise ValueError(f"batchnorm names a mode twice: {list(modes)}; expected each once.")
    return modes


@contextmanager
def batchnorm_mode(module: nn.Module, mode: str) -> Iterator[nn.Module]:
    """``module`` with its BatchNorm layers normalising as ``mode`` says (``"batch"``: as
    they are — batch statistics in training mode; ``"running"``: in eval mode, with their
    running statistics); every other layer keeps its mode. Restored on exit."""
    with ExitStack() as stack:
        if mode == "running":
            for m in module.modules():
                if isinstance(m, BATCHNORMS):
                    stack.enter_context(evaluating(m))
        yield module


@contextmanager
def recording(layers: dict[str, nn.Module], point: str = "input") -> Iterator[dict[str, Tensor]]:
    """Record each layer's ``point`` (``"input"``: its first positional argument, or
    ``"output"``) during the forwards inside the block, in autograd's graph.

    Yields a dict ``{name: tensor}`` filled as the forward runs (a layer run twice keeps its
    last call). The hooks are removed on exit, even after an error.

    Example:
        >>> import torch
        >>> net = nn.Sequential(nn.Linear(3, 2), nn.ReLU())
        >>> with recording(resolve_layers(net, ["1"]), "output") as seen:
        ...     _ = net(torch.ones(4, 3))
        >>> tuple(seen["1"].shape)
        (4, 2)
    """
    if point not in TAP_POINTS:
        raise unknown_choice("tap point", point, TAP_POINTS)
    seen: dict[str, Tensor] = {}
    handles = []
    for name, layer in layers.items():
        if point == "input":

            def hook(_m, args, _out, name=name):
                seen[name] = args[0]

        else:

            def hook(_m, _args, out, name=name):
                seen[name] = out

        handles.append(layer.register_forward_hook(hook))
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


class LayerChoice:
    """Which layers an every-layer objective regularizes, and each one's weight.

    Args:
        what: the names argument's name, for messages (``"layers"``, ``"blocks"``).
        weights_name: the weights argument's name (``"layer_weights"``).
        names: layer names (:func:`resolve_layers`), :data:`HEAD_INPUT` for the features;
            ``None``: the objective's default.
        weights: ``{name: w ≥ 0}``, 1 for a layer not given.

    Raises:
        TypeError, ValueError: for bad weights (:func:`check_weights`).
    """

    def __init__(
        self,
        what: str,
        weights_name: str,
        names: Sequence[str] | str | None,
        weights: Mapping[str, float] | None,
    ) -> None:
        self.what, self.weights_name = what, weights_name
        if isinstance(names, str):
            names = [names]
        self.names = None if names is None else [str(n) for n in names]
        self.weights = check_weights(weights_name, weights)

    def resolve(self, extractor: nn.Module, default: Callable[[nn.Module], list[str]]) -> list[str]:
        """The names (``default(extractor)`` when none were given), each checked to exist,
        and every weighted name checked to be one of them.

        Raises:
            ValueError: for an unknown layer, a weight of a layer not chosen, or no layer.
        """
        names = list(self.names) if self.names is not None else default(extractor)
        if not names:
            raise ValueError(
                f"{self.what} is empty and the extractor offers no default one; expected "
                f"{self.what}=[...] naming at least one layer or {HEAD_INPUT!r}."
            )
        tapped_layers(extractor, names)
        check_weights(self.weights_name, self.weights, names)
        return names

    def fractions(self, names: Sequence[str]) -> dict[str, float]:
        """Each name's weight over the sum of the weights (0 for all when they sum to 0)."""
        weights = {n: self.weights.get(n, 1.0) for n in names}
        total = sum(weights.values())
        return {n: (w / total if total > 0 else 0.0) for n, w in weights.items()}


class LayeredObjective(Objective):
    """An objective that regularizes a :class:`LayerChoice` of layers: it resolves them when
    the module is built (a wrong name fails then, not at the first step) and offers
    :meth:`default_layers` when none are given."""

    _choice: LayerChoice
    _names: list[str] | None = None

    def default_layers(self, extractor: nn.Module) -> list[str]:
        """The layers regularized when the configuration names none."""
        raise NotImplementedError

    def prepare(self, module: ObjectiveHost) -> None:
        self._names = self.resolved_layers(module)

    def resolved_layers(self, module: ObjectiveHost) -> list[str]:
        """The regularized layers' names, :data:`HEAD_INPUT` (the features) last when
        included."""
        return self._choice.resolve(module.extractor, self.default_layers)

    def chosen_layers(self, module: ObjectiveHost) -> list[str]:
        """:meth:`resolved_layers`, as resolved by :meth:`prepare` when it ran."""
        return self._names if self._names is not None else self.resolved_layers(module)
