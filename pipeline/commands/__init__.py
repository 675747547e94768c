"""Subcommands of `aesthetics` beyond score/cutoffs: every module here with a ``register(commands)`` is
found by the CLI and adds its subcommands, so a new command is one new module."""
