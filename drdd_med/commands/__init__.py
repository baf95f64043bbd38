"""Subcommands of ``drdd-med``; each module exposes ``register(subparsers)``."""

from drdd_med.commands import (
    benchmark,
    convert,
    demo_data,
    evaluate,
    export,
    prepare_pairs,
    simulate_cbct,
    simulate_ldct,
)

COMMANDS = [demo_data, evaluate, simulate_ldct, simulate_cbct, convert, benchmark, prepare_pairs, export]
