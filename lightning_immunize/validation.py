"""Input checks shared by every layer: one finiteness check, one message format."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from torch import Tensor

__all__ = ["check_finite", "unknown_choice", "unwritable_folder"]


def unwritable_folder(path: str | Path) -> Path | None:
    """The folder that stops ``path`` from being created: its nearest existing ancestor when
    that is not a writable folder (e.g. a file, or read-only); ``None`` when it can be.

    Example:
        >>> import tempfile
        >>> blocker = tempfile.NamedTemporaryFile()  # a file where a folder would be needed
        >>> unwritable_folder(f"{blocker.name}/sub/x.txt") == Path(blocker.name)
        True
        >>> unwritable_folder(Path(tempfile.gettempdir()) / "new" / "x.txt") is None
        True
    """
    folder = next((p for p in Path(path).absolute().parents if p.exists()), Path("/"))
    return None if folder.is_dir() and os.access(folder, os.W_OK) else folder


def check_finite(t: Tensor, name: str, where: str = "") -> None:
    """Raise ``ValueError`` when the floating tensor ``t`` holds NaN or inf.

    The message names ``name``, the count of bad entries out of all, the first bad value and
    ``where`` (e.g. ``" in the harmful dataset's batch at training step 3"``).

    Example:
        >>> import torch
        >>> check_finite(torch.tensor([1.0, float("nan")]), "Z")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: non-finite Z (NaN or inf in 1 of 2 entries, first nan), shape (2,); ...
    """
    if not t.is_floating_point() and not t.is_complex():
        return
    finite = t.isfinite()
    if bool(finite.all()):
        return
    bad = ~finite
    first = t[bad].flatten()[0].item()
    raise ValueError(
        f"non-finite {name} (NaN or inf in {int(bad.sum())} of {t.numel()} entries, first "
        f"{first}){where}, shape {tuple(t.shape)}; expected finite values."
    )


def unknown_choice(
    what: str, value: object, choices: Iterable[object], where: str | None = None
) -> ValueError:
    """The error for a ``value`` of ``what`` that is none of ``choices`` (read from ``where``,
    e.g. a file), in the one wording the package uses; ``value`` may be a list of bad values.
    Raise what it returns.

    Example:
        >>> raise unknown_choice("method", "ourz", ["ours", "opt"])
        Traceback (most recent call last):
        ...
        ValueError: unknown method 'ourz'; expected one of 'ours', 'opt'.
        >>> print(unknown_choice("attacker family", ["x", "y"], ["probe"], where="attack.yaml"))
        unknown attacker family 'x', 'y' in attack.yaml; expected one of 'probe'.
    """
    bad = ", ".join(map(repr, value)) if isinstance(value, list | tuple) else repr(value)
    found = f" in {where}" if where else ""
    expected = ", ".join(map(repr, choices))
    return ValueError(f"unknown {what} {bad}{found}; expected one of {expected}.")
