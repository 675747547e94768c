"""What a job runs and what it is called: the ``python -m jobs.<command>`` entrypoint, the deterministic
submission id, and the local checks done before anything is sent."""

from __future__ import annotations

import datetime as dt
import getpass
import hashlib
import logging
import os
import re
import shlex
import subprocess
from pathlib import Path
from typing import Mapping, Sequence

from pipeline.submit.package import REPO_ROOT, SubmitError, check_args

log = logging.getLogger(__name__)

# Entrypoint and submission id ---------------------------------------------------------------------


def job_modules(repo: Path = REPO_ROOT) -> list[str]:
    """Commands that can run on a cluster: the modules under jobs/ (jobs/score.py -> score)."""
    return sorted(p.stem for p in (repo / "jobs").glob("*.py") if not p.stem.startswith("_"))


def entrypoint(command: str, args: Sequence[str], *, repo: Path = REPO_ROOT, python: str = "python") -> str:
    """``python -m jobs.<command> ARGS``, shell-quoted, for a command that has a jobs/ module."""
    available = job_modules(repo)
    if command not in available:
        raise SubmitError(f"no cluster entrypoint for {command!r}: jobs/ has {available}")
    return shlex.join([python, "-m", f"jobs.{command}", *args])


def _arg_value(args: Sequence[str], flag: str) -> str | None:
    for position, arg in enumerate(args):
        if arg == flag and position + 1 < len(args):
            return args[position + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def run_date(args: Sequence[str], date: str | None = None, now: dt.datetime | None = None) -> str:
    """The day a nightly run is for: --date given to submit, else the job's own --date, else today (UTC)."""
    value = date or _arg_value(args, "--date")
    if value:
        try:
            return dt.date.fromisoformat(value).strftime("%Y%m%d")
        except ValueError:
            raise SubmitError(f"date {value!r} is not YYYY-MM-DD") from None
    return (now or dt.datetime.now(dt.timezone.utc)).strftime("%Y%m%d")


def submission_id(command: str, args: Sequence[str], *, date: str | None = None,
                  now: dt.datetime | None = None) -> str:
    """A Jobs API submission id. The cluster rejects a second job with the same id.

    nightly: ``aesthetics-nightly-<YYYYMMDD>-<hash of the arguments>``, the same for every
    submission of that night's run with those arguments, so a retried CronJob, a double click or
    two schedulers cannot start it twice. Other commands: unique per submission (time + random),
    unless ``--submission-id`` names one.
    """
    digest = hashlib.sha256("\0".join([command, *args]).encode()).hexdigest()[:10]
    if command == "nightly":
        return f"aesthetics-nightly-{run_date(args, date, now)}-{digest}"
    stamp = (now or dt.datetime.now(dt.timezone.utc)).strftime("%Y%m%dT%H%M%S")
    return f"aesthetics-{command}-{stamp}-{digest[:6]}{os.urandom(3).hex()}"


_SUBMISSION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def check_submission_id(value: str) -> str:
    if not _SUBMISSION_ID.match(value):
        raise SubmitError(f"submission id {value!r}: letters, digits, '_', '.', '-' only (at most 128)")
    return value


def code_version(repo: Path = REPO_ROOT) -> str:
    """The checkout's commit (+dirty), for the job's metadata; read-only git calls."""
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def job_metadata(command: str, repo: Path = REPO_ROOT) -> dict[str, str]:
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry in some containers
        user = "unknown"
    return {"aesthetics_command": command, "code_version": code_version(repo), "submitted_by": user}


def validate_locally(command: str, args: Sequence[str]) -> None:
    """Parse the job's arguments here first, so a typo fails now and not after a cluster round trip.

    Only parsing and config validation: nothing is read from storage. Commands this checkout's CLI
    does not know (a jobs/ module with its own parser) are passed through unchecked.
    """
    from pipeline import cli

    parser = cli.build_parser()
    commands = next(a for a in parser._actions if a.dest == "command")  # the subparsers action
    if command not in getattr(commands, "choices", {}):
        return
    try:
        parsed = parser.parse_args([command, *args])
    except SystemExit as exc:
        raise SubmitError(f"the job's arguments do not parse for `aesthetics {command}` (see above)") from exc
    if command in ("score", "nightly"):  # both take the score arguments
        cli.config_from_args(parsed)


def plan(command: str, args: Sequence[str], *, repo: Path = REPO_ROOT, python: str = "python",
         submission: str | None = None, date: str | None = None, environ: Mapping[str, str] | None = None
         ) -> tuple[str, str]:
    """(entrypoint, submission id) for a command, after every local check."""
    check_args(args, environ)
    command_line = entrypoint(command, args, repo=repo, python=python)
    return command_line, check_submission_id(submission) if submission else submission_id(command, args, date=date)
