"""Input checks shared by every layer: one finiteness check, one message format."""

from __future__ import annotations

from torch import Tensor

__all__ = ["check_finite"]


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
