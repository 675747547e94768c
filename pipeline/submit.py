"""Run `aesthetics` commands on a Ray cluster through Ray's Jobs API (JobSubmissionClient).

What goes to the cluster, and what never does:

* the code: ``working_dir`` = this checkout, minus virtualenvs, git, outputs, tests and shards
  (``cluster/runtime_env.yaml`` lists the excludes); Ray zips it and every node unpacks it;
* the dependencies: pinned ``==`` versions of pyproject's dependencies (``cluster/requirements.txt``,
  regenerated with ``aesthetics submit --write-requirements``), except Ray itself, which must be
  the cluster image's own; ``--no-pip`` leaves them out where the image already has them;
* the entrypoint: ``python -m jobs.<command> ARGS`` (a module under jobs/, checked here);
* never credentials. Object-store keys come from the nodes' environment or roles. A runtime_env
  ``env_vars`` entry named like a secret (AWS_* other than region/endpoint, *SECRET*, *TOKEN*,
  *PASSWORD*, *KEY*...) is refused, and so is any argument or value that carries the value of a
  secret in the submitting process's environment: the entrypoint and runtime_env are stored in the
  cluster's job table and printed in job logs for anyone with dashboard access to read.

The Ray auth token (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``, ``--token-file`` or
``~/.ray/auth_token``: Ray's own order) is sent as ``Authorization: Bearer`` and nowhere else.

No argument parsing here: pipeline/commands/cluster.py is the CLI over these functions.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import getpass
import hashlib
import importlib.metadata
import ipaddress
import logging
import os
import re
import shlex
import subprocess
import sys
import time
import tomllib
import urllib.parse
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, TextIO

import yaml

from pipeline.config import ConfigError, is_credential_option
from pipeline.errors import ExitCode, UnreachableError

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
RUNTIME_ENV_FILE = Path("cluster") / "runtime_env.yaml"


# Always left out of the upload, on top of what cluster/runtime_env.yaml lists.
BASE_EXCLUDES = (".git", ".venv", "venv", "demo-output", "bench-output", "*.tar", ".pytest_cache", "__pycache__")

# Packages the cluster brings itself: installing another Ray into a runtime_env breaks the worker.
NOT_PINNED = frozenset({"ray"})

# AWS_* variables that carry no secret and may travel in a runtime_env.
AWS_ALLOWED = frozenset({"AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                         "AWS_S3_ADDRESSING_STYLE", "AWS_STS_REGIONAL_ENDPOINTS", "AWS_MAX_ATTEMPTS",
                         "AWS_RETRY_MODE"})
# A word of a variable's name that marks its value as a secret (HF_TOKEN, DB_PASSWORD, API_KEY...;
# not TOKENIZERS_PARALLELISM or DBUS_SESSION_BUS_ADDRESS).
_SECRET_WORD = re.compile(
    r"(^|_)(SECRET|TOKEN|PASSWORD|PASSWD|PASS|CREDENTIALS?|PRIVATE|KEY|APIKEY|ACCESSKEY|SAS)($|_)", re.I)
_ACCESS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[A-Z0-9]{16}\b")
_URL_WITH_PASSWORD = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@]+:[^/\s@]+@", re.I)
_MIN_SECRET_LENGTH = 8  # shorter values match too much by accident


class SubmitError(ConfigError):
    """The submission is refused before anything reaches the cluster; the message says why."""


class ClusterUnreachable(UnreachableError):
    """The Jobs API did not answer, or refused our token."""


# Secrets ----------------------------------------------------------------------------------------


def is_secret_name(name: str) -> bool:
    """An environment variable whose value must never leave the submitting machine."""
    upper = name.upper()
    if upper.startswith("AWS_"):
        return upper not in AWS_ALLOWED
    return bool(_SECRET_WORD.search(upper))


def secret_values(environ: Mapping[str, str]) -> dict[str, str]:
    """Values of an environment's secret-named variables (AWS_SECRET_ACCESS_KEY, RAY_AUTH_TOKEN...)."""
    return {name: value for name, value in environ.items()
            if _SECRET_WORD.search(name) and len(value.strip()) >= _MIN_SECRET_LENGTH}


