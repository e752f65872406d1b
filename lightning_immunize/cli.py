"""`lightning-immunize`: the console script. It only dispatches: each command's parser and logic
live in :mod:`lightning_immunize.commands` (one file a command).

    lightning-immunize fit --config configs/digits.yaml [--trainer.default_root_dir DIR]
    lightning-immunize export RUN                  # → RUN/immunized.safetensors
    lightning-immunize attack RUN --budget quick

Heavy imports (torch, Lightning, timm) happen only once a command needs them.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable, Sequence

from lightning_immunize.commands import attack, evaluate, export, fit, reproduce

DESCRIPTION = fit.DESCRIPTION

#: The commands that are ours (``fit``, ``validate`` and ``test`` go to LightningCLI).
SUBCOMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    command.NAME: command.main for command in (attack, export, evaluate, reproduce)
}


def _usage() -> str:
    lines = [
        f"  {'fit':<19}{fit.SUMMARY}",
        f"  {'validate, test':<19}LightningCLI's own subcommands on the same configs",
    ]
    lines += [f"  {c.NAME:<19}{c.SUMMARY}" for c in (evaluate, attack, export, reproduce)]
    return (
        "usage: lightning-immunize {fit,validate,test,evaluate,attack,export,reproduce} ...\n"
        "                          [--debug]\n\n"
        f"{DESCRIPTION}\n\n" + "\n".join(lines) + "\n\n"
        "`lightning-immunize SUBCOMMAND --help` lists a subcommand's options. --debug shows the "
        "full\ntraceback of an error instead of one line."
    )


USAGE = _usage()

#: Errors shown as one line (exit status 2) on the command line; ``--debug`` keeps tracebacks.
USER_ERRORS = (ValueError, TypeError, FileNotFoundError)


def error_line(error: BaseException) -> str:
    """The one line the command line prints for a user error: our own message (also when
    jsonargparse wrapped it in a Union error), ending in a full stop, the same way whatever
    the message's punctuation; an OS error as its reason and file."""
    text = str(error)
    if "Errors:" in text:  # jsonargparse: "Errors:\n  - <ours>\n  - Expected a <class ...>"
        lines = text.split("Errors:", 1)[1].splitlines()
        ours = [ln.strip()[2:] for ln in lines if ln.strip().startswith("- ")]
        ours = [m for m in ours if not m.startswith("Expected a <class")]
        if ours:
            text = "; ".join(m.rstrip(".") for m in ours)
    elif isinstance(error, OSError) and error.strerror and error.filename is not None:
        text = f"{error.strerror}: {error.filename}"
    text = " ".join(text.split())
    return text if text.endswith((".", "?", "!")) else f"{text}."


def main(argv: Sequence[str] | None = None) -> int:
    """The console script. In-process callers (``argv`` given) get exceptions as they are; on
    the command line a user error is one line on stderr and exit status 2."""
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    from lightning_immunize.interruption import Interrupted, stop_requests

    try:
        with stop_requests.installed():
            if argv[0] in SUBCOMMANDS:
                return SUBCOMMANDS[argv[0]](argv[1:])
            if from_command_line:
                sys.argv[1:] = argv  # LightningCLI reads sys.argv itself; --debug is ours
                return fit.main(None)
            return fit.main(argv)
    except (Interrupted, KeyboardInterrupt) as stop:
        if debug or not from_command_line:
            raise
        if not isinstance(stop, Interrupted):
            stop = Interrupted(signal.SIGINT)
        hint = ""
        if not stop.detail:
            hint = (
                " Resume with the same command plus --ckpt_path last if the run has a "
                "checkpoints/last.ckpt."
                if argv[0] == "fit"
                else " Run the same command again to resume."
            )
        print(f"lightning-immunize: {str(stop).rstrip('.')}.{hint}", file=sys.stderr)
        return stop.exit_status
    except USER_ERRORS as error:
        if debug or not from_command_line:
            raise
        print(f"lightning-immunize: error: {error_line(error)}", file=sys.stderr)
        print("(run again with --debug for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
