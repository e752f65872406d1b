r"""Attacker-aware objectives: immunize against *simulated* fine-tuning attacks.

Where ours (Eq. 11) shapes the feature covariance, these objectives play the attacker inside
each training step, in the style of meta-learning (MAML): fine-tune a copy of the extractor
with a fresh linear head on D_H for ``K`` steps, then push the *post-attack* D_H performance
down, differentiating (to first order) through the attack.

* :class:`SimulatedAttackObjective` (``"sophon"``), after SOPHON (Deng et al., "SOPHON:
  Non-Fine-Tunable Learning to Restrain Task Transferability For Pre-trained Models", IEEE
  S&P 2024): ``L_P + λ_H·L_outer(θ_K^H) + λ_PF·L_P(θ_K^P)`` with the KL-from-uniform or the
  inverse cross-entropy as the suppression loss ``L_outer``;
* :class:`TamperResistanceObjective` (``"tar"``), after TAR (Tamirisa et al.,
  "Tamper-Resistant Safeguards for Open-Weight LLMs", ICLR 2025):
  ``λ_R·L_P + λ_H·mean_k(−H(p_{θ_k}))``, the negative entropy of the attacked model's
  predictions averaged along the attack trajectory.

**The simulated attack** (:func:`_simulated_finetuning`, shared by both). Each training step
samples one attack from the objective's private generator (``seed``): an optimizer from
``inner_optimizers`` (uniformly), a learning rate ``η ~ LogUniform(inner_lrs)`` and a fresh
linear head ``φ_0`` (``(C, K)`` weight and ``(C,)`` bias drawn ``U(−1/√K, 1/√K)``, as
``nn.Linear`` initialises). The batch of each side is split in two halves: the attacker
fine-tunes on the first ``⌊B/2⌋`` samples and the outer loss is taken on the other half
(held out, so the objective measures what the attacker *learned*, not what it memorised).
The attacker trains every trainable extractor parameter ``θ`` (``requires_grad``) and the
head ``φ`` together, ``(θ_{k+1}, φ_{k+1}) = opt_η(θ_k, φ_k; ∇ CE(φ_k, f_{θ_k}(X_in)))``,
``θ_0 = θ``, with ``torch.func.functional_call`` on the extractor (no copy of the module).

**First-order gradient.** The inner updates are taken with detached gradients, and each
adapted parameter enters the outer loss as ``θ_k = θ + stop_grad(θ_k − θ)`` — the value
``θ_k``, the gradient of the outer loss with respect to ``θ_k`` applied to ``θ`` (first-order
MAML). With ``inner_steps=0`` there is no attack: ``θ_0 = θ`` and the outer terms are taken
exactly on the unadapted features with the fresh heads ``φ_0``, so the gradient is exact.

**Side effects.** The simulated forwards use copies of the extractor's buffers, so they never
move the module's BatchNorm running statistics (whatever ``harmful_bn_stats`` says); the
module's head is not used by the attacker and gets the D_P task loss's gradient only. Under
DDP every rank simulates on its own batch (same attack on every rank: same seed, same draws)
and the gradients are averaged by the one ``manual_backward``.

**Tasks.** The attacker's head on D_H has the module head's task and width (one logit and BCE
for a binary head, ``C`` logits and cross-entropy for a multiclass one) unless
``num_classes_harmful`` is given (then ``C`` logits, cross-entropy). The outer losses need
class probabilities: a binary logit ``l`` is read as the two classes ``(σ(−l), σ(l))``. The
D_P fine-tuning term of SOPHON uses the module head's task (MSE for regression).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from lightning_immunize.objectives.base import (
    Objective,
    ObjectiveHost,
    ObjectiveOutput,
    check_lambda,
)
from lightning_immunize.objectives.ours import ConditionNumberObjective
from lightning_immunize.validation import unknown_choice

__all__ = [
    "SimulatedAttack",
    "SimulatedAttackObjective",
    "TamperResistanceObjective",
    "AttackerAwareConditionNumberObjective",
    "INNER_OPTIMIZERS",
    "OUTER_LOSSES",
]

#: Optimizers a simulated attacker may use: plain SGD, SGD with momentum 0.9, Adam, AdamW
#: (weight decay 0.01); each with the sampled learning rate and torch's other defaults.
INNER_OPTIMIZERS: tuple[str, ...] = ("sgd", "momentum", "adam", "adamw")
#: SOPHON's suppression losses on the attacked model's D_H predictions (both minimised).
OUTER_LOSSES: tuple[str, ...] = ("kl_uniform", "inverse_ce")
#: Smallest batch a simulated attack can split (two samples to fine-tune on, two held out).
MIN_SIDE_BATCH = 4

_TASKS = ("regression", "binary", "multiclass")


# -- tasks of the attacker's fresh head ----------------------------------------------------


@dataclass(frozen=True)
class _Task:
    """The task of a fresh linear head: its outputs, loss and class probabilities."""

    kind: str  # "regression", "binary" or "multiclass"
    outputs: int

    def forward(self, z: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        """Features ``(B, K)`` → outputs ``(B, C)``; ``(B,)`` for one non-multiclass output."""
        out = F.linear(z.reshape(z.shape[0], -1), weight, bias)
        return out.squeeze(-1) if self.kind != "multiclass" and self.outputs == 1 else out

    def loss(self, out: Tensor, y: Tensor) -> Tensor:
        """Mean cross-entropy (multiclass), BCE with logits (binary) or MSE (regression)."""
        if self.kind == "multiclass":
            return F.cross_entropy(out, y.reshape(out.shape[:-1]).long())
        target = y.reshape(out.shape).to(out.dtype)
        if self.kind == "binary":
            return F.binary_cross_entropy_with_logits(out, target)
        return F.mse_loss(out, target)

    def log_probs(self, out: Tensor) -> Tensor:
        """Log class probabilities ``(..., C)``: ``log_softmax`` of multiclass logits; a binary
        logit ``l`` gives the two classes ``(log σ(−l), log σ(l))``."""
        if self.kind == "multiclass":
            return F.log_softmax(out, dim=-1)
        return torch.stack([F.logsigmoid(-out), F.logsigmoid(out)], dim=-1)

    def labels(self, y: Tensor, out: Tensor) -> Tensor:
        """Class indices shaped like ``log_probs(out)`` without its class dimension."""
        shape = out.shape[:-1] if self.kind == "multiclass" else out.shape
        return y.reshape(shape).long()

    def check_labels(self, y: Tensor, side: str, step: int | str) -> None:
        """Refuse labels that are not class indices of this task (one device sync)."""
        classes = self.outputs if self.kind == "multiclass" else 2
        ok = (y >= 0) & (y < classes)
        if y.is_floating_point():
            ok &= y == torch.floor(y)
        if bool(ok.all()):
            return
        bad = y[~ok].unique()[:5].tolist()
        raise ValueError(
            f"the {side} batch at training step {step} has labels {bad} that are not class "
            f"indices of the simulated attacker's {self.kind} head (expected integers in "
            f"[0, {classes})). Set num_classes_harmful to the number of D_H classes."
        )


def _head_task(head: nn.Module) -> _Task:
    """The task of ``head``: a :class:`~lightning_immunize.models.LinearHead`'s ``task`` and
    ``num_outputs``, else its (``.linear``'s) ``out_features`` (multiclass from 2 outputs)."""
    outputs = getattr(head, "num_outputs", None)
    if outputs is None:
        outputs = getattr(getattr(head, "linear", head), "out_features", None)
    if not isinstance(outputs, int) or outputs < 1:
        raise ValueError(
            f"cannot tell how many outputs the head {type(head).__name__} has (no num_outputs "
            "or out_features); use a LinearHead, or set num_classes_harmful."
        )
    kind = getattr(head, "task", None)
    if kind not in _TASKS:
        kind = "multiclass" if outputs >= 2 else "binary"
    return _Task(kind, outputs)


# -- the outer losses, on log class probabilities (..., C) -----------------------------------


def _kl_uniform(log_p: Tensor) -> Tensor:
    """``KL(U ‖ p) = −log C − (1/C)·Σ_c log p_c``, batch mean; 0 iff ``p`` is uniform."""
    return (-math.log(log_p.shape[-1]) - log_p.mean(dim=-1)).mean()


def _inverse_ce(log_p: Tensor, y: Tensor) -> Tensor:
    """``−log(1 − p_y)``, batch mean, with ``log(1 − p_y) = logsumexp_{c≠y} log p_c``."""
    true_class = F.one_hot(y, log_p.shape[-1]).bool()
    return -log_p.masked_fill(true_class, -math.inf).logsumexp(dim=-1).mean()


def _negative_entropy(log_p: Tensor) -> Tensor:
    """``−H(p) = Σ_c p_c log p_c``, batch mean; minimal (``−log C``) at the uniform ``p``."""
    return (log_p.exp() * log_p).sum(dim=-1).mean()


def _attack_metrics(log_p: Tensor, y: Tensor) -> dict[str, Tensor]:
    """The attacker's cross-entropy and accuracy on the held-out half (detached)."""
    log_p = log_p.detach()
    return {
        "harmful_ce_after_attack": -log_p.gather(-1, y.unsqueeze(-1)).mean(),
        "harmful_accuracy_after_attack": (log_p.argmax(dim=-1) == y).to(log_p.dtype).mean(),
    }


# -- the simulated attacker ------------------------------------------------------------------


def _inner_optimizer(name: str, params: list[Tensor], lr: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    raise unknown_choice("inner optimizer", name, INNER_OPTIMIZERS)


def _halves(x: Tensor, y: Tensor, side: str, step: int | str) -> tuple[tuple[Tensor, Tensor], ...]:
    """``((x_in, y_in), (x_out, y_out))``: the first ``⌊B/2⌋`` samples, then the rest."""
    n = x.shape[0]
    if n < MIN_SIDE_BATCH:
        raise ValueError(
            f"the {side} batch at training step {step} has {n} samples; a simulated attack "
            f"needs at least {MIN_SIDE_BATCH} (half to fine-tune on, half held out). Use a "
            "larger batch_size, or drop_last=True for a short last batch."
        )
    h = n // 2
    return (x[:h], y[:h]), (x[h:], y[h:])


def _simulated_finetuning(
    extractor: nn.Module,
    task: _Task,
    head: tuple[Tensor, Tensor],
    train: tuple[Tensor, Tensor],
    x_eval: Tensor,
    steps: int,
    optimizer: str,
    lr: float,
    every_step: bool = False,
) -> list[Tensor]:
    r"""Fine-tune ``extractor`` + a fresh head for ``steps`` steps; outputs on ``x_eval``.

    The attacker trains the extractor's trainable parameters ``θ`` and the head
    ``φ_0 = head`` (weight ``(C, K)``, bias ``(C,)``) with ``optimizer`` at learning rate
    ``lr`` on ``train = (x_in, y_in)`` and ``task``'s loss, through
    ``torch.func.functional_call`` on copies (detached, so the inner gradients are
    first-order) and on copies of the extractor's buffers.

    Returns:
        the outputs ``(B_eval, C)`` (``(B_eval,)`` for one binary logit) of the attacked model
        on ``x_eval`` after the last step — after every step with ``every_step`` — computed
        with ``θ + stop_grad(θ_k − θ)`` (value ``θ_k``; the gradient reaches ``θ`` as the
        first-order MAML gradient) and the detached head ``φ_k``. ``steps=0``: one output,
        ``f_θ(x_eval)`` with ``φ_0``, differentiable in ``θ`` exactly.
    """
    params = {n: p for n, p in extractor.named_parameters() if p.requires_grad}
    buffers = {n: b.clone() for n, b in extractor.named_buffers()}

    def features(theta: Mapping[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(extractor, {**theta, **buffers}, (x,))

    if steps == 0:
        return [task.forward(features(params, x_eval), *head)]
    theta = {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}
    weight, bias = (t.detach().clone().requires_grad_(True) for t in head)
    leaves = [*theta.values(), weight, bias]
    inner = _inner_optimizer(optimizer, leaves, lr)
    x_in, y_in = train
    outputs = []
    for k in range(steps):
        loss = task.loss(task.forward(features(theta, x_in), weight, bias), y_in)
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        for leaf, grad in zip(leaves, grads, strict=True):
            leaf.grad = grad
        inner.step()
        if every_step or k == steps - 1:
            adapted = {n: t.detach() + (params[n] - params[n].detach()) for n, t in theta.items()}
            # Copies: the next inner step updates the leaves in place.
            phi = weight.detach().clone(), bias.detach().clone()
            outputs.append(task.forward(features(adapted, x_eval), *phi))
    return outputs


# -- the objectives --------------------------------------------------------------------------


@dataclass
class SimulatedAttack:
    """The attack a step simulated (see :attr:`SimulatedAttackObjective.last_attack`).

    Attributes:
        optimizer: the attacker's optimizer, one of :data:`INNER_OPTIMIZERS`.
        lr: its learning rate.
        heads: the fresh heads' initial ``(weight (C, K), bias (C,))`` by side
            (``"harmful"``; ``"pretrain"`` for SOPHON's D_P fine-tuning term).
    """

    optimizer: str
    lr: float
    heads: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)


def _check_count(name: str, value: Any, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
        raise ValueError(f"{name} must be an integer ≥ {least}, got {value!r}.")
    return int(value)


def _check_lrs(value: Any) -> tuple[float, float]:
    try:
        if isinstance(value, str):
            raise TypeError
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(
            f"inner_lrs must be a pair (low, high) of learning rates, got {value!r}."
        ) from None
    if not (math.isfinite(low) and math.isfinite(high) and 0 < low <= high):
        raise ValueError(
            f"inner_lrs must satisfy 0 < low ≤ high (finite), got {value!r}; the learning rate "
            "is drawn log-uniformly between them (low == high fixes it)."
        )
    return low, high


def _check_optimizers(value: Any) -> tuple[str, ...]:
    names = (value,) if isinstance(value, str) else value
    try:
        names = tuple(names)
    except TypeError:
        names = ()
    unknown = [n for n in names if n not in INNER_OPTIMIZERS]
    if not names or unknown:
        raise ValueError(
            f"inner_optimizers must be a non-empty list of names from {INNER_OPTIMIZERS}, got "
            f"{value!r}" + (f" (unknown: {unknown})." if unknown else ".")
        )
    return names


class _AttackerAwareObjective(Objective):
    """What SOPHON and TAR share: the attack distribution, its generator and the D_H task."""

    def __init__(
        self,
        lambda_harmful: float,
        inner_steps: int,
        inner_lrs: Sequence[float],
        inner_optimizers: Sequence[str] | str,
        seed: int,
        num_classes_harmful: int | None,
    ) -> None:
        self.lambda_harmful = check_lambda("lambda_harmful", lambda_harmful)
        self.inner_steps = _check_count("inner_steps", inner_steps, 0)
        self.inner_lrs = _check_lrs(inner_lrs)
        self.inner_optimizers = _check_optimizers(inner_optimizers)
        self.seed = _check_count("seed", seed, 0)
        if num_classes_harmful is not None:
            num_classes_harmful = _check_count("num_classes_harmful", num_classes_harmful, 2)
        self.num_classes_harmful = num_classes_harmful
        self._generator = torch.Generator().manual_seed(self.seed)
        self._last_attack: SimulatedAttack | None = None

    @property
    def last_attack(self) -> SimulatedAttack | None:
        """The attack simulated by the latest :meth:`backward` (``None`` before the first)."""
        return self._last_attack

    def _harmful_task(self, module: ObjectiveHost) -> _Task:
        if self.num_classes_harmful is not None:
            return _Task("multiclass", self.num_classes_harmful)
        task = _head_task(module.head)
        if task.kind == "regression":
            raise ValueError(
                f"objective {self.name!r} needs a classification task on D_H (its outer loss "
                "is on class probabilities), but the head is a regression head; set "
                "num_classes_harmful to the number of D_H classes."
            )
        return task

    def prepare(self, module: ObjectiveHost) -> None:
        """Fail at build time, not at the first step, when D_H's task cannot be told."""
        if self.lambda_harmful > 0:
            self._harmful_task(module)

    def sample_attack(self, shapes: Mapping[str, tuple[int, int]], like: Tensor) -> SimulatedAttack:
        """Draw one attack: optimizer, learning rate, then one fresh head per entry of
        ``shapes`` (``side → (outputs C, width K)``), in this order, from the private
        generator (float64 draws, cast to ``like``'s dtype and device)."""
        g = self._generator
        optimizer = self.inner_optimizers[
            int(torch.randint(len(self.inner_optimizers), (1,), generator=g))
        ]
        low, high = self.inner_lrs
        lr = low * (high / low) ** float(torch.rand((), generator=g, dtype=torch.float64))
        heads = {}
        for side, (outputs, width) in shapes.items():
            bound = 1.0 / math.sqrt(width)
            weight, bias = (
                ((torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1) * bound).to(like)
                for shape in ((outputs, width), (outputs,))
            )
            heads[side] = (weight, bias)
        self._last_attack = SimulatedAttack(optimizer, lr, heads)
        return self._last_attack

    def state_dict(self) -> dict[str, Tensor]:
        """The generator's state, so a resumed run draws the attacks it would have drawn."""
        return {"generator": self._generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        if "generator" in state:
            self._generator.set_state(state["generator"].cpu().to(torch.uint8))

    def _attack_harmful(
        self,
        module: ObjectiveHost,
        batch: Mapping[str, Any],
        attack: SimulatedAttack,
        every_step: bool = False,
    ) -> tuple[list[Tensor], Tensor]:
        """Log class probabilities of the attacked model(s) on D_H's held-out half, and its
        labels."""
        step = module.step_label()
        task = self._harmful_task(module)
        x, y = batch["harmful"][0], batch["harmful"][1]
        task.check_labels(y, "harmful", step)
        train, (x_out, y_out) = _halves(x, y, "harmful", step)
        outputs = _simulated_finetuning(
            module.extractor,
            task,
            attack.heads["harmful"],
            train,
            x_out,
            self.inner_steps,
            attack.optimizer,
            attack.lr,
            every_step=every_step,
        )
        return [task.log_probs(out) for out in outputs], task.labels(y_out, outputs[-1])


class SimulatedAttackObjective(_AttackerAwareObjective):
    r"""``sophon``: non-fine-tunable learning against a simulated attack (after SOPHON, Deng
    et al., IEEE S&P 2024).

    One step (``θ`` the extractor's trainable parameters; batches ``(B, ...)`` per side, each
    split in halves ``in``/``out``; module docstring for the attack)::

        L = L_P(θ, ω)                                   task loss, whole D_P batch, module head ω
          + λ_H  · L_outer(φ_K^H, f_{θ_K^H}(X_H_out))    after K attack steps on X_H_in
          + λ_PF · CE(φ_K^P, f_{θ_K^P}(X_P_out))         after the same attack on X_P_in

    ``L_outer`` (minimised) pushes the attacked model's D_H predictions ``p`` towards
    uselessness: ``"kl_uniform"``, ``KL(U ‖ p) = −log C − mean_c log p_c`` (uniform
    predictions), or ``"inverse_ce"``, ``−log(1 − p_y)`` (the true class unlikely). The last
    term (SOPHON keeps D_P trainable by normal training; this adds the D_P loss after a
    simulated fine-tuning with a fresh head ``φ^P``, the module head's task) keeps the released
    features fine-tunable for D_P. Gradients are first order through the attack; with
    ``inner_steps=0`` the step is exactly
    ``L_P + λ_H·L_outer(φ_0^H, f_θ(X_H_out)) + λ_PF·CE(φ_0^P, f_θ(X_P_out))``. A term with
    ``λ = 0`` is skipped (no simulation).

    Args:
        lambda_harmful: ``λ_H ≥ 0``, the weight of the post-attack D_H suppression loss.
        lambda_pretrain_finetune: ``λ_PF ≥ 0``, the weight of the post-fine-tuning D_P loss.
        inner_steps: ``K ≥ 0``, the attacker's fine-tuning steps.
        inner_lrs: ``(low, high)``, ``0 < low ≤ high``: each step's attack learning rate is
            drawn log-uniformly in it.
        inner_optimizers: the attacker's optimizers (from :data:`INNER_OPTIMIZERS`), one
            drawn uniformly per step.
        outer_loss: ``"kl_uniform"`` or ``"inverse_ce"`` (:data:`OUTER_LOSSES`).
        seed: seed ``≥ 0`` of the objective's private generator (attacks, fresh heads).
        num_classes_harmful: classes of D_H (``≥ 2``; the attacker's head has this many
            logits); ``None``: the module head's task and width.

    Logs ``task_loss``, ``harmful_<outer_loss>``, ``harmful_ce_after_attack``,
    ``harmful_accuracy_after_attack`` (the attacker's, on the held-out half),
    ``pretrain_loss_after_finetune`` and ``inner_lr``.
    """

    name = "sophon"
    simulates_fine_tuning = True

    def __init__(
        self,
        lambda_harmful: float = 1.0,
        lambda_pretrain_finetune: float = 1.0,
        inner_steps: int = 3,
        inner_lrs: Sequence[float] = (1e-4, 1e-1),
        inner_optimizers: Sequence[str] | str = ("sgd", "adam"),
        outer_loss: str = "kl_uniform",
        seed: int = 0,
        num_classes_harmful: int | None = None,
    ) -> None:
        super().__init__(
            lambda_harmful, inner_steps, inner_lrs, inner_optimizers, seed, num_classes_harmful
        )
        self.lambda_pretrain_finetune = check_lambda(
            "lambda_pretrain_finetune", lambda_pretrain_finetune
        )
        if outer_loss not in OUTER_LOSSES:
            raise unknown_choice("outer_loss", outer_loss, OUTER_LOSSES)
        self.outer_loss = outer_loss

    def backward(self, module: ObjectiveHost, batch: Mapping[str, Any]) -> ObjectiveOutput:
        z = module.features(batch["pretrain"][0], side="pretrain")
        loss = module.task_loss(z, batch["pretrain"][1])
        attack_terms, logs, terms = self.attack_terms(module, batch, z.reshape(z.shape[0], -1))
        module.manual_backward(loss + attack_terms)
        return ObjectiveOutput(
            loss=loss.detach(), logs={"task_loss": loss.detach(), **logs}, terms=terms
        )

    def attack_terms(
        self, module: ObjectiveHost, batch: Mapping[str, Any], z: Tensor
    ) -> tuple[Tensor | float, dict[str, Tensor | float], dict[str, Tensor | float]]:
        """``λ_H·L_outer + λ_PF·CE`` of one step (everything but the task loss), its logs and
        its named terms; ``z`` ``(B, K)``: the D_P batch's features (width and dtype)."""
        x_p, y_p = batch["pretrain"][0], batch["pretrain"][1]
        width = z.shape[1]
        shapes = {}
        if self.lambda_harmful > 0:
            shapes["harmful"] = (self._harmful_task(module).outputs, width)
        if self.lambda_pretrain_finetune > 0:
            pretrain_task = _head_task(module.head)
            shapes["pretrain"] = (pretrain_task.outputs, width)
        attack = self.sample_attack(shapes, z)
        total: Tensor | float = 0.0
        logs: dict[str, Tensor | float] = {"inner_lr": attack.lr}
        terms: dict[str, Tensor | float] = {}
        if self.lambda_harmful > 0:
            [log_p], y_out = self._attack_harmful(module, batch, attack)
            if self.outer_loss == "kl_uniform":
                outer = _kl_uniform(log_p)
            else:
                outer = _inverse_ce(log_p, y_out)
            total = total + self.lambda_harmful * outer
            logs[f"harmful_{self.outer_loss}"] = outer.detach()
            logs.update(_attack_metrics(log_p, y_out))
            terms[f"harmful {self.outer_loss} after the simulated attack"] = outer.detach()
        if self.lambda_pretrain_finetune > 0:
            train, (x_out, y_out_p) = _halves(x_p, y_p, "pretrain", module.step_label())
            [out] = _simulated_finetuning(
                module.extractor,
                pretrain_task,
                attack.heads["pretrain"],
                train,
                x_out,
                self.inner_steps,
                attack.optimizer,
                attack.lr,
            )
            finetuned = pretrain_task.loss(out, y_out_p)
            total = total + self.lambda_pretrain_finetune * finetuned
            logs["pretrain_loss_after_finetune"] = finetuned.detach()
            terms["pretrain loss after the simulated fine-tuning"] = finetuned.detach()
        return total, logs, terms


class TamperResistanceObjective(_AttackerAwareObjective):
    r"""``tar``: tamper-resistance training against simulated fine-tuning attacks (after TAR,
    Tamirisa et al., ICLR 2025).

    One step (``θ`` the extractor's trainable parameters; the D_H batch split in halves
    ``in``/``out``; module docstring for the attack)::

        L = λ_R · L_P(θ, ω)                                  retain loss: task loss on D_P
          + λ_H · mean_{k∈T} −H(p_{θ_k}(X_H_out))            tamper-resistance loss

    with ``p_{θ_k} = softmax(φ_k(f_{θ_k}(·)))`` the attacked model after ``k`` steps on
    ``X_H_in`` and ``−H(p) = Σ_c p_c log p_c`` (minimised: maximum-entropy predictions, TAR's
    entropy loss). As in TAR's algorithm, the tamper-resistance gradient is first order and
    accumulated along the attack trajectory: ``T = {1, …, K}`` with ``average_trajectory``,
    else ``T = {K}``; with ``inner_steps=0``, ``T = {0}``, exactly
    ``λ_R·L_P + λ_H·(−H(p_{φ_0}(f_θ(X_H_out))))``.

    Args:
        lambda_harmful: ``λ_H ≥ 0``, the weight of the tamper-resistance loss.
        lambda_retain: ``λ_R ≥ 0``, the weight of the retain loss (the D_P task loss).
        inner_steps: ``K ≥ 0``, the attacker's fine-tuning steps.
        inner_lrs: ``(low, high)``, ``0 < low ≤ high``: the attack learning rate is drawn
            log-uniformly in it, once per step.
        inner_optimizers: the attacker's optimizers (from :data:`INNER_OPTIMIZERS`), one
            drawn uniformly per step.
        seed: seed ``≥ 0`` of the objective's private generator (attacks, fresh heads).
        num_classes_harmful: classes of D_H (``≥ 2``); ``None``: the module head's task.
        average_trajectory: average the entropy loss over the ``K`` adapted models (TAR) or
            take it after the last step only.

    Logs ``task_loss``, ``harmful_negative_entropy``, ``harmful_ce_after_attack`` and
    ``harmful_accuracy_after_attack`` (after the last step, on the held-out half) and
    ``inner_lr``.
    """

    name = "tar"
    simulates_fine_tuning = True

    def __init__(
        self,
        lambda_harmful: float = 1.0,
        lambda_retain: float = 1.0,
        inner_steps: int = 3,
        inner_lrs: Sequence[float] = (1e-4, 1e-1),
        inner_optimizers: Sequence[str] | str = ("sgd", "adam"),
        seed: int = 0,
        num_classes_harmful: int | None = None,
        average_trajectory: bool = True,
    ) -> None:
        super().__init__(
            lambda_harmful, inner_steps, inner_lrs, inner_optimizers, seed, num_classes_harmful
        )
        self.lambda_retain = check_lambda("lambda_retain", lambda_retain)
        if not isinstance(average_trajectory, bool):
            raise ValueError(
                f"average_trajectory must be True or False, got {average_trajectory!r}."
            )
        self.average_trajectory = average_trajectory

    def backward(self, module: ObjectiveHost, batch: Mapping[str, Any]) -> ObjectiveOutput:
        z = module.features(batch["pretrain"][0], side="pretrain")
        loss = module.task_loss(z, batch["pretrain"][1])
        total = self.lambda_retain * loss
        logs: dict[str, Tensor | float] = {"task_loss": loss.detach()}
        terms: dict[str, Tensor | float] = {}
        if self.lambda_harmful > 0:
            width = z.reshape(z.shape[0], -1).shape[1]
            shapes = {"harmful": (self._harmful_task(module).outputs, width)}
            attack = self.sample_attack(shapes, z)
            log_ps, y_out = self._attack_harmful(
                module, batch, attack, every_step=self.average_trajectory
            )
            tamper = torch.stack([_negative_entropy(log_p) for log_p in log_ps]).mean()
            total = total + self.lambda_harmful * tamper
            logs["harmful_negative_entropy"] = tamper.detach()
            logs.update(_attack_metrics(log_ps[-1], y_out))
            logs["inner_lr"] = attack.lr
            terms["harmful negative entropy after the simulated attack"] = tamper.detach()
        module.manual_backward(total)
        return ObjectiveOutput(loss=loss.detach(), logs=logs, terms=terms)


class AttackerAwareConditionNumberObjective(Objective):
    r"""``ours_sa``: ours (Eq. 11) plus SOPHON's simulated-attack terms.

    One step::

        L = L_P + λ_P·R_min(S_P) + λ_H·R_max(S_H)            ours, Eq. 11 (Algorithm 1)
          + λ_A  · L_outer(φ_K^H, f_{θ_K^H}(X_H_out))        after K simulated attack steps
          + λ_PF · CE(φ_K^P, f_{θ_K^P}(X_P_out))             D_P stays fine-tunable

    The condition-number terms make the *linear probe* on D_H ill-conditioned; the simulated
    attack (:class:`SimulatedAttackObjective`, first-order, with a fresh head) targets the
    fine-tuning attacker that the conditioning view alone does not see. The two parts are
    computed by the two objectives and their gradients add up in ``.grad`` (the attack terms'
    gradient is not preconditioned, whatever ``preconditioner`` says).

    Args:
        lambda_pretrain, lambda_harmful, preconditioner, ridge, rank_rule, covariance,
            ema_decay: ours' settings
            (:class:`~lightning_immunize.objectives.ConditionNumberObjective`).
        lambda_attack: ``λ_A ≥ 0``, SOPHON's ``λ_H`` (the post-attack D_H suppression loss).
        lambda_pretrain_finetune, inner_steps, inner_lrs, inner_optimizers, outer_loss, seed,
            num_classes_harmful: the simulated attack (:class:`SimulatedAttackObjective`).

    With ``lambda_attack = lambda_pretrain_finetune = 0`` the step is ours' exactly.
    """

    name = "ours_sa"
    simulates_fine_tuning = True

    def __init__(
        self,
        lambda_pretrain: float = 1.0,
        lambda_harmful: float = 1.0,
        preconditioner: str = "auto",
        ridge: float = 1e-3,
        rank_rule: str = "auto",
        covariance: str = "batch",
        ema_decay: float = 0.9,
        lambda_attack: float = 1.0,
        lambda_pretrain_finetune: float = 1.0,
        inner_steps: int = 3,
        inner_lrs: Sequence[float] = (1e-4, 1e-1),
        inner_optimizers: Sequence[str] | str = ("sgd", "adam"),
        outer_loss: str = "kl_uniform",
        seed: int = 0,
        num_classes_harmful: int | None = None,
    ) -> None:
        self._ours = ConditionNumberObjective(
            lambda_pretrain, lambda_harmful, preconditioner, ridge, rank_rule, covariance, ema_decay
        )
        self._attack = SimulatedAttackObjective(
            lambda_attack,
            lambda_pretrain_finetune,
            inner_steps,
            inner_lrs,
            inner_optimizers,
            outer_loss,
            seed,
            num_classes_harmful,
        )

    def hyperparameters(self) -> dict[str, Any]:
        attack = self._attack.hyperparameters()
        attack["lambda_attack"] = attack.pop("lambda_harmful")
        return {**self._ours.hyperparameters(), **attack}

    @property
    def last_attack(self) -> SimulatedAttack | None:
        """The attack simulated by the latest :meth:`backward`."""
        return self._attack.last_attack

    def prepare(self, module: ObjectiveHost) -> None:
        self._ours.prepare(module)
        self._attack.prepare(module)

    def state_dict(self) -> dict[str, Tensor]:
        return {**self._ours.state_dict(), **self._attack.state_dict()}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        self._ours.load_state_dict(state)
        self._attack.load_state_dict(state)

    def backward(self, module: ObjectiveHost, batch: Mapping[str, Any]) -> ObjectiveOutput:
        out = self._ours.backward(module, batch)
        attack = self._attack
        if attack.lambda_harmful == 0 and attack.lambda_pretrain_finetune == 0:
            return out
        extractor = module.extractor
        # Two D_P samples give the features' width and dtype; copies of the buffers keep the
        # module's BatchNorm statistics untouched, as in the simulated attacks.
        state = {**dict(extractor.named_parameters()),
                 **{n: b.clone() for n, b in extractor.named_buffers()}}  # fmt: skip
        with torch.no_grad():
            z = functional_call(extractor, state, (batch["pretrain"][0][:2],))
        total, logs, terms = attack.attack_terms(module, batch, z.reshape(z.shape[0], -1))
        module.manual_backward(total)
        return ObjectiveOutput(
            loss=out.loss, logs={**out.logs, **logs}, terms={**out.terms, **terms}
        )
