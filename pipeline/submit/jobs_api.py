"""Talking to a cluster's Jobs API: the authenticated client, submitting, waiting, following logs, listing."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import ipaddress
import logging
import os
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any, Iterable, Mapping, TextIO

from pipeline.errors import ExitCode, UnreachableError
from pipeline.submit.package import SubmitError

log = logging.getLogger(__name__)

class ClusterUnreachable(UnreachableError):
    """The Jobs API did not answer, or refused our token."""


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


def iter_jobs(job_client, limit: int | None = None) -> Iterable[dict[str, Any]]:
    jobs = sorted(job_client.list_jobs(), key=lambda j: getattr(j, "start_time", 0) or 0, reverse=True)
    return [describe(j) for j in (jobs[:limit] if limit else jobs)]
