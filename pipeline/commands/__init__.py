"""Subcommands of `aesthetics` beyond score/cutoffs; each module has register(commands)."""
