r"""The :class:`ImmunizationModule`: Algorithm 1 with manual optimization.

One training step::

    zero_grad
    objective.backward(module, batch)   # task loss on D_P + the objective's regularizer terms,
                                        # each regularizer gradient preconditioned (Algorithm 1)
    check the step (finite task loss, regularizer terms and gradients; else ValueError)
    clip gradients; optimizer.step(); scheduler.step()

The objectives (ours, Eq. 11, and the baselines) live in :mod:`lightning_immunize.objectives`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Protocol

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_immunize import objectives
from lightning_immunize.models import LinearExtractor, LinearHead, TimmBackbone, evaluating
from lightning_immunize.objectives import Objective, ObjectiveOutput, make_objective
from lightning_immunize.sides import SIDES
from lightning_immunize.validation import check_finite

__all__ = ["ImmunizationModule"]

# Configs and code written before the objectives moved name
# ``lightning_immunize.module.ConditionNumberObjective``: they keep working, with a warning.
_MOVED_TO_OBJECTIVES = (
    "ConditionNumberObjective",
    "RMaxOnlyObjective",
    "ConditionNumberOptObjective",
    "IMMAObjective",
    "OBJECTIVES",
)


def __getattr__(name: str) -> Any:
    if name in _MOVED_TO_OBJECTIVES:
        warnings.warn(
            f"lightning_immunize.module.{name} is deprecated: import it from "
            "lightning_immunize.objectives; the old path goes away in the next release.",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(objectives, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


#: ``params → Optimizer`` (LightningCLI parses ``class_path: torch.optim.Adam`` into one).
OptimizerFactory = Callable[[Iterable[Any]], torch.optim.Optimizer]
#: ``optimizer → LR scheduler``.
SchedulerFactory = Callable[
    [torch.optim.Optimizer],
    torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau,
]


class ModuleLike(Protocol):
    """Any ``torch.nn.Module`` (anything with ``parameters()``), in the type hints of
    ``extractor`` and ``head`` next to our own classes.

    A type hint only: the CLI (jsonargparse) accepts for it any class that implements it,
    so a config may name any ``nn.Module`` (a torchvision model, one's own CNN), while
    ``fit --help`` lists the known subclasses of our classes only, not every ``nn.Module``
    subclass that happens to be imported (~1,350 lines).
    """

    def parameters(self, recurse=True): ...


@contextmanager
def _frozen_running_stats(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers in train mode normalise with batch statistics as usual, but their
    running statistics do not move (momentum 0 for the forward; restoring the buffers
    afterwards would break autograd, which saves them)."""
    saved = [
        (m, m.momentum, m.num_batches_tracked.clone())
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        and m.training
        and m.track_running_stats
        and m.num_batches_tracked is not None
    ]
    for m, _, _ in saved:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum, count in saved:
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)


