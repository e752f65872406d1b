r"""Covariance-preconditioned regularizer gradients (Algorithm 1, Theorems 4.2–4.3).

For a linear extractor ``f_θ(x) = θᵀx`` (``θ`` of shape D×K) and a regularizer ``R`` of the
feature covariance ``S = θᵀΣθ``, ``∇_θ R = 2·Σ·θ·∇_S R`` (Theorem 4.2). Algorithm 1 multiplies
that gradient by ``Σ⁻¹``. Three modes:

* ``exact``: ``2·θ·∇_S R`` — equal to ``Σ⁻¹∇_θ R`` for invertible ``Σ``, needs no inverse;
* ``ridge``: ``(Σ + ρI)⁻¹·∇_θ R``, a Cholesky solve in float64 (the reference's "dummy
  layer"); ``ρ = ridge · tr(Σ)/D``, i.e. ``ridge`` is relative to the mean eigenvalue of
  ``Σ``, so the same value works at any data scale;
* ``none``: the plain gradient ``∇_θ R``.

``Σ`` is the *mean* input covariance ``XᵀX/N`` when it is built from data here, matching
regularizers evaluated on the batch-mean feature covariance ``ZᵀZ/N``.

:class:`PreconditionedLinear` is a drop-in ``nn.Linear`` whose backward preconditions its
weight gradient by the (ridge) inverse covariance of the inputs that went through it; the
input and bias gradients are left alone. Toggle it with :func:`preconditioning_enabled` so only the
regularizer's backward pass is preconditioned, never the task loss's; or, to serve both from
**one** forward, run the forward under :func:`deferred_preconditioning` and switch the
preconditioner on only around the regularizer's backward (the switch is read at backward time).

Example:
    >>> import torch
    >>> theta = torch.eye(2, dtype=torch.float64)
    >>> sigma = torch.diag(torch.tensor([2.0, 1.0], dtype=torch.float64))
    >>> grad_S = torch.diag(torch.tensor([1.0, -1.0], dtype=torch.float64))
    >>> preconditioned_gradient(theta, sigma, grad_S, mode="exact")
    tensor([[ 2.,  0.],
            [ 0., -2.]], dtype=torch.float64)
    >>> preconditioned_gradient(theta, sigma, grad_S, mode="none")
    tensor([[ 4.,  0.],
            [ 0., -2.]], dtype=torch.float64)
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_immunize.distributed import all_reduce_sum
from lightning_immunize.validation import unknown_choice

__all__ = [
    "MODES",
    "check_mode",
    "input_covariance",
    "global_input_covariance",
    "ridge_solve",
    "preconditioned_gradient",
    "PreconditionedLinear",
    "preconditioned_linear",
    "preconditioning_enabled",
    "PreconditionSwitch",
    "deferred_preconditioning",
    "convert_linear_layers",
]

MODES = ("exact", "ridge", "none")
DTYPE = torch.float64


def check_mode(mode: str) -> str:
    """Return ``mode`` if it is a known preconditioner mode, else raise ``ValueError``."""
    if mode not in MODES:
        raise unknown_choice("preconditioner mode", mode, MODES)
    return mode


def input_covariance(X: Tensor) -> Tensor:
    """Mean input covariance ``XᵀX/N`` (D×D, float64) of inputs ``X`` of shape (..., D)."""
    X64 = X.detach().reshape(-1, X.shape[-1]).to(DTYPE)
    return X64.mT @ X64 / X64.shape[0]


def global_input_covariance(X: Tensor) -> Tensor:
    """``XᵀX/N`` over the inputs of every DDP rank (D×D, float64); local when not distributed."""
    X64 = X.detach().reshape(-1, X.shape[-1]).to(DTYPE)
    gram = all_reduce_sum(X64.mT @ X64)
    count = all_reduce_sum(torch.tensor(float(X64.shape[0]), dtype=DTYPE, device=X.device))
    return gram / count


def ridge_solve(sigma: Tensor, grad: Tensor, ridge: float = 1e-3) -> Tensor:
    """``(Σ + ρI)⁻¹ · grad`` with ``ρ = ridge·tr(Σ)/D``; Cholesky in float64.

    ``sigma`` (D×D, PSD), ``grad`` (D×K); returns float64 (D×K).
    """
    if not ridge > 0:
        raise ValueError(f"ridge must be > 0 for the ridge preconditioner, got {ridge!r}.")
    sigma64 = sigma.to(DTYPE)
    d = sigma64.shape[-1]
    if sigma64.shape[-2:] != (d, d) or grad.shape[-2] != d:
        raise ValueError(
            f"ridge_solve needs Σ of shape (D, D) and a gradient of shape (D, K); "
            f"got {tuple(sigma.shape)} and {tuple(grad.shape)}."
        )
    rho = ridge * torch.diagonal(sigma64, dim1=-2, dim2=-1).sum(-1).clamp_min(1e-300) / d
    eye = torch.eye(d, dtype=DTYPE, device=sigma.device)
    factor = torch.linalg.cholesky(sigma64 + rho[..., None, None] * eye)
    return torch.cholesky_solve(grad.to(DTYPE), factor)


def preconditioned_gradient(
    theta: Tensor, sigma: Tensor | None, grad_S: Tensor, mode: str = "exact", ridge: float = 1e-3
) -> Tensor:
    """The regularizer gradient on ``θ`` (D×K) for ``S = θᵀΣθ`` and ``∇_S R`` (K×K).

    ``exact``: ``2θ∇_S R``; ``ridge``: ``(Σ+ρI)⁻¹ 2Σθ∇_S R``; ``none``: ``2Σθ∇_S R``.
    ``sigma`` (D×D) may be ``None`` for ``exact``. Returns float64 (D×K).
    """
    check_mode(mode)
    theta64, grad_S64 = theta.detach().to(DTYPE), grad_S.to(DTYPE)
    direction = 2.0 * theta64 @ grad_S64
    if mode == "exact":
        return direction
    if sigma is None:
        raise ValueError(f"mode {mode!r} needs the input covariance sigma; got None.")
    plain = sigma.to(DTYPE) @ direction
    return plain if mode == "none" else ridge_solve(sigma, plain, ridge)


class PreconditionSwitch:
    """Backward-time switch of :func:`deferred_preconditioning`: weight gradients of the
    forwards recorded under it are preconditioned only in backward passes run while
    :attr:`enabled` is true (see :meth:`on`)."""

    def __init__(self) -> None:
        self.enabled = False

    @contextmanager
    def on(self) -> Iterator[None]:
        """Precondition the backward passes run inside the block."""
        previous, self.enabled = self.enabled, True
        try:
            yield
        finally:
            self.enabled = previous


class _PreconditionedLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        ridge: float,
        switch: PreconditionSwitch | None,
    ) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.ridge = ridge
        ctx.switch = switch
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight = ctx.saved_tensors
        flat_x = x.reshape(-1, x.shape[-1])
        flat_g = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ weight
        if ctx.needs_input_grad[1]:
            if ctx.switch is not None and not ctx.switch.enabled:  # deferred, switched off
                grad_w = flat_g.mT @ flat_x
            else:
                # weight = θᵀ, so ∇_W = (∇_θ)ᵀ and the preconditioned ∇_W is ((Σ+ρI)⁻¹∇_θ)ᵀ.
                grad_theta = flat_x.mT.to(DTYPE) @ flat_g.to(DTYPE)
                grad_w = ridge_solve(global_input_covariance(flat_x), grad_theta, ctx.ridge).mT
                grad_w = grad_w.to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = flat_g.sum(0)
        return grad_x, grad_w, grad_b, None, None


def preconditioned_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    ridge: float = 1e-3,
    switch: PreconditionSwitch | None = None,
) -> Tensor:
    """``F.linear`` whose weight gradient is preconditioned by ``(Σ_x + ρI)⁻¹``; with a
    ``switch``, only in backward passes run while ``switch.enabled``."""
    return _PreconditionedLinearFunction.apply(x, weight, bias, ridge, switch)


class PreconditionedLinear(nn.Linear):
    """``nn.Linear`` whose backward multiplies the weight gradient by ``(Σ_x + ρI)⁻¹``.

    ``Σ_x = xᵀx/N`` is the mean covariance of the inputs of this forward call (all leading
    dimensions flattened), over every DDP rank when a process group is initialised. With
    ``precondition=False`` it is a plain ``nn.Linear`` — except under
    :func:`deferred_preconditioning`, where the backward-time switch decides.

    >>> layer = PreconditionedLinear(3, 2, bias=False)
    >>> with preconditioning_enabled(layer, enabled=False):
    ...     layer.precondition
    False
    >>> layer.precondition
    True
    """

    def __init__(self, *args, ridge: float = 1e-3, precondition: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.ridge = ridge
        self.precondition = precondition
        self.switch: PreconditionSwitch | None = None

    def forward(self, x: Tensor) -> Tensor:
        switch = getattr(self, "switch", None)
        if switch is not None:
            return preconditioned_linear(x, self.weight, self.bias, self.ridge, switch)
        if not self.precondition:
            return super().forward(x)
        return preconditioned_linear(x, self.weight, self.bias, self.ridge)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ridge={self.ridge}, precondition={self.precondition}"


@contextmanager
def _layers_set(module: nn.Module, name: str, value: object) -> Iterator[None]:
    """Every :class:`PreconditionedLinear` in ``module`` has attribute ``name = value`` for the
    block, and its previous value back afterwards."""
    layers = [m for m in module.modules() if isinstance(m, PreconditionedLinear)]
    previous = [getattr(m, name, None) for m in layers]
    for m in layers:
        setattr(m, name, value)
    try:
        yield
    finally:
        for m, state in zip(layers, previous, strict=True):
            setattr(m, name, state)


@contextmanager
def preconditioning_enabled(module: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """Switch every :class:`PreconditionedLinear` inside ``module`` on (or off) for a block."""
    with _layers_set(module, "precondition", enabled):
        yield module


def preconditioning(module: nn.Module, enabled: bool = True):
    """Deprecated name of :func:`preconditioning_enabled` (it shadowed this module's own name
    in the package namespace); removed in the next release."""
    warnings.warn(
        "lightning_immunize.preconditioning.preconditioning is deprecated; use "
        "preconditioning_enabled.",
        DeprecationWarning,
        stacklevel=2,
    )
    return preconditioning_enabled(module, enabled)


@contextmanager
def deferred_preconditioning(module: nn.Module) -> Iterator[PreconditionSwitch]:
    """Forwards of every :class:`PreconditionedLinear` in ``module`` inside the block defer the
    choice to the backward pass: their weight gradients are plain unless the backward runs
    inside ``switch.on()``. One forward thus serves a plain task-loss gradient and a
    preconditioned regularizer gradient (Algorithm 1), e.g.::

        with deferred_preconditioning(net) as switch:
            z = net(x)
        with switch.on():
            reg_grads = torch.autograd.grad(R(z), params, retain_graph=True)
        task_loss(z).backward()

    >>> layer = PreconditionedLinear(3, 2, bias=False, precondition=False)
    >>> x = torch.randn(8, 3)
    >>> with deferred_preconditioning(layer) as switch:
    ...     z = layer(x)
    >>> plain = torch.autograd.grad(z.sum(), layer.weight, retain_graph=True)[0]
    >>> torch.allclose(plain, torch.ones(2, 1) * x.sum(0))
    True
    >>> with switch.on():
    ...     pre = torch.autograd.grad(z.sum(), layer.weight)[0]
    >>> bool((pre - plain).abs().max() > 1e-3)
    True
    """
    switch = PreconditionSwitch()
    with _layers_set(module, "switch", switch):
        yield switch


def convert_linear_layers(
    module: nn.Module, ridge: float = 1e-3, precondition: bool = False
) -> nn.Module:
    """Replace every ``nn.Linear`` in ``module`` (in place) by a :class:`PreconditionedLinear`.

    The layers keep the same ``Parameter`` objects (so ``requires_grad``, device, dtype and any
    optimizer holding them are unaffected); a layer already converted gets ``ridge``. They
    start switched off (``precondition=False``): the model behaves as before until
    :func:`preconditioning` switches them on.
    """
    for name, child in module.named_children():
        if isinstance(child, PreconditionedLinear):
            child.ridge = ridge
        elif isinstance(child, nn.Linear):
            new = PreconditionedLinear(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                ridge=ridge,
                precondition=precondition,
                device="meta",
            )
            # The very same Parameter objects: an optimizer built before still updates them.
            new.weight = child.weight
            new.bias = child.bias
            setattr(module, name, new)
        else:
            convert_linear_layers(child, ridge=ridge, precondition=precondition)
    return module
