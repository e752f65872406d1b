"""Feature extractors and classifier heads (the paper's Sections 2, 4 and 5).

The immunization objective (Eq. 11) splits a model into a feature extractor
``f_θ`` and a classifier head ``g_ω``. This module provides:

- :class:`LinearExtractor`: the bias-free linear map ``f_θ(x) = θᵀx`` of the linear theory
  (``θ ∈ R^{D×K}``), initialised at random or at the identity;
- :class:`LinearHead` (and :func:`linear_head`, :func:`bce_head`,
  :func:`cross_entropy_head`): ``g_ω`` with the loss and metric of its task
  (regression / binary / multiclass);
- :class:`TimmBackbone`: any timm model used as a pooled pre-logit feature extractor,
  with its original classifier recoverable through :meth:`TimmBackbone.make_head` and a
  rule for which parameters stay trainable.

Example:

>>> import torch
>>> f = LinearExtractor(4, init="identity")
>>> x = torch.randn(3, 4)
>>> torch.equal(f(x), x)
True
>>> head = bce_head(4)
>>> head(f(x)).shape
torch.Size([3])
"""

from __future__ import annotations

import copy
import os
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_immunize.validation import unknown_choice

__all__ = [
    "evaluating",
    "LinearExtractor",
    "LinearHead",
    "ClassifierHead",
    "linear_head",
    "bce_head",
    "cross_entropy_head",
    "TimmBackbone",
]


def _flatten_batch(x: torch.Tensor, name: str) -> torch.Tensor:
    """Reshape ``(B, *)`` to ``(B, prod(*))``; reject unbatched inputs."""
    if x.ndim < 2:
        raise ValueError(
            f"{name} expects a batched input of shape (B, D) or (B, *), "
            f"found shape {tuple(x.shape)}."
        )
    return x if x.ndim == 2 else x.flatten(1)


# --------------------------------------------------------------------------------------
# Linear feature extractor
# --------------------------------------------------------------------------------------


@contextmanager
def evaluating(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode for the block, then back to the train/eval mode it had.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Dropout()).train()
        >>> with evaluating(net):
        ...     net.training
        False
        >>> net.training
        True
    """
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def keep_frozen_in_eval(model: nn.Module) -> nn.Module:
    """Put every sub-module of ``model`` that has parameters or buffers but no trainable
    parameter in eval mode (frozen BatchNorm keeps its running statistics, dropout inside a
    frozen block is off); the rest keeps its mode. Returns ``model``."""
    for module in model.modules():
        params = list(module.parameters())
        has_state = bool(params) or any(True for _ in module.buffers())
        if has_state and not any(p.requires_grad for p in params):
            module.eval()
    return model


class LinearExtractor(nn.Module):
    """Bias-free linear feature map ``f_θ(x) = θᵀx`` with ``θ ∈ R^{D×K}``.

    The map is stored as ``self.linear = nn.Linear(D, K, bias=False)``, so
    ``linear.weight`` is ``θᵀ`` (shape ``K×D``) and :attr:`theta` is the ``D×K`` view
    ``linear.weight.T`` (it shares storage and gradients with the weight).

    Args:
        in_features: input width ``D``.
        out_features: feature width ``K``; ``None`` means ``K = D``.
        init: ``"random"`` — ``nn.Linear``'s default (Kaiming-uniform,
            ``U(-1/√D, 1/√D)``); ``"identity"`` — ``θ = I`` (needs ``K = D``).
        seed: with ``init="random"``, the weights are drawn from the CPU generator seeded
            with ``seed`` inside :func:`torch.random.fork_rng`, so the result is
            reproducible and the global RNG state is left untouched. Without a seed the
            global RNG is used (and advanced), as ``nn.Linear`` does. ``init="identity"``
            never touches the global RNG.
        dtype: parameter dtype (default: torch's default dtype).

    Shapes:
        input ``(B, D)`` or ``(B, *)`` with ``prod(*) = D`` (flattened); output ``(B, K)``.
    """

    INITS: tuple[str, ...] = ("random", "identity")

    def __init__(
        self,
        in_features: int,
        out_features: int | None = None,
        init: str = "random",
        seed: int | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if init not in self.INITS:
            raise unknown_choice("init", init, self.INITS)
        if in_features < 1:
            raise ValueError(f"in_features must be positive, got {in_features}.")
        out_features = in_features if out_features is None else out_features
        if out_features < 1:
            raise ValueError(f"out_features must be positive, got {out_features}.")
        if init == "identity" and out_features != in_features:
            raise ValueError(
                f"init='identity' needs out_features == in_features, got "
                f"in_features={in_features}, out_features={out_features}."
            )
        self.in_features = in_features
        self.out_features = out_features
        self.init = init

        if seed is None and init == "random":
            self.linear = nn.Linear(in_features, out_features, bias=False, dtype=dtype)
        else:
            # Private RNG stream: seeded (random init) or irrelevant (identity init).
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0 if seed is None else seed)
                self.linear = nn.Linear(in_features, out_features, bias=False, dtype=dtype)
        if init == "identity":
            with torch.no_grad():
                self.linear.weight.copy_(torch.eye(in_features, dtype=self.linear.weight.dtype))

    @property
    def theta(self) -> torch.Tensor:
        """``θ`` as a ``(D, K)`` view of ``linear.weight`` (which is ``θᵀ``, ``(K, D)``)."""
        return self.linear.weight.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, D)`` or ``(B, *)`` → ``(B, K)``: returns ``x θ``."""
        x = _flatten_batch(x, type(self).__name__)
        if x.shape[1] != self.in_features:
            raise ValueError(
                f"LinearExtractor: input has {x.shape[1]} features (shape "
                f"{tuple(x.shape)} after flattening), expected in_features={self.in_features}."
            )
        return self.linear(x)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, init={self.init!r}"
        )


