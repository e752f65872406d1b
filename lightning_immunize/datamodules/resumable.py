"""Training loaders that resume mid-epoch exactly (Lightning's stateful-loader interface).

Lightning saves ``state_dict()`` of every loader of the training ``CombinedLoader`` in each
checkpoint and calls ``load_state_dict()`` before iterating again on resume. A plain
``DataLoader`` has neither: a run resumed from a mid-epoch checkpoint would start the epoch's
batches again from the top, in another shuffle order. :class:`ResumableDataLoader` records
the shuffle generator's state at the start of the epoch and now, and how many batches of the
epoch the training loop has consumed (read from the trainer, not counted here, because
Lightning fetches one batch ahead). Resumed mid-epoch, it replays the epoch's shuffles without
loading any data and skips the consumed batches at the index level; resumed at an epoch's end,
it takes the generator as it was. Either way the resumed run sees exactly the batches the
uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, Sampler

__all__ = ["SkippingBatchSampler", "ResumableDataLoader"]


class SkippingBatchSampler(BatchSampler):
    """A :class:`~torch.utils.data.BatchSampler` whose next iteration can skip its first
    ``skip`` batches (indices are drawn as usual, so random state advances identically)."""

    def __init__(self, sampler: Sampler[int], batch_size: int, drop_last: bool) -> None:
        super().__init__(sampler, batch_size, drop_last)
        self.skip = 0

    def __iter__(self) -> Iterator[list[int]]:
        skip, self.skip = self.skip, 0
        for i, batch in enumerate(super().__iter__()):
            if i >= skip:
                yield batch


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` whose position in the epoch survives a checkpoint.

    Build it with ``batch_sampler=SkippingBatchSampler(...)`` (and the shuffle ``generator``
    the sampler draws from, if any). ``position`` returns how many training batches of the
    current epoch the loop has consumed and whether the epoch is finished; without it (no
    trainer) the state is empty and nothing is skipped.
    """

    def __init__(
        self,
        *args: Any,
        position: Callable[[], tuple[int, bool] | None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.batch_sampler, SkippingBatchSampler):
            raise TypeError(
                "ResumableDataLoader needs batch_sampler=SkippingBatchSampler(...), got "
                f"{type(self.batch_sampler).__name__}."
            )
        self.position = position
        self._epoch_start: torch.Tensor | None = None  # generator state at the epoch's start
        self._pending: dict[str, Any] | None = None

    def _position(self) -> tuple[int, bool] | None:
        return self.position() if self.position is not None else None

    def _generator_state(self) -> torch.Tensor | None:
        return None if self.generator is None else self.generator.get_state()

    def _resume(self, state: dict[str, Any]) -> None:
        """Restores the shuffle state and arms the skip of the saved position."""
        if state["done"]:
            # The saved epoch is over: the next one starts from the generator as it was at the
            # save (its last shuffles, including the one-batch look-ahead, already drawn).
            if self.generator is not None and state.get("current") is not None:
                self.generator.set_state(state["current"])
            self._epoch_start = self._generator_state()
            return
        if self.generator is not None and state.get("epoch_start") is not None:
            self.generator.set_state(state["epoch_start"])
        self._epoch_start = self._generator_state()
        length = len(self)
        cycles, within = divmod(int(state["consumed"]), length) if length else (0, 0)
        for _ in range(cycles):  # whole iterations of a cycled side: same draws, no data
            self.batch_sampler.skip = length + 1
            for _ in super().__iter__():
                pass
        self.batch_sampler.skip = within

    def __iter__(self) -> Iterator[Any]:
        # A generator: the body runs at the first ``next()``, after Lightning's ``set_epoch``.
        state, self._pending = self._pending, None
        if state is not None:
            self._resume(state)
        else:
            pos = self._position()
            if pos is None or pos[0] == 0:  # a new epoch (or no trainer to tell)
                self._epoch_start = self._generator_state()
        yield from super().__iter__()

    def state_dict(self) -> dict[str, Any]:
        pos = self._position()
        if pos is None:
            return {}
        consumed, done = pos
        return {
            "epoch_start": self._epoch_start,
            "current": self._generator_state(),
            "consumed": consumed,
            "done": done,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = dict(state_dict) if state_dict else None
