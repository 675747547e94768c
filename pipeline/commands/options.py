"""Command-line options more than one subcommand takes."""

from __future__ import annotations

import argparse
import json
from typing import Any


def storage_option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` for an fsspec option; the value is JSON when it parses as JSON, else a string."""
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"storage option {text!r} is not KEY=VALUE")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def add_storage_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--storage-option", action="append", type=storage_option,
                        help="fsspec option KEY=VALUE, e.g. endpoint_url=http://127.0.0.1:9000 (no credentials)")