# --------------------------------------------------------------------------------------
# Classifier heads
# --------------------------------------------------------------------------------------


class LinearHead(nn.Module):
    """Linear head ``g_ω(z) = Wz + b`` with the loss and metric of its task (classification
    or regression).

    Args:
        in_features: feature width ``K``.
        num_outputs: number of outputs. ``"multiclass"`` needs at least 2 (the classes);
            ``"binary"`` with more than one output is multi-label (independent logits).
        task: ``"regression"`` (MSE loss, metric ``"mse"``), ``"binary"`` (BCE with logits,
            targets in {0, 1}, metric ``"accuracy"`` at logit 0) or ``"multiclass"``
            (cross-entropy, integer targets, metric ``"accuracy"`` of the arg-max).

    Shapes:
        input ``(B, K)`` (``(B, *)`` is flattened); output ``(B,)`` for regression/binary
        with ``num_outputs == 1``, otherwise ``(B, num_outputs)``.
    """

    TASKS: tuple[str, ...] = ("regression", "binary", "multiclass")

    def __init__(self, in_features: int, num_outputs: int, task: str) -> None:
        super().__init__()
        if task not in self.TASKS:
            raise unknown_choice("task", task, self.TASKS)
        if in_features < 1 or num_outputs < 1:
            raise ValueError(
                f"in_features and num_outputs must be positive, got in_features={in_features}, "
                f"num_outputs={num_outputs}."
            )
        if task == "multiclass" and num_outputs < 2:
            raise ValueError(f"task='multiclass' needs num_outputs >= 2, got {num_outputs}.")
        self.in_features = in_features
        self.num_outputs = num_outputs
        self.task = task
        self.linear = nn.Linear(in_features, num_outputs)

    @property
    def metric_name(self) -> str:
        """``"mse"`` for regression (lower is better), ``"accuracy"`` otherwise."""
        return "mse" if self.task == "regression" else "accuracy"

    @property
    def higher_is_better(self) -> bool:
        """Whether a larger :meth:`metric` is better."""
        return self.task != "regression"

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Features ``(B, K)`` → predictions/logits ``(B,)`` or ``(B, num_outputs)``."""
        z = _flatten_batch(z, type(self).__name__)
        if z.shape[1] != self.in_features:
            raise ValueError(
                f"LinearHead: features have width {z.shape[1]}, "
                f"expected in_features={self.in_features}."
            )
        out = self.linear(z)
        if self.task != "multiclass" and self.num_outputs == 1:
            out = out.squeeze(1)
        return out

    def _match_target(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.numel() != output.numel():
            raise ValueError(
                f"target shape {tuple(target.shape)} does not match output shape "
                f"{tuple(output.shape)}; expected {output.numel()} target values."
            )
        return target.reshape(output.shape).to(output.dtype)

    def loss(
        self, output: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0
    ) -> torch.Tensor:
        """Mean task loss (scalar) of :meth:`forward`'s ``output`` against ``target``.

        ``label_smoothing`` (in ``[0, 1)``): multiclass → ``F.cross_entropy``'s smoothing;
        binary → targets become ``t·(1−ε) + ε/2``; regression → must be 0.
        """
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}.")
        if self.task == "multiclass":
            return F.cross_entropy(output, target.long(), label_smoothing=label_smoothing)
        target = self._match_target(output, target)
        if self.task == "binary":
            if label_smoothing > 0:
                target = target * (1.0 - label_smoothing) + 0.5 * label_smoothing
            return F.binary_cross_entropy_with_logits(output, target)
        if label_smoothing != 0.0:
            raise ValueError(
                f"label_smoothing is not defined for task='regression', got {label_smoothing}; "
                "expected 0."
            )
        return F.mse_loss(output, target)

    @torch.no_grad()
    def metric(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """0-dim float tensor: MSE (regression) or accuracy in [0, 1] (binary/multiclass)."""
        if self.task == "multiclass":
            pred = output.argmax(dim=-1)
            return (pred == target.reshape(pred.shape).long()).float().mean()
        target = self._match_target(output, target)
        if self.task == "binary":
            return ((output > 0) == (target > 0.5)).float().mean()
        return F.mse_loss(output.float(), target.float())

    def extra_repr(self) -> str:
        return f"task={self.task!r}"


class ClassifierHead(LinearHead):
    """Deprecated name of :class:`LinearHead` (the head also does regression); removed in the
    next release. Same arguments, same state dict."""

    def __init__(self, in_features: int, num_outputs: int, task: str) -> None:
        warnings.warn(
            "ClassifierHead is deprecated: use lightning_immunize.models.LinearHead (same "
            "arguments).",
            DeprecationWarning,
            stacklevel=2,
        )
        super().__init__(in_features, num_outputs, task)


def linear_head(in_features: int, out: int = 1) -> LinearHead:
    """Regression head (MSE); output ``(B,)`` when ``out == 1``."""
    return LinearHead(in_features, out, "regression")


def bce_head(in_features: int) -> LinearHead:
    """Binary head: one logit per sample, output ``(B,)``, BCE-with-logits loss."""
    return LinearHead(in_features, 1, "binary")


def cross_entropy_head(in_features: int, num_classes: int) -> LinearHead:
    """Multiclass head: ``num_classes`` logits, cross-entropy loss."""
    return LinearHead(in_features, num_classes, "multiclass")


# --------------------------------------------------------------------------------------
# timm backbone
# --------------------------------------------------------------------------------------

_LAST_RE = re.compile(r"^last:(\d+)$")
# Final normalisation layers kept trainable with "last:N" (when present with parameters).
_FINAL_NORMS: tuple[str, ...] = ("norm", "fc_norm", "head_norm", "head.norm")


def _load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a state dict saved with ``torch.save``: raw or wrapped as ``{"state_dict": …}``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"checkpoint_path {path!r} does not exist; expected a torch.save file of a state dict."
        )
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) for k in obj):
        raise ValueError(
            f"checkpoint {path!r} does not hold a state dict (found a {type(obj).__name__}); "
            "expected a mapping of parameter names to tensors."
        )
    state = dict(obj)
    # Strip a prefix shared by every key (DDP's "module.", this wrapper's "model.").
    for prefix in ("module.", "model."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


class TimmBackbone(nn.Module):
    """A timm model used as a feature extractor returning pooled pre-logit features.

    The model is built with ``timm.create_model(model_name, pretrained=pretrained,
    in_chans=in_chans, **timm_kwargs)`` (its classifier included), then
    ``checkpoint_path`` is loaded into it, the classifier's weights are kept aside for
    :meth:`make_head`, and the classifier is removed with ``model.reset_classifier(0)``:
    :meth:`forward` then returns what the classifier used to receive.

    Args:
        model_name: any timm model name (e.g. ``"resnet18"``, ``"vit_base_patch16_clip_224"``).
        pretrained: let timm load its pretrained weights (needs them cached or a network).
        checkpoint_path: a file written by ``torch.save`` holding a state dict of the timm
            model (raw, or under ``"state_dict"``; a prefix ``"module."`` or ``"model."``
            shared by all keys is stripped, so ``TimmBackbone.state_dict()`` works too).
            Missing classifier keys are allowed (with a warning); any other mismatch raises.
        trainable: which parameters keep ``requires_grad=True``; the others are frozen.
            Names are relative to the timm model (``"layer4.0.conv1.weight"``).

            - ``None``: everything trainable;
            - a prefix or a list of prefixes (``["layer3", "layer4"]``): a parameter is
              trainable when its name equals a prefix or starts with ``prefix + "."``;
              ``[]`` freezes everything. A prefix that matches nothing raises ``ValueError``;
            - ``"last:N"``: the last ``N`` units of the model's main sequence of blocks —
              ``blocks.0 … blocks.{n-1}`` (ViT-like models with ``blocks``), ``layer1 …
              layerM`` (ResNets), or ``stages.0 …`` (ConvNeXt-like models with
              ``stages``) — plus the final normalisation layers after them when they have
              parameters (``norm``, ``fc_norm``, ``head_norm``, ``head.norm``). For
              ``resnet18``, ``"last:2"`` is ``layer3`` + ``layer4``; for a ViT,
              ``"last:1"`` is the last block + ``norm`` (+ ``fc_norm`` if used).
        in_chans: number of input channels (timm adapts the stem).
        num_classes: classifier outputs (default: the model's, 1000 for ImageNet models);
            the classifier is what :meth:`make_head` returns.
        seed: when given, the model's random initial weights come from this seed, whatever
            the global RNG state (``seed_everything``) is: runs with different seeds then
            start from the same network, as an immunization sweep from one θ_0 needs. The
            global RNG is left as it was.
        eval_frozen: if true (default), :meth:`train` keeps every sub-module that has
            parameters or buffers but no trainable parameter in eval mode, so frozen
            BatchNorm layers do not update their running statistics and frozen dropout is
            off; it is re-evaluated at each ``train()`` call, so later ``requires_grad``
            changes are honoured.
        model_kwargs: more keyword arguments of ``timm.create_model`` (``img_size``,
            ``drop_rate``, …), as a mapping so configs can set them.
        **timm_kwargs: the same, as keyword arguments (Python callers).

    Shapes:
        input ``(B, in_chans, H, W)``; output ``(B, num_features)``.
    """

    def __init__(
        self,
        model_name: str,
        pretrained: bool = False,
        checkpoint_path: str | os.PathLike[str] | None = None,
        trainable: Sequence[str] | str | None = None,
        in_chans: int = 3,
        num_classes: int | None = None,
        seed: int | None = None,
        eval_frozen: bool = True,
        model_kwargs: Mapping[str, Any] | None = None,
        **timm_kwargs: Any,
    ) -> None:
        super().__init__()
        import timm

        timm_kwargs = {**(model_kwargs or {}), **timm_kwargs}
        if num_classes is not None:
            timm_kwargs["num_classes"] = num_classes

        if checkpoint_path is not None and not os.path.isfile(os.fspath(checkpoint_path)):
            raise FileNotFoundError(
                f"checkpoint_path {os.fspath(checkpoint_path)!r} does not exist; expected a "
                "torch.save file of a state dict."
            )
        self.model_name = model_name
        self.eval_frozen = eval_frozen
        private_rng = torch.random.fork_rng(devices=[]) if seed is not None else nullcontext()
        with private_rng:
            if seed is not None:
                torch.manual_seed(seed)
            self.model: nn.Module = timm.create_model(
                model_name, pretrained=pretrained, in_chans=in_chans, **timm_kwargs
            )
        classifier = self.model.get_classifier()
        if checkpoint_path is not None:
            self._load_checkpoint(checkpoint_path, classifier)

        # Keep the classifier for make_head() before removing it.
        self._head_weight: torch.Tensor | None = None
        self._head_bias: torch.Tensor | None = None
        self._head_module: nn.Module | None = None
        if isinstance(classifier, nn.Linear):
            self._head_weight = classifier.weight.detach().clone()
            self._head_bias = None if classifier.bias is None else classifier.bias.detach().clone()
            self.num_features: int = classifier.in_features
        else:
            if not isinstance(classifier, nn.Identity):
                self._head_module = copy.deepcopy(classifier)
            self.num_features = int(
                getattr(self.model, "head_hidden_size", None) or self.model.num_features
            )
        self.num_classes: int = int(getattr(self.model, "num_classes", 0) or 0)
        self.model.reset_classifier(0)

        self._trainable_prefixes = self._resolve_trainable(trainable)
        if self._trainable_prefixes is not None:
            for name, p in self.model.named_parameters():
                p.requires_grad_(self._matches(name, self._trainable_prefixes))
        # Lightning ≥ 2.2 keeps each sub-module's mode as found at fit start, so frozen parts
        # must already be in eval mode here, not only after the next ``train()`` call.
        self.train(self.training)

    # ------------------------------------------------------------------ construction
    def _load_checkpoint(self, path: str | os.PathLike[str], classifier: nn.Module) -> None:
        state = _load_state_dict_file(path)
        head_prefix = next(
            (n for n, m in self.model.named_modules() if m is classifier and n), None
        )
        head_keys = (
            {f"{head_prefix}.{k}" for k in classifier.state_dict()} if head_prefix else set()
        )
        result = self.model.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if k not in head_keys]
        if missing or result.unexpected_keys:
            raise RuntimeError(
                f"checkpoint {os.fspath(path)!r} does not fit timm model {self.model_name!r}: "
                f"missing keys {missing[:10]}, unexpected keys {result.unexpected_keys[:10]}; "
                "expected a state dict of this architecture."
            )
        if result.missing_keys:
            warnings.warn(
                f"checkpoint {os.fspath(path)!r} has no classifier weights "
                f"({sorted(result.missing_keys)}); make_head() returns the initial ones",
                stacklevel=3,
            )

    def top_level_names(self) -> list[str]:
        """Names of the timm model's direct children that own parameters, plus top-level
        parameters (e.g. ``cls_token``, ``pos_embed``)."""
        names = [n for n, m in self.model.named_children() if any(True for _ in m.parameters())]
        names += [n for n, _ in self.model.named_parameters(recurse=False)]
        return names

    def _block_units(self) -> list[str]:
        """Names of the model's main sequence of blocks, in order (see ``trainable``)."""
        m = self.model
        blocks = getattr(m, "blocks", None)
        if isinstance(blocks, nn.Module) and len(list(blocks.children())) > 0:
            return [f"blocks.{n}" for n, _ in blocks.named_children()]
        layers = sorted(
            (int(n[5:]), n)
            for n, _ in m.named_children()
            if n.startswith("layer") and n[5:].isdigit()
        )
        if layers:
            return [n for _, n in layers]
        stages = getattr(m, "stages", None)
        if isinstance(stages, nn.Module) and len(list(stages.children())) > 0:
            return [f"stages.{n}" for n, _ in stages.named_children()]
        raise ValueError(
            f"trainable='last:N' needs a model with 'blocks', 'layer1..' or 'stages'; "
            f"{self.model_name!r} has top-level modules {self.top_level_names()}; "
            "pass explicit prefixes instead."
        )

    def _resolve_trainable(self, trainable: Sequence[str] | str | None) -> list[str] | None:
        if trainable is None:
            return None
        if isinstance(trainable, str):
            match = _LAST_RE.match(trainable.strip())
            if match is None:
                if trainable.startswith("last"):
                    raise ValueError(
                        f"trainable={trainable!r}: expected 'last:N' with N a positive integer."
                    )
                trainable = [trainable]
            else:
                n = int(match.group(1))
                units = self._block_units()
                if not 1 <= n <= len(units):
                    raise ValueError(
                        f"trainable={trainable!r}: N must be in 1..{len(units)} for "
                        f"{self.model_name!r} (units {units})."
                    )
                prefixes = units[-n:]
                modules = dict(self.model.named_modules())
                for norm in _FINAL_NORMS:
                    mod = modules.get(norm)
                    if mod is not None and any(True for _ in mod.parameters()):
                        prefixes.append(norm)
                return prefixes
        prefixes = [str(p) for p in trainable]
        names = [n for n, _ in self.model.named_parameters()]
        unknown = [p for p in prefixes if not any(self._matches(n, [p]) for n in names)]
        if unknown:
            raise ValueError(
                f"trainable prefixes {unknown} match no parameter of {self.model_name!r}; "
                f"available top-level names: {self.top_level_names()}."
            )
        return prefixes

    @staticmethod
    def _matches(name: str, prefixes: Sequence[str]) -> bool:
        return any(name == p or name.startswith(p + ".") for p in prefixes)

    # ------------------------------------------------------------------ API
    def trainable_parameter_names(self) -> list[str]:
        """Names (relative to the timm model) of the parameters with ``requires_grad``."""
        return [n for n, p in self.model.named_parameters() if p.requires_grad]

    def frozen_parameter_names(self) -> list[str]:
        """Names (relative to the timm model) of the frozen parameters."""
        return [n for n, p in self.model.named_parameters() if not p.requires_grad]

    def make_head(self) -> nn.Module:
        """A fresh copy of the timm model's original classifier.

        A linear classifier comes back as a :class:`LinearHead` (``task="multiclass"``,
        or ``"binary"`` for a single output) holding copies of its weights, so
        ``head(backbone(x))`` equals the original model's logits. A non-linear classifier
        is returned as a deep copy; a model built without one raises ``ValueError``.
        """
        if self._head_weight is not None:
            out_features, in_features = self._head_weight.shape
            task = "multiclass" if out_features >= 2 else "binary"
            head = LinearHead(in_features, out_features, task)
            head = head.to(dtype=self._head_weight.dtype, device=self._head_weight.device)
            with torch.no_grad():
                head.linear.weight.copy_(self._head_weight)
                if self._head_bias is not None:
                    head.linear.bias.copy_(self._head_bias)
                else:
                    head.linear.bias.zero_()
            return head
        if self._head_module is not None:
            return copy.deepcopy(self._head_module)
        raise ValueError(
            f"timm model {self.model_name!r} was built without a classifier "
            "(num_classes=0?), so there is no head to make; expected num_classes >= 1, or pass "
            "a head."
        )

    def train(self, mode: bool = True) -> TimmBackbone:
        """Set train/eval mode; with ``eval_frozen``, frozen sub-modules stay in eval."""
        super().train(mode)
        if mode and self.eval_frozen:
            keep_frozen_in_eval(self.model)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, in_chans, H, W)`` → pooled pre-logit features ``(B, num_features)``."""
        return self.model(x)

    def extra_repr(self) -> str:
        return f"model_name={self.model_name!r}, num_features={self.num_features}"
