"""One error style: the command line prints every user error the same way, whatever its
punctuation, and every "unknown X" is worded alike."""

from __future__ import annotations

import pytest

from lightning_immunize.cli import error_line
from lightning_immunize.validation import unknown_choice


@pytest.mark.parametrize(
    "error",
    [
        ValueError("bad value 3; expected 4"),
        ValueError("bad value 3; expected 4."),
        TypeError("bad value 3; expected 4"),
    ],  # fmt: skip
)
def test_a_message_prints_the_same_whatever_its_punctuation_or_type(error):
    assert error_line(error) == "bad value 3; expected 4."


def test_an_os_error_prints_its_reason_and_file():
    error = FileNotFoundError(2, "No such file or directory", "no/such.yaml")
    assert error_line(error) == "No such file or directory: no/such.yaml."


def test_unknown_choices_are_worded_alike_across_the_package():
    from lightning_immunize.attacks.families import check_family
    from lightning_immunize.objectives import make_objective

    messages = []
    for call in (lambda: make_objective("ourz"), lambda: check_family("sgd-all")):
        with pytest.raises(ValueError) as info:
            call()
        messages.append(str(info.value))
    assert messages[0].startswith("unknown method 'ourz'; expected one of 'rmax_only', ")
    assert messages[1].startswith("unknown attacker family 'sgd-all'; expected one of 'finetune-")
    assert str(unknown_choice("x", ["a", "b"], ["c"])) == "unknown x 'a', 'b'; expected one of 'c'."
