"""Every command's exit codes, the errors a user can act on, and how a failure becomes one line.

An error a user can fix is a :class:`UserError`: its message is one line that says what is wrong and
what to do, and its class says which exit code it ends in. The CLI prints that line; anything else is
a bug, reported as one line too (``--debug`` shows the traceback).

This module imports nothing from the rest of the package, so any module may raise its errors.
"""

from __future__ import annotations

import enum
from typing import Iterator


class ExitCode(enum.IntEnum):
    """The one table of exit codes, for every subcommand (the README prints it; a test pins the two)."""

    OK = 0  # done
    FAILED = 1  # the run ended but some units failed (a rerun retries them), or a submitted job failed
    USAGE = 2  # bad command line or configuration; nothing was done
    BUSY = 3  # another run holds the output, or this job was submitted already; nothing was done
    STOPPED = 4  # a submitted job was stopped
    UNREACHABLE = 5  # the object store endpoint or the Ray cluster cannot be reached
    INPUT = 6  # the input is missing, empty or not what the command reads (shards, a scored output)
    WEIGHTS = 7  # weights not found, not the pinned sha256, or not loadable
    OUTPUT = 8  # the output cannot be written there (a file, inside the input, no permission)
    INTERNAL = 70  # an unexpected error: a bug; --debug shows the traceback
    INTERRUPTED = 130  # stopped with Ctrl-C


class UserError(Exception):
    """A failure the user can act on; ``str()`` is the one line the CLI prints."""

    exit_code = ExitCode.FAILED


class UsageError(UserError, ValueError):
    exit_code = ExitCode.USAGE


class BusyError(UserError, RuntimeError):
    exit_code = ExitCode.BUSY


class UnreachableError(UserError, ConnectionError):
    exit_code = ExitCode.UNREACHABLE


class InputError(UserError, ValueError):
    """The input names nothing we can score; the message says what was looked at."""

    exit_code = ExitCode.INPUT


class WeightsError(UserError):
    exit_code = ExitCode.WEIGHTS


class OutputError(UserError, OSError):
    exit_code = ExitCode.OUTPUT


def causes(exc: BaseException | None) -> Iterator[BaseException]:
    """``exc`` and what caused it, including the original error inside a Ray task or actor error."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__


def one_line(text: str) -> str:
    """A message as one line: its lines joined, so a multi-line explanation keeps its headline."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _endpoint_failure(exc: BaseException) -> str | None:
    """botocore's 'cannot connect' errors carry the endpoint in their message."""
    name = type(exc).__name__
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ProxyConnectionError"):
        return f"cannot reach the object store: {one_line(str(exc))}; check endpoint_url / AWS_ENDPOINT_URL " \
               f"and that the server is up"
    return None


def explain(exc: BaseException) -> tuple[ExitCode, str]:
    """The exit code and the one line to print for any failure that reached the top of a command."""
    for cause in causes(exc):
        if isinstance(cause, UserError):
            return cause.exit_code, one_line(str(cause))
        unreachable = _endpoint_failure(cause)
        if unreachable:
            return ExitCode.UNREACHABLE, unreachable
    for cause in causes(exc):
        if isinstance(cause, KeyboardInterrupt):
            return ExitCode.INTERRUPTED, "interrupted"
    return ExitCode.INTERNAL, (f"unexpected error: {type(exc).__name__}: {one_line(str(exc))[:500]} "
                               f"(a bug: rerun with --debug for the traceback and report it)")
