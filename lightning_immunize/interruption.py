"""Ctrl-C (SIGINT) and SIGTERM as a request to stop, never as a lost or half-written run.

Python turns SIGINT into a ``KeyboardInterrupt`` wherever the interpreter happens to be: in a
training step, between an optimizer's step and the loop's bookkeeping, a checkpoint written
there resumes one step off. Here a signal is only *recorded* while a training loop runs
(:meth:`StopRequests.begin_deferring`); the loop's checkpoint callback stops it at the next batch
boundary, after saving. Outside a training loop, and on a second signal, :class:`Interrupted`
is raised at once. SIGTERM, which by default ends a process without any cleanup, is handled
the same way. The command line exits with ``128 + signal`` (130 for SIGINT, 143 for SIGTERM).
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

__all__ = ["Interrupted", "StopRequests", "stop_requests"]

#: The signals that ask a command to stop.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """A command stopped by SIGINT or SIGTERM (a ``BaseException``, like ``KeyboardInterrupt``,
    so ``except Exception`` does not swallow it).

    Args:
        signum: the signal received.
        detail: what was saved and how to go on, when the raiser knows.

    Example:
        >>> Interrupted(signal.SIGINT).exit_status
        130
        >>> str(Interrupted(signal.SIGTERM, "saved x.ckpt"))
        'interrupted by SIGTERM: saved x.ckpt'
    """

    def __init__(self, signum: int, detail: str = "") -> None:
        self.signum = int(signum)
        self.detail = detail
        name = signal.Signals(self.signum).name
        super().__init__(f"interrupted by {name}" + (f": {detail}" if detail else ""))

    @property
    def exit_status(self) -> int:
        """The shell's convention: ``128 + signal number``."""
        return 128 + self.signum


class StopRequests:
    """The process's record of stop signals (one instance, :data:`stop_requests`: signal
    handlers are process-wide).

    Attributes:
        signum: the first signal received while deferring (``None``: none).
        detail: what the stopped work saved and how to go on (empty: nothing said).
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._deferring = 0
        self._previous: dict[int, object] = {}
        self._displaced: dict[int, object] = {}
        self.detail = ""

    @property
    def requested(self) -> bool:
        """Whether a stop was asked for while deferring."""
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._deferring and self.signum is None:
            self.signum = signum
            print(
                f"lightning-immunize: {signal.Signals(signum).name} received: stopping after "
                "this training batch, once last.ckpt is saved (send it again to stop at once, "
                "without saving)",
                file=sys.stderr,
                flush=True,
            )
            return
        raise Interrupted(signum)

    def install(self) -> bool:
        """Handle :data:`STOP_SIGNALS` here (main thread only; elsewhere Python allows no
        handler). Returns whether it installed them (``False``: already, or not possible)."""
        if self._previous or threading.current_thread() is not threading.main_thread():
            return False
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return True

    def uninstall(self) -> None:
        """Put back the handlers :meth:`install` replaced."""
        _put_back(self._previous)
        self._previous = {}

    @contextmanager
    def installed(self) -> Iterator[StopRequests]:
        """For the block: stop signals raise :class:`Interrupted` (or are deferred)."""
        mine = self.install()
        try:
            yield self
        finally:
            if mine:
                self.uninstall()
            self.signum, self.detail = None, ""

    def begin_deferring(self) -> None:
        """From now on (a training loop) the first stop signal is only recorded in
        :attr:`signum`, for the loop to act on. Pair with :meth:`end_deferring`.

        Until then the stop signals are handled here alone: a handler installed since
        :meth:`install` (Lightning's own SIGTERM handler, which stops the loop between two
        batches or in the middle of a validation, before the checkpoint that would keep it)
        is set aside and put back by :meth:`end_deferring`."""
        if not self._deferring:
            self.signum = None  # a stop asked of an earlier training loop is not this one's
            if threading.current_thread() is threading.main_thread():
                for signum in STOP_SIGNALS:
                    if signal.getsignal(signum) != self._handle:
                        self._displaced[signum] = signal.signal(signum, self._handle)
        self._deferring += 1

    def end_deferring(self) -> None:
        """Ends :meth:`begin_deferring` (a no-op when not deferring)."""
        if self._deferring:
            self._deferring -= 1
            if not self._deferring:
                _put_back(self._displaced)
                self._displaced = {}


def _put_back(handlers: dict[int, object]) -> None:
    """Reinstall ``handlers`` (signal number → the handler a ``signal.signal`` call returned)."""
    for signum, handler in handlers.items():
        signal.signal(signum, handler)  # type: ignore[arg-type]


#: The process-wide instance.
stop_requests = StopRequests()
