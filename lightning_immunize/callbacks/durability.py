"""The durability report card at the end of ``fit``: a thin adapter over
:func:`lightning_immunize.attacks.durability.durability_card`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from lightning_immunize.attacks.budgets import DEFAULT_BUDGETS, load_budget
from lightning_immunize.attacks.durability import durability_card
from lightning_immunize.attacks.tasks import attack_tasks, released_models
from lightning_immunize.callbacks.reference import ReferenceKeeper
from lightning_immunize.distributed import world_size

__all__ = ["DurabilityCard"]


class DurabilityCard(ReferenceKeeper):
    """Runs a durability budget on the trained model when the last training epoch ends and
    logs its worst-case figures: per resistance data budget ``n`` and attacker family,
    ``attack/{family}/n={n}/A_immunized``, ``…/A_reference``, ``…/advantage_removed`` and its
    bootstrap 90 % interval ``…/advantage_removed_low`` / ``…_high`` (when defined). The
    card's files go to ``out`` (default ``<log_dir>/attack-<budget>``).

    The immunized model is compared with θ_0 (the extractor as it was when fit started; the
    identity for a linear extractor) and, for deep nets, θ_0's architecture from scratch.
    Only global rank 0 attacks; the others wait.

    Args:
        budget: a budget name of ``budgets`` (``quick``, ``standard``, ``long``).
        budgets: the budgets file (default ``configs/attack.yaml``).
        families: attacker families (default: the budget's).
        out: output folder.
        storage: an Optuna storage URL (default: SQLite in ``out``).

    Raises:
        ValueError: an unknown budget, at construction.

    Example:
        >>> callback = DurabilityCard(budget="quick")
        >>> callback.budget.trials
        2
    """

    def __init__(
        self,
        budget: str = "quick",
        budgets: str | Path | None = None,
        families: Sequence[str] | None = None,
        out: str | Path | None = None,
        storage: str | None = None,
    ) -> None:
        self.budget = load_budget(budget, budgets or DEFAULT_BUDGETS)
        self.families = families
        self.out = out
        self.storage = storage
        self.reference = None
        self.card: dict[str, Any] | None = None

    def _last_epoch(self, trainer: pl.Trainer) -> bool:
        if trainer.should_stop:
            return True
        if trainer.max_steps and trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
            return True
        return trainer.max_epochs is not None and trainer.current_epoch + 1 >= trainer.max_epochs

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.card is not None or not self._last_epoch(trainer):
            return
        if trainer.is_global_zero:
            self.card = self._attack(trainer, pl_module)
            for name, value in self.figures(self.card).items():
                pl_module.log(name, value, rank_zero_only=True)
        if world_size() > 1:
            trainer.strategy.barrier("lightning_immunize.durability_card")

    def _attack(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        space = self.budget.space
        models = released_models(pl_module.extractor, self.reference, space.seed)
        tasks = attack_tasks(
            trainer.datamodule,
            self.budget.eval_samples,
            space.seed,
            unseen_samples=self.budget.unseen_samples,
        )
        out = self.out or Path(trainer.log_dir or trainer.default_root_dir) / (
            f"attack-{self.budget.name}"
        )
        was = pl_module.training
        try:
            return durability_card(
                models, tasks, self.budget, out, self.families, self.storage, progress=False
            )
        finally:
            pl_module.train(was)

    @staticmethod
    def figures(card: dict[str, Any]) -> dict[str, float]:
        """The logged figures of a card (resistance only)."""
        logged = {}
        for budget, families in card.get("resistance", {}).items():
            for family, entry in families.items():
                prefix = f"attack/{family}/n={budget}"
                for model in ("immunized", "reference"):
                    if model in entry:
                        logged[f"{prefix}/A_{model}"] = float(entry[model]["mean"])
                if entry.get("advantage_removed") is not None:
                    logged[f"{prefix}/advantage_removed"] = float(entry["advantage_removed"])
                interval = entry.get("advantage_removed_interval")
                if interval is not None:  # the bootstrap 90 % interval
                    logged[f"{prefix}/advantage_removed_low"] = float(interval[0])
                    logged[f"{prefix}/advantage_removed_high"] = float(interval[1])
        return logged