def check_env_vars(env_vars: Mapping[str, str], environ: Mapping[str, str] | None = None) -> None:
    """Refuse runtime_env variables that are, or carry, credentials."""
    environ = os.environ if environ is None else environ
    secrets = secret_values(environ)
    for name, value in env_vars.items():
        if is_secret_name(name):
            raise SubmitError(
                f"refusing to put {name} into the job's runtime_env: credentials come from the nodes' "
                "environment or roles (instance profile, IRSA/workload identity), never from the submission")
        for secret_name, secret in secrets.items():
            if secret in str(value):
                raise SubmitError(f"refusing runtime_env variable {name}: its value contains ${secret_name}")


def check_args(args: Sequence[str], environ: Mapping[str, str] | None = None) -> None:
    """Refuse command-line arguments that carry credentials: the entrypoint is stored and logged."""
    environ = os.environ if environ is None else environ
    secrets = secret_values(environ)
    for position, arg in enumerate(args):
        for secret_name, secret in secrets.items():
            if secret in arg:
                raise SubmitError(f"refusing argument {position + 1}: it contains the value of ${secret_name}; "
                                  "credentials never go on the command line")
        if _ACCESS_KEY_ID.search(arg):
            raise SubmitError(f"refusing argument {position + 1}: it looks like an AWS access key id")
        if _URL_WITH_PASSWORD.search(arg):
            raise SubmitError(f"refusing argument {position + 1}: a URL with a password in it")
        key, sep, _ = arg.partition("=")
        previous = args[position - 1] if position else ""
        if sep and previous in ("--storage-option",) and is_credential_option(key):
            raise SubmitError(f"refusing --storage-option {key}=...: credentials come from the nodes' "
                              "environment or roles")
        if arg.startswith("--storage-option=") and is_credential_option(arg.split("=", 2)[1]):
            raise SubmitError("refusing a credential in --storage-option")


