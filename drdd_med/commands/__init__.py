"""Subcommands of ``drdd-med``; each module exposes ``register(subparsers)``."""

from drdd_med.commands import convert, demo_data, evaluate, prepare_pairs, simulate_ldct

COMMANDS = [demo_data, evaluate, simulate_ldct, convert, prepare_pairs]
