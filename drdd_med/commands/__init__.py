"""Subcommands of ``drdd-med``; each module exposes ``register(subparsers)``."""

from drdd_med.commands import demo_data

COMMANDS = [demo_data]