def check_runtime_env(runtime_env: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> None:
    check_env_vars(runtime_env.get("env_vars") or {}, environ)
    environ = os.environ if environ is None else environ
    text = repr({k: v for k, v in runtime_env.items() if k != "env_vars"})
    for secret_name, secret in secret_values(environ).items():
        if secret in text:
            raise SubmitError(f"refusing a runtime_env that contains the value of ${secret_name}")


# Runtime environment ------------------------------------------------------------------------------


def pinned_requirements(pyproject: Path = REPO_ROOT / "pyproject.toml") -> list[str]:
    """pyproject's runtime dependencies pinned to the versions installed here (Ray left out).

    The submitting machine's environment is the one the tests ran against, so its versions are
    the ones to reproduce. Local version labels (+cpu, +cu121) are dropped: the cluster picks its
    own build of the same version. A dependency not installed here keeps pyproject's range.
    """
    from packaging.requirements import Requirement
    from packaging.version import Version

    with open(pyproject, "rb") as handle:
        dependencies = tomllib.load(handle)["project"]["dependencies"]
    pins = []
    for text in dependencies:
        requirement = Requirement(text)
        if requirement.name.lower() in NOT_PINNED:
            continue
        extras = f"[{','.join(sorted(requirement.extras))}]" if requirement.extras else ""
        try:
            version = Version(importlib.metadata.version(requirement.name)).public
        except importlib.metadata.PackageNotFoundError:
            pins.append(str(requirement))
            continue
        pins.append(f"{requirement.name}{extras}=={version}")
    return pins


def write_requirements(path: Path, pins: Sequence[str]) -> None:
    header = ("# Generated by `aesthetics submit --write-requirements cluster/requirements.txt` from pyproject.toml\n"
              "# and the versions installed where it ran. Ray is not pinned here: the cluster image provides it.\n")
    path.write_text(header + "".join(f"{pin}\n" for pin in pins))


def read_requirements(path: Path) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def load_runtime_env_file(path: Path, repo: Path) -> dict[str, Any]:
    """cluster/runtime_env.yaml with its relative paths made absolute against the repo root."""
    with open(path) as handle:
        runtime_env = yaml.safe_load(handle) or {}
    if not isinstance(runtime_env, dict):
        raise SubmitError(f"{path} must hold a mapping, got {type(runtime_env).__name__}")
    working_dir = runtime_env.get("working_dir")
    if isinstance(working_dir, str) and "://" not in working_dir:
        runtime_env["working_dir"] = str((repo / working_dir).resolve())
    if isinstance(runtime_env.get("pip"), str):
        runtime_env["pip"] = {"packages": read_requirements(repo / runtime_env["pip"]), "pip_check": False}
    return runtime_env


def build_runtime_env(repo: Path = REPO_ROOT, *, runtime_env_file: Path | None = None, pip: bool = True,
                      requirements: Path | None = None, env_vars: Mapping[str, str] | None = None,
                      environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The runtime_env one submission ships: code, pinned dependencies, harmless variables.

    ``pip=False`` leaves dependencies to the cluster image (and is what tests on this machine use:
    their workers share the submitting interpreter). ``requirements`` overrides the pin list.
    """
    repo = repo.resolve()
    file = runtime_env_file if runtime_env_file is not None else repo / RUNTIME_ENV_FILE
    runtime_env = load_runtime_env_file(file, repo) if file.exists() else {}
    runtime_env.setdefault("working_dir", str(repo))
    excludes = list(runtime_env.get("excludes") or [])
    runtime_env["excludes"] = excludes + [e for e in BASE_EXCLUDES if e not in excludes]
    if not pip:
        runtime_env.pop("pip", None)
    elif requirements is not None:
        runtime_env["pip"] = {"packages": read_requirements(requirements), "pip_check": False}
    elif "pip" not in runtime_env:
        runtime_env["pip"] = {"packages": pinned_requirements(repo / "pyproject.toml"), "pip_check": False}
    merged = {**(runtime_env.get("env_vars") or {}), **(env_vars or {})}
    runtime_env["env_vars"] = {str(k): str(v) for k, v in merged.items()}
    check_runtime_env(runtime_env, environ)
    return runtime_env


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


# Talking to the cluster ---------------------------------------------------------------------------


def normalise_address(address: str) -> str:
    if not address:
        raise SubmitError("no cluster address: give --address http://HEAD:8265 (or set RAY_API_SERVER_ADDRESS)")
    if "://" not in address:
        address = "http://" + address
    scheme = urllib.parse.urlsplit(address).scheme
    if scheme not in ("http", "https"):
        raise SubmitError(f"--address must be the Jobs API (http[s]://HEAD:8265), got {address!r}")
    return address.rstrip("/")


def find_token(token_file: str | os.PathLike | None = None, environ: Mapping[str, str] | None = None) -> str | None:
    """The Ray auth token, where Ray itself looks: --token-file, RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray."""
    environ = os.environ if environ is None else environ
    if token_file:
        return Path(token_file).expanduser().read_text().strip() or None
    if environ.get("RAY_AUTH_TOKEN", "").strip():
        return environ["RAY_AUTH_TOKEN"].strip()
    if environ.get("RAY_AUTH_TOKEN_PATH"):
        return Path(environ["RAY_AUTH_TOKEN_PATH"]).expanduser().read_text().strip() or None
    default = Path.home() / ".ray" / "auth_token"
    if default.is_file():
        return default.read_text().strip() or None
    return None


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def client(address: str, token: str | None = None):
    """A JobSubmissionClient that sends our token (and only ours) as a bearer header."""
    from ray.job_submission import JobSubmissionClient

    address = normalise_address(address)
    parts = urllib.parse.urlsplit(address)
    headers = {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
        if parts.scheme == "http" and not _is_loopback(parts.hostname):
            log.warning("sending the Ray auth token unencrypted to %s; prefer https, or a port-forward / SSH "
                        "tunnel to 127.0.0.1", parts.hostname)
    try:
        return JobSubmissionClient(address, headers=headers)
    except Exception as exc:  # noqa: BLE001 - connection, auth and version errors all mean "not reachable"
        raise ClusterUnreachable(_explain_connection_error(address, exc, token)) from exc


def _explain_connection_error(address: str, exc: Exception, token: str | None) -> str:
    text = str(exc)
    if "401" in text or "Unauthorized" in text or "Authentication required" in text:
        hint = ("the cluster requires a token: set RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH or pass --token-file"
                if not token else "the cluster refused our token")
        return f"{address}: {hint}"
    if "403" in text or "Forbidden" in text:
        return f"{address}: the cluster refused our token (403)"
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return f"cannot reach the Jobs API at {address}: {first}"


@dataclasses.dataclass(frozen=True)
class Submitted:
    submission_id: str
    duplicate: bool  # the cluster already had a job with this id: nothing new was started


def submit(job_client, *, entrypoint_command: str, runtime_env: Mapping[str, Any], submission: str,
           metadata: Mapping[str, str] | None = None) -> Submitted:
    """Submit once. A duplicate id is not an error here: the caller decides (refuse, or follow it)."""
    try:
        job_id = job_client.submit_job(entrypoint=entrypoint_command, runtime_env=dict(runtime_env),
                                       submission_id=submission, metadata=dict(metadata or {}))
    except RuntimeError as exc:
        if "already exists" in str(exc):
            return Submitted(submission, duplicate=True)
        raise
    return Submitted(job_id, duplicate=False)


def exit_code(status: Any) -> int:
    """The exit code for a job status: 0 succeeded, 1 failed, 4 stopped; non-terminal is not an outcome."""
    name = getattr(status, "value", str(status)).upper()
    return {"SUCCEEDED": ExitCode.OK, "FAILED": ExitCode.FAILED, "STOPPED": ExitCode.STOPPED}.get(name, ExitCode.FAILED)


def _is_terminal(status: Any) -> bool:
    return getattr(status, "value", str(status)).upper() in ("SUCCEEDED", "FAILED", "STOPPED")


def wait(job_client, job: str, *, poll_s: float = 2.0, timeout_s: float | None = None) -> Any:
    """Poll until the job is terminal; returns its JobStatus."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status = job_client.get_job_status(job)
        if _is_terminal(status):
            return status
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {job} still {status} after {timeout_s:.0f}s")
        time.sleep(poll_s)


def follow(job_client, job: str, out: TextIO | None = None, *, poll_s: float = 2.0) -> Any:
    """Stream the job's logs (tail_job_logs) until it ends; returns its terminal JobStatus.

    If the log stream drops (head restart, proxy timeout) the job goes on; we say so and poll.
    """
    out = out or sys.stdout

    async def tail() -> None:
        async for lines in job_client.tail_job_logs(job):
            out.write(lines)
            out.flush()

    try:
        asyncio.run(tail())
    except Exception as exc:  # noqa: BLE001 - a dropped stream must not lose the outcome
        print(f"\n[aesthetics] log stream for {job} ended early ({type(exc).__name__}: {exc}); "
              "waiting for the job's outcome", file=sys.stderr)
    return wait(job_client, job, poll_s=poll_s)


def describe(info: Any) -> dict[str, Any]:
    """The parts of a JobDetails worth printing (never its runtime_env: that is the cluster's business)."""
    def when(ms: int | None) -> str:
        return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ") if ms else "-"

    start, end = getattr(info, "start_time", None), getattr(info, "end_time", None)
    duration = f"{(end - start) / 1000:.0f}s" if start and end else ("running" if start else "-")
    return {
        "id": getattr(info, "submission_id", None) or getattr(info, "job_id", None) or "-",
        "status": getattr(getattr(info, "status", None), "value", str(getattr(info, "status", "-"))),
        "start": when(start),
        "duration": duration,
        "entrypoint": getattr(info, "entrypoint", "") or "",
        "message": getattr(info, "message", "") or "",
        "metadata": dict(getattr(info, "metadata", None) or {}),
    }


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


def iter_jobs(job_client, limit: int | None = None) -> Iterable[dict[str, Any]]:
    jobs = sorted(job_client.list_jobs(), key=lambda j: getattr(j, "start_time", 0) or 0, reverse=True)
    return [describe(j) for j in (jobs[:limit] if limit else jobs)]
