"""The ``drdd-med`` command line (also ``python -m drdd_med``).

Each subcommand lives in its own module under ``drdd_med.commands`` and exposes
``register(subparsers)``, which adds its parser and sets ``func`` to a callable taking the parsed
arguments and returning an exit code. Errors a user can fix are raised as ``UserError`` (or the
library's ``ValueError``/``FileNotFoundError``/``FileExistsError``) and reported on stderr with exit
code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading

from drdd_med import __version__
from drdd_med.commands import COMMANDS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="drdd-med",
        description="DRDD diffusion for medical image-to-image translation (MR to synthetic CT, "
        "low-dose to full-dose CT, CBCT to CT).",
    )
    parser.add_argument("--version", action="version", version=f"drdd-med {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.register(subparsers)
    return parser


@contextlib.contextmanager
def terminate_as_exit():
    """Let SIGTERM (``timeout``, a batch scheduler, ``kill``) unwind the command like an error does:
    partial outputs are removed and journals closed, where the default would end the process on the
    spot and leave them behind. Exit status 143 (128 + 15), as for the default. Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(message)s"
    )
    try:
        with terminate_as_exit():
            return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"drdd-med {args.command}: error: {err}", file=sys.stderr)
        return 2