class ImmunizationModule(pl.LightningModule):
    """Immunize ``extractor`` (with classifier ``head``) by Algorithm 1, manual optimization.

    Args:
        extractor: feature extractor ``f_θ``: inputs (B, ...) → features (B, K); a
            ``LinearExtractor``, a ``TimmBackbone`` (any timm model) or any other
            ``torch.nn.Module`` (e.g. a torchvision model or one's own CNN, by class path).
        head: classifier ``g_ω``, an ``nn.Module`` with ``loss(output, target)``,
            ``metric(output, target)`` and ``metric_name`` (a
            :class:`~lightning_immunize.models.LinearHead`); ``None`` takes the
            extractor's own classifier (``extractor.make_head()``, e.g. a timm model's fc).
        objective: an :class:`Objective` (default: ours with λ_P = λ_H = 1).
        optimizer: a factory ``params → Optimizer`` (default ``torch.optim.Adam(lr=1e-3)``);
            it receives two parameter groups, extractor and head.
        extractor_lr: learning rate of the extractor's parameter group (``None`` keeps the
            optimizer's own ``lr``).
        head_lr: learning rate of the head's parameter group (``None`` keeps the optimizer's
            own ``lr``).
        extractor_weight_decay: weight decay of the extractor's parameter group (``None``
            keeps the optimizer's own ``weight_decay``).
        head_weight_decay: weight decay of the head's parameter group (``None`` keeps the
            optimizer's own ``weight_decay``).
        scheduler: a factory ``optimizer → LR scheduler`` stepped every ``scheduler_interval``
            (``None``: constant learning rate). A ``ReduceLROnPlateau`` watches
            ``val/task_loss``, else ``train/task_loss``.
        scheduler_interval: when the scheduler steps: ``"epoch"`` (after every training
            epoch) or ``"step"`` (after every optimizer step).
        gradient_clip_val: clip the global gradient norm to this value (``None``: no clip).
        label_smoothing: passed to the head's loss.
        method: shortcut for ``objective``: the name of a registered objective
            (:data:`~lightning_immunize.objectives.OBJECTIVES`: ``ours``, ``rmax_only``,
            ``opt``, ``imma``, ``sophon``, ``tar``, ``ours_sa``, ``ours_kfac``, ``erasure``, and
            any added with
            :func:`~lightning_immunize.objectives.register_objective`); give ``method`` or
            ``objective``, not both.
        method_args: the keyword arguments of ``method``'s objective, e.g.
            ``{lambda_pretrain: 30.0, lambda_harmful: 1000.0}`` (``None``: its defaults).
        harmful_bn_stats: whether forwards of harmful batches update BatchNorm running
            statistics. Default ``False``: the released model's running statistics stay those
            of its own task D_P; a D_H forward made only for the regularizer uses the batch
            statistics as usual (same gradients) but leaves the running ones as they were.
    """

    def __init__(
        self,
        extractor: LinearExtractor | TimmBackbone | ModuleLike,
        head: LinearHead | ModuleLike | None = None,
        objective: Objective | None = None,
        optimizer: OptimizerFactory | None = None,
        extractor_lr: float | None = None,
        head_lr: float | None = None,
        extractor_weight_decay: float | None = None,
        head_weight_decay: float | None = None,
        scheduler: SchedulerFactory | None = None,
        scheduler_interval: str = "epoch",
        gradient_clip_val: float | None = None,
        label_smoothing: float = 0.0,
        method: str | None = None,
        method_args: dict[str, Any] | None = None,
        harmful_bn_stats: bool = False,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.harmful_bn_stats = harmful_bn_stats
        if method is not None:
            if objective is not None:
                raise ValueError(
                    f"give either objective or method, not both (got method={method!r} and "
                    f"objective={type(objective).__name__})."
                )
            objective = make_objective(method, **(method_args or {}))
        self.extractor = extractor
        if head is None:
            if not hasattr(extractor, "make_head"):
                raise ValueError(
                    f"head is None but {type(extractor).__name__} has no make_head() to take "
                    "the model's own classifier from; pass a head."
                )
            head = extractor.make_head()
        self.head = head
        if objective is None:
            objective = objectives.ConditionNumberObjective()
        self.objective = objective
        if not isinstance(self.objective, Objective):
            raise TypeError(f"objective must be an Objective, got {type(objective).__name__}.")
        self.objective.prepare(self)
        self.optimizer_factory = optimizer
        self.group_options = {
            "extractor": {"lr": extractor_lr, "weight_decay": extractor_weight_decay},
            "head": {"lr": head_lr, "weight_decay": head_weight_decay},
        }
        if scheduler_interval not in ("step", "epoch"):
            raise ValueError(
                f"scheduler_interval must be 'step' or 'epoch', got {scheduler_interval!r}."
            )
        self.scheduler_factory = scheduler
        self.scheduler_interval = scheduler_interval
        if gradient_clip_val is not None and not gradient_clip_val > 0:
            raise ValueError(f"gradient_clip_val must be > 0 or None, got {gradient_clip_val!r}.")
        self.gradient_clip_val = gradient_clip_val
        self.label_smoothing = float(label_smoothing)
        self.save_hyperparameters(
            ignore=["extractor", "head", "objective", "optimizer", "scheduler"]
        )

    # -- model ------------------------------------------------------------------------------

    def features(self, x: Tensor, side: str = "pretrain") -> Tensor:
        """Features ``f_θ(x)`` (B, K); ``side`` names the dataset in error messages.

        Raises ``ValueError`` for a batch of one sample and for NaN/inf in the inputs or the
        features, naming the step, the dataset and the tensor.
        """
        if x.shape[0] < 2:
            raise ValueError(
                f"the {side} batch has {x.shape[0]} sample(s); the regularizers need at least 2."
            )
        self._check_finite(x, side, "inputs")
        if side == "harmful" and not self.harmful_bn_stats:
            with _frozen_running_stats(self.extractor):
                z = self.extractor(x)
        else:
            z = self.extractor(x)
        self._check_finite(z, side, "features")
        return z

    def step_label(self) -> int | str:
        """The trainer's global step, or ``"?"`` outside a trainer (for messages)."""
        return self._trainer.global_step if self._trainer is not None else "?"

    def grad_scaler(self) -> Any:
        """The ``GradScaler`` of the trainer's precision plugin (16-bit mixed precision),
        else ``None``."""
        plugin = getattr(self._trainer, "precision_plugin", None)
        return getattr(plugin, "scaler", None)

    def loss_scale(self) -> float:
        """The factor :meth:`manual_backward` multiplies a loss by (1 without a
        ``GradScaler``), so gradients an objective adds to ``.grad`` by hand are on the same
        scale (:class:`~lightning_immunize.objectives.ObjectiveHost`)."""
        scaler = self.grad_scaler()
        return float(scaler.get_scale()) if scaler is not None else 1.0

    def _check_finite(self, t: Tensor, side: str, what: str) -> None:
        where = f" in the {side} dataset's batch at training step {self.step_label()}"
        check_finite(t, what, where)

    def _check_step(self, out: ObjectiveOutput) -> None:
        """Refuse, before ``optimizer.step()`` so the parameters stay as they were, a step
        whose task loss, regularizer term (``out.terms``) or parameter gradient is not finite.

        One device sync when all is well. Gradients are not checked under a ``GradScaler``
        (16-bit mixed precision), which skips overflowing steps itself.
        """
        name = self.objective.name
        terms = {k: torch.as_tensor(v) for k, v in out.terms.items()}
        grads: list[tuple[str, Tensor]] = []
        if self.grad_scaler() is None:
            grads = [(n, p.grad) for n, p in self.named_parameters() if p.grad is not None]
        flags = [torch.isfinite(out.loss).all()]
        flags += [torch.isfinite(v).all() for v in terms.values()]
        flags += [torch.isfinite(g).all() for _, g in grads]
        device = out.loss.device
        if bool(torch.stack([f.to(device) for f in flags]).all()):
            return
        step = self.step_label()
        refused = "The step was refused before optimizer.step(): the parameters were not updated."
        if not torch.isfinite(out.loss).all():
            raise ValueError(
                f"non-finite task loss ({float(out.loss)}) on the pretrain dataset's batch at "
                f"training step {step} (objective {name!r}); expected a finite loss. {refused}"
            )
        bad_terms = [f"{k} = {float(v)}" for k, v in terms.items() if not torch.isfinite(v).all()]
        if bad_terms:
            raise ValueError(
                f"objective {name!r}: non-finite regularizer term {', '.join(bad_terms)} at "
                f"training step {step}; expected a finite value (task loss "
                f"{float(out.loss):.6g}). A degenerate feature spectrum is the usual cause, "
                "e.g. κ = inf from a zero eigenvalue among those the rank rule keeps (dead or "
                f"collapsed features). {refused}"
            )
        bad = [(n, g) for n, g in grads if not torch.isfinite(g).all()]
        n, g = bad[0]
        more = f" (and {len(bad) - 1} more parameter(s))" if len(bad) > 1 else ""
        finite = ", ".join(f"{k} = {float(v):.6g}" for k, v in terms.items()) or "none"
        raise ValueError(
            f"objective {name!r}: non-finite gradient (NaN or inf in "
            f"{int((~torch.isfinite(g)).sum())} of {g.numel()} entries) of {n}{more} at "
            f"training step {step}; expected finite gradients (the task loss "
            f"{float(out.loss):.6g} and the regularizer terms [{finite}] are finite). {refused}"
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.extractor(x))

    def task_loss(self, z: Tensor, y: Tensor) -> Tensor:
        output = self.head(z)
        if self.label_smoothing:
            return self.head.loss(output, y, label_smoothing=self.label_smoothing)
        return self.head.loss(output, y)

    # -- optimization -----------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        # Lightning restores checkpoint weights before its precision plugin converts the
        # module: under "64-true" a float64 checkpoint would be rounded through float32
        # parameters on resume (≈1e-7 relative). Converting here, first, keeps it exact.
        trainer = self._trainer
        if trainer is not None and str(trainer.precision).startswith("64"):
            self.to(torch.float64)

    def on_fit_start(self) -> None:
        self.check_data()

    @torch.no_grad()
    def check_data(self) -> None:
        """Refuses, before the first training step, a D_P or D_H whose first batch-worth of
        training samples has NaN/inf inputs, all-zero inputs or all-zero features: a rank-0
        covariance, whose condition number (and so every regularizer) is undefined.

        Looks at the data module's ``pretrain`` / ``harmful`` datasets (any map-style dataset
        of ``(x, y)``); does nothing without them.
        """
        dm = getattr(self._trainer, "datamodule", None)
        param = next(self.extractor.parameters(), None)
        for side in SIDES:
            dataset = getattr(dm, side, None)
            try:
                n = min(len(dataset), max(2, int(getattr(dm, "batch_size", 64))))
            except TypeError:  # no dataset, or an iterable one without a length
                continue
            x = torch.stack([torch.as_tensor(dataset[i][0]) for i in range(n)])
            if param is not None and x.is_floating_point():
                x = x.to(device=param.device, dtype=param.dtype)
            self._check_finite(x, side, "inputs")
            if not bool(x.ne(0).any()):
                raise ValueError(
                    f"the {side} dataset's first {n} training inputs are all zero: their "
                    "covariance has rank 0, so its condition number is undefined; expected "
                    "inputs with a non-zero entry. Check the data (empty images? a "
                    "column-selection mistake?)."
                )
            with evaluating(self.extractor):
                z = self.extractor(x)
            self._check_finite(z, side, "features")
            if not bool(z.ne(0).any()):
                raise ValueError(
                    f"the extractor maps the {side} dataset's first {n} training inputs to "
                    "all-zero features: their covariance has rank 0, so its condition number "
                    "is undefined (dead activations? a zero-initialized extractor?); expected "
                    "features with a non-zero entry."
                )

    def configure_optimizers(self):
        groups = []
        for name, part in (("extractor", self.extractor), ("head", self.head)):
            params = [p for p in part.parameters() if p.requires_grad]
            if not params:
                continue
            group: dict[str, Any] = {"params": params, "name": name}
            group.update({k: v for k, v in self.group_options[name].items() if v is not None})
            groups.append(group)
        if not groups:
            raise ValueError(
                "the extractor and the head have no trainable parameters; expected at least one "
                "with requires_grad=True."
            )
        factory = self.optimizer_factory or (lambda p: torch.optim.Adam(p, lr=1e-3))
        optimizer = factory(groups)
        if self.scheduler_factory is None:
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": {
                "scheduler": self.scheduler_factory(optimizer),
                "interval": self.scheduler_interval,
            },
        }

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        optimizer = self.optimizers()
        optimizer.zero_grad()
        for side in SIDES:  # before any objective touches them, so the message names the side
            self._check_finite(batch[side][0], side, "inputs")
        out = self.objective.backward(self, batch)
        self._check_step(out)
        if self.gradient_clip_val is not None:
            self.clip_gradients(optimizer, gradient_clip_val=self.gradient_clip_val)
        optimizer.step()
        if self.scheduler_interval == "step":
            self._step_scheduler()
        batch_size = int(batch["pretrain"][0].shape[0])
        for name, value in out.logs.items():
            self.log(
                f"train/{name}",
                value,
                on_step=True,
                on_epoch=False,
                batch_size=batch_size,
                prog_bar=name in ("task_loss", "kappa_harmful"),
            )
        return out.loss

    def on_train_epoch_end(self) -> None:
        if self.scheduler_interval == "epoch":
            self._step_scheduler()

    def _step_scheduler(self) -> None:
        scheduler = self.lr_schedulers()
        if scheduler is None:
            return
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            # It needs a figure to watch: the latest validation loss, else the task loss.
            metrics = self.trainer.callback_metrics
            value = metrics.get("val/task_loss", metrics.get("train/task_loss"))
            if value is not None:
                scheduler.step(value)
            return
        scheduler.step()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.objective.load_state_dict(checkpoint.get("objective_state", {}))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["objective_state"] = self.objective.state_dict()
        # Plain types only, so the checkpoint still loads with ``weights_only=True``.
        checkpoint["immunization"] = {
            "method": self.objective.name,
            **{
                k: v
                for k, v in self.objective.hyperparameters().items()
                if isinstance(v, int | float | str | bool)
            },
        }

    # -- evaluation -------------------------------------------------------------------------

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        pretrain = batch.get("pretrain")
        if pretrain is None:
            return
        x, y = pretrain[0], pretrain[1]
        output = self(x)
        self.log("val/task_loss", self.head.loss(output, y), batch_size=x.shape[0], prog_bar=True)
        self.log(f"val/{self.head.metric_name}", self.head.metric(output, y), batch_size=x.shape[0])

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        pretrain = batch.get("pretrain")
        if pretrain is None:
            return
        x, y = pretrain[0], pretrain[1]
        output = self(x)
        self.log("test/task_loss", self.head.loss(output, y), batch_size=x.shape[0])
        self.log(
            f"test/{self.head.metric_name}", self.head.metric(output, y), batch_size=x.shape[0]
        )
