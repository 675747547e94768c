"""`aesthetics submit` and `aesthetics jobs`: run and watch commands on a Ray cluster (Jobs API).

    aesthetics submit --address http://127.0.0.1:8265 -- score --input s3://b/shards --output s3://b/scores
    aesthetics submit --address ... --wait -- nightly --input ... --output ...   # exit code = the job's outcome
    aesthetics jobs --address ... list | status ID [--wait] | logs ID [--follow] | stop ID [--wait]

Exit codes (pipeline.errors.ExitCode, the table every command keeps to): 0 succeeded (or submitted, without
--wait), 1 the job failed, 2 usage or refused submission, 3 already submitted (a nightly run with the same
date and arguments), 4 stopped, 5 cluster unreachable or token refused, 130 interrupted (the job keeps running).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from pipeline import submit as S
from pipeline.errors import ExitCode

ADDRESS_HELP = ("the cluster's Jobs API, http[s]://HEAD:8265 (default $RAY_API_SERVER_ADDRESS). Keep it private: "
                "a port-forward or SSH tunnel to 127.0.0.1, or a ClusterIP service")


def _env_var(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--env {text!r} is not NAME=VALUE")
    return name, value


def _add_connection(parser: argparse.ArgumentParser, suppress: bool = False) -> None:
    default = argparse.SUPPRESS if suppress else os.environ.get("RAY_API_SERVER_ADDRESS")
    parser.add_argument("--address", default=default, help=ADDRESS_HELP)
    parser.add_argument("--token-file", default=argparse.SUPPRESS if suppress else None,
                        help="file holding the Ray auth token (default: $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, "
                             "~/.ray/auth_token)")


def register(commands: Any) -> None:
    submit = commands.add_parser(
        "submit", help="run an aesthetics command (score, nightly, cutoffs) on a Ray cluster",
        description="Submit `python -m jobs.COMMAND ARGS` through the Ray Jobs API with this checkout as the "
                    "working_dir and pinned dependencies. Put the command after `--`.",
    )
    _add_connection(submit)
    submit.add_argument("--wait", action="store_true",
                        help="stream the job's logs until it ends; the exit code is the job's outcome")
    submit.add_argument("--submission-id", help="use this id (the cluster refuses a second job with it)")
    submit.add_argument("--date", help="YYYY-MM-DD the nightly run is for (default: the job's --date, else today UTC)")
    submit.add_argument("--runtime-env", type=Path,
                        help=f"runtime_env YAML (default {S.RUNTIME_ENV_FILE} in the checkout)")
    submit.add_argument("--working-dir", type=Path, default=S.REPO_ROOT,
                        help="the checkout to ship (default: the one this command runs from)")
    submit.add_argument("--requirements", type=Path, help="pip requirements file to pin instead of the runtime_env's")
    submit.add_argument("--no-pip", action="store_true",
                        help="install nothing: the cluster image already has every dependency")
    submit.add_argument("--env", action="append", type=_env_var, default=[],
                        help="NAME=VALUE for the job's environment (never credentials: those are refused)")
    submit.add_argument("--python", default="python", help="the interpreter on the cluster (default: python)")
    submit.add_argument("--dry-run", action="store_true",
                        help="print the entrypoint, submission id and runtime_env, and submit nothing")
    submit.add_argument("--write-requirements", type=Path, metavar="PATH",
                        help="write pyproject's dependencies pinned to the installed versions to PATH, and exit")
    submit.add_argument("job", nargs=argparse.REMAINDER, help="-- COMMAND ARGS... (COMMAND is a module under jobs/)")
    submit.set_defaults(run=cmd_submit)

    jobs = commands.add_parser("jobs", help="list, inspect, follow or stop jobs on a Ray cluster")
    _add_connection(jobs)
    actions = jobs.add_subparsers(dest="jobs_command", required=True)
    listing = actions.add_parser("list", help="jobs on the cluster, newest first")
    listing.add_argument("--limit", type=int, default=20)
    listing.add_argument("--json", action="store_true")
    status = actions.add_parser("status", help="one job's status (with --wait: until it ends; exit = outcome)")
    status.add_argument("--wait", action="store_true")
    logs = actions.add_parser("logs", help="one job's logs (with --follow: stream until it ends; exit = outcome)")
    logs.add_argument("--follow", "-f", action="store_true")
    stop = actions.add_parser("stop", help="stop a job (with --wait: until it has stopped)")
    stop.add_argument("--wait", action="store_true")
    for action in (listing, status, logs, stop):
        _add_connection(action, suppress=True)  # --address may also come after the action
        if action is not listing:
            action.add_argument("submission_id")
        action.set_defaults(run=cmd_jobs)


# submit -------------------------------------------------------------------------------------------


def cmd_submit(args: argparse.Namespace) -> int:
    if args.write_requirements:
        pins = S.pinned_requirements(args.working_dir / "pyproject.toml")
        S.write_requirements(args.write_requirements, pins)
        print(f"wrote {len(pins)} pins to {args.write_requirements}")
        return ExitCode.OK
    job = list(args.job)
    if job and job[0] == "--":
        job = job[1:]
    if not job:
        raise S.SubmitError("nothing to run: put the command after `--`, e.g. `aesthetics submit --address ... "
                            "-- score --input ... --output ...`")
    command, job_args = job[0], job[1:]
    if command in ("submit", "jobs"):
        raise S.SubmitError(f"`{command}` runs where you are, not on the cluster")

    entry, submission = S.plan(command, job_args, repo=args.working_dir, python=args.python,
                               submission=args.submission_id, date=args.date)
    S.validate_locally(command, job_args)
    runtime_env = S.build_runtime_env(args.working_dir, runtime_env_file=args.runtime_env, pip=not args.no_pip,
                                      requirements=args.requirements, env_vars=dict(args.env))
    metadata = S.job_metadata(command, args.working_dir)
    if args.dry_run:
        print(json.dumps({"submission_id": submission, "entrypoint": entry, "runtime_env": runtime_env,
                          "metadata": metadata}, indent=2))
        return ExitCode.OK

    try:
        job_client = S.client(_address(args), S.find_token(args.token_file))
        result = S.submit(job_client, entrypoint_command=entry, runtime_env=runtime_env, submission=submission,
                          metadata=metadata)
    except S.ClusterUnreachable as exc:
        print(f"aesthetics: {exc}", file=sys.stderr)
        return ExitCode.UNREACHABLE
    address = _address(args)
    if result.duplicate:
        state = _status_text(job_client, submission)
        print(f"aesthetics: job {submission} was already submitted ({state}); not starting it again",
              file=sys.stderr)
        if not args.wait:
            return ExitCode.BUSY
        print(f"aesthetics: following {submission}", file=sys.stderr)
    else:
        print(f"submitted {result.submission_id} to {address}", file=sys.stderr)
    if not args.wait:
        print(f"  follow: aesthetics jobs --address {address} logs --follow {result.submission_id}\n"
              f"  stop:   aesthetics jobs --address {address} stop {result.submission_id}", file=sys.stderr)
        print(result.submission_id)
        return ExitCode.OK
    return _follow(job_client, result.submission_id, address)


def _address(args: argparse.Namespace) -> str:
    return S.normalise_address(getattr(args, "address", None) or "")


def _status_text(job_client: Any, job: str) -> str:
    try:
        return str(job_client.get_job_status(job).value)
    except Exception:  # noqa: BLE001 - only for a message
        return "status unknown"


def _follow(job_client: Any, job: str, address: str) -> int:
    try:
        status = S.follow(job_client, job)
    except KeyboardInterrupt:
        print(f"\naesthetics: stopped following; job {job} keeps running. Stop it with "
              f"`aesthetics jobs --address {address} stop {job}`", file=sys.stderr)
        return ExitCode.INTERRUPTED
    return _report_outcome(job_client, job, status)


def _report_outcome(job_client: Any, job: str, status: Any) -> int:
    info = S.describe(job_client.get_job_info(job))
    print(f"\njob {job}: {info['status']} after {info['duration']}"
          + (f": {info['message']}" if info["message"] and info["status"] != "SUCCEEDED" else ""), file=sys.stderr)
    return S.exit_code(status)


# jobs ---------------------------------------------------------------------------------------------


def cmd_jobs(args: argparse.Namespace) -> int:
    try:
        job_client = S.client(_address(args), S.find_token(getattr(args, "token_file", None)))
        return _jobs(job_client, args)
    except S.ClusterUnreachable as exc:
        print(f"aesthetics: {exc}", file=sys.stderr)
        return ExitCode.UNREACHABLE
    except RuntimeError as exc:  # the Jobs API answers 404 for an unknown id
        if "does not exist" in str(exc) or "404" in str(exc):
            print(f"aesthetics: no job {getattr(args, 'submission_id', '?')} on {_address(args)}", file=sys.stderr)
            return ExitCode.USAGE
        raise


def _jobs(job_client: Any, args: argparse.Namespace) -> int:
    action = args.jobs_command
    if action == "list":
        rows = S.iter_jobs(job_client, args.limit)
        if args.json:
            print(json.dumps(rows, indent=2))
            return ExitCode.OK
        from tabulate import tabulate

        print(tabulate([(row["id"], row["status"], row["start"], row["duration"],
                         row["entrypoint"] if len(row["entrypoint"]) <= 70 else row["entrypoint"][:67] + "...")
                        for row in rows], headers=["SUBMISSION ID", "STATUS", "STARTED", "TOOK", "ENTRYPOINT"],
                       tablefmt="plain", disable_numparse=True, colalign=("left", "left", "left", "right", "left")))
        return ExitCode.OK
    job = args.submission_id
    if action == "status":
        if args.wait:
            return _report_outcome(job_client, job, S.wait(job_client, job))
        info = S.describe(job_client.get_job_info(job))
        print(json.dumps(info, indent=2))
        return ExitCode.OK
    if action == "logs":
        if args.follow:
            return _follow(job_client, job, _address(args))
        sys.stdout.write(job_client.get_job_logs(job))
        return ExitCode.OK
    if action == "stop":
        stopped = job_client.stop_job(job)
        print(f"{job}: {'stop requested' if stopped else 'already finished'}", file=sys.stderr)
        if args.wait:
            return _report_outcome(job_client, job, S.wait(job_client, job))
        return ExitCode.OK
    raise S.SubmitError(f"unknown jobs action {action!r}")
