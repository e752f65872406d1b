"""`lightning-immunize`: the command line (a stub until the CLI issue lands)."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lightning-immunize",
        description="Model immunization from a condition-number perspective.",
    )
    parser.add_argument("command", nargs="?", help="subcommand (fit, evaluate, export, ...)")
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
