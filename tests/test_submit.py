"""`aesthetics submit` / `aesthetics jobs` and pipeline.submit, without a cluster.

The Jobs API client is replaced by a fake where a call would reach a cluster; tests/test_multinode.py
does the same things against a real three-node Ray.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import json
import logging
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest

from pipeline import cli
from pipeline import submit as S
from pipeline.config import CREDENTIAL_OPTIONS

REPO = Path(__file__).resolve().parents[1]
CANARY = "sekret-canary-123"
SCORE_ARGS = ["--input", "s3://bucket/shards", "--output", "s3://bucket/scores", "--model", "tiny-random"]


# Secrets ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                                  "HF_TOKEN", "RAY_AUTH_TOKEN", "DB_PASSWORD", "OPENAI_API_KEY",
                                  "GOOGLE_APPLICATION_CREDENTIALS", "AZURE_STORAGE_KEY", "MY_SECRET"])
def test_secret_names(name):
    assert S.is_secret_name(name)


@pytest.mark.parametrize("name", ["AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "PYTHONUNBUFFERED",
                                  "TOKENIZERS_PARALLELISM", "NO_ALBUMENTATIONS_UPDATE", "OMP_NUM_THREADS",
                                  "KEYBOARD_LAYOUT"])
def test_harmless_names(name):
    assert not S.is_secret_name(name)


def test_runtime_env_variables_that_are_credentials_are_refused():
    with pytest.raises(S.SubmitError, match="AWS_SECRET_ACCESS_KEY"):
        S.check_env_vars({"AWS_SECRET_ACCESS_KEY": "x"}, environ={})
    with pytest.raises(S.SubmitError, match="AWS_SESSION_TOKEN"):
        S.check_env_vars({"AWS_SESSION_TOKEN": "x"}, environ={})
    # A harmless name carrying a secret's value is refused too.
    with pytest.raises(S.SubmitError, match=r"\$AWS_SECRET_ACCESS_KEY"):
        S.check_env_vars({"EXTRA": f"--secret={CANARY}"}, environ={"AWS_SECRET_ACCESS_KEY": CANARY})
    S.check_env_vars({"AWS_REGION": "us-east-1", "PYTHONUNBUFFERED": "1"}, environ={"AWS_SECRET_ACCESS_KEY": CANARY})


@pytest.mark.parametrize("args, why", [
    (["--output", f"s3://b/{CANARY}"], "AWS_SECRET_ACCESS_KEY"),
    (["--storage-option", "secret=abc"], "storage-option"),
    (["--storage-option", "aws_secret_access_key=abc"], "storage-option"),
    (["--storage-option=key=abc"], "storage-option"),
    (["--input", "s3://AKIAABCDEFGHIJKLMNOP@bucket/x"], "access key id"),
    (["--input", "https://user:hunter2@example.com/shards"], "password"),
])
def test_arguments_that_carry_credentials_are_refused(args, why):
    with pytest.raises(S.SubmitError, match=why):
        S.check_args(args, environ={"AWS_SECRET_ACCESS_KEY": CANARY})


@pytest.mark.parametrize("name", sorted(CREDENTIAL_OPTIONS))
def test_the_storage_options_a_config_refuses_are_refused_on_the_command_line(name):
    """One list, pipeline.config's, for both: what a job's config refuses never reaches the cluster either."""
    for args in (["--storage-option", f"{name}=abc"], [f"--storage-option={name.upper()}=abc"]):
        with pytest.raises(S.SubmitError, match="storage-option"):
            S.check_args(args, environ={})


def test_ordinary_arguments_pass():
    S.check_args([*SCORE_ARGS, "--storage-option", "endpoint_url=http://127.0.0.1:9000"],
                 environ={"AWS_SECRET_ACCESS_KEY": CANARY, "XDG_SESSION_ID": "3", "AWS_REGION": "us-east-1"})


# Runtime environment ------------------------------------------------------------------------------


def test_the_runtime_env_ships_the_checkout_without_environments_outputs_or_shards(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", CANARY)
    env = S.build_runtime_env(REPO)
    assert env["working_dir"] == str(REPO)
    for excluded in (".git", ".venv", "demo-output", "bench-output", "*.tar", "tests", ".pytest_cache"):
        assert excluded in env["excludes"]
    assert all(not S.is_secret_name(name) for name in env["env_vars"])
    assert CANARY not in json.dumps(env)
    packages = env["pip"]["packages"]
    assert packages and all("==" in p for p in packages)
    assert not any(p.split("[")[0].split("=")[0].lower() == "ray" for p in packages)


def test_the_upload_holds_the_code_and_nothing_heavy(tmp_path):
    """Zip the working_dir exactly as Ray does on submission and look inside."""
    import zipfile

    packaging = pytest.importorskip("ray._private.runtime_env.packaging")
    env = S.build_runtime_env(REPO, pip=False)
    target = tmp_path / "package.zip"
    packaging.create_package(env["working_dir"], target, include_gitignore=True, include_parent_dir=False,
                             excludes=env["excludes"])
    names = zipfile.ZipFile(target).namelist()
    tops = {name.split("/")[0] for name in names}
    assert {"pipeline", "jobs", "pyproject.toml"} <= tops
    assert not tops & {".git", ".venv", "tests", "demo-output", "bench-output", "notebooks", ".pytest_cache"}
    assert not any(name.endswith((".tar", ".pyc", ".pth", ".safetensors")) for name in names)
    assert "jobs/score.py" in names and "jobs/nightly.py" in names
    assert target.stat().st_size < 5_000_000


def test_no_pip_leaves_dependencies_to_the_image_and_a_file_overrides_the_pins(tmp_path):
    assert "pip" not in S.build_runtime_env(REPO, pip=False)
    requirements = tmp_path / "req.txt"
    requirements.write_text("# pins\ntorch==2.5.1\n\nnumpy==2.0.0  # comment\n")
    env = S.build_runtime_env(REPO, requirements=requirements, env_vars={"OMP_NUM_THREADS": "4"})
    assert env["pip"]["packages"] == ["torch==2.5.1", "numpy==2.0.0"]
    assert env["env_vars"]["OMP_NUM_THREADS"] == "4"
    with pytest.raises(S.SubmitError):
        S.build_runtime_env(REPO, env_vars={"AWS_SECRET_ACCESS_KEY": "x"})


def test_pins_cover_every_runtime_dependency_but_ray():
    from packaging.requirements import Requirement

    pins = {Requirement(p).name.lower(): p for p in S.pinned_requirements(REPO / "pyproject.toml")}
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    wanted = {Requirement(d).name.lower() for d in dependencies} - {"ray"}
    assert set(pins) == wanted
    assert all("==" in pin for pin in pins.values())


def test_write_requirements_through_the_cli(tmp_path):
    target = tmp_path / "requirements.txt"
    assert cli.main(["submit", "--write-requirements", str(target)]) == 0
    assert S.read_requirements(target) == S.pinned_requirements(REPO / "pyproject.toml")


# Entrypoint and submission id ---------------------------------------------------------------------


def test_the_entrypoint_is_a_jobs_module_with_quoted_arguments():
    assert S.entrypoint("score", ["--input", "s3://b/my shards"]) == "python -m jobs.score --input 's3://b/my shards'"
    assert S.entrypoint("nightly", []) == "python -m jobs.nightly"
    assert {"score", "nightly", "cutoffs"} <= set(S.job_modules())
    with pytest.raises(S.SubmitError, match="no cluster entrypoint"):
        S.entrypoint("rm", ["-rf", "/"])


def test_a_nightly_submission_id_is_the_same_for_the_same_night_and_arguments():
    night = dt.datetime(2026, 3, 1, 2, 30, tzinfo=dt.timezone.utc)
    first = S.submission_id("nightly", SCORE_ARGS, now=night)
    assert first == S.submission_id("nightly", SCORE_ARGS, now=night + dt.timedelta(hours=5))
    assert first.startswith("aesthetics-nightly-20260301-")
    assert first != S.submission_id("nightly", SCORE_ARGS, now=night + dt.timedelta(days=1))
    assert first != S.submission_id("nightly", [*SCORE_ARGS, "--rescore"], now=night)
    assert S.submission_id("nightly", SCORE_ARGS, date="2026-02-28").startswith("aesthetics-nightly-20260228-")
    assert S.check_submission_id(first) == first


def test_other_submissions_get_fresh_ids():
    assert S.submission_id("score", SCORE_ARGS) != S.submission_id("score", SCORE_ARGS)
    with pytest.raises(S.SubmitError):
        S.check_submission_id("bad id; rm -rf /")
    with pytest.raises(S.SubmitError):
        S.submission_id("nightly", SCORE_ARGS, date="yesterday")


def test_the_job_arguments_are_checked_here_before_anything_is_sent(capsys):
    S.validate_locally("score", SCORE_ARGS)
    with pytest.raises(S.SubmitError, match="do not parse"):
        S.validate_locally("score", ["--inptu", "x"])
    with pytest.raises(Exception, match="--input and --output"):
        S.validate_locally("score", ["--model", "tiny-random"])


def test_dry_run_prints_what_would_be_sent_and_never_the_environment(monkeypatch, capsys):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", CANARY)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "token-value-not-to-print")
    assert cli.main(["submit", "--dry-run", "--", "nightly", *SCORE_ARGS]) == 0
    out = capsys.readouterr().out
    plan = json.loads(out)
    assert plan["entrypoint"] == "python -m jobs.nightly " + " ".join(SCORE_ARGS)
    assert plan["submission_id"].startswith("aesthetics-nightly-")
    assert CANARY not in out and "token-value-not-to-print" not in out


@pytest.mark.parametrize("argv, message", [
    (["submit", "--dry-run", "--env", "AWS_SECRET_ACCESS_KEY=x", "--", "score", *SCORE_ARGS], "refusing to put"),
    (["submit", "--dry-run", "--", "score", *SCORE_ARGS, "--storage-option", f"secret={CANARY}"], "refusing"),
    (["submit", "--dry-run", "--", "score", *SCORE_ARGS, "--head", f"s3://b/{CANARY}.pth"], "refusing"),
    (["submit", "--dry-run"], "nothing to run"),
    (["submit", "--dry-run", "--", "submit"], "runs where you are"),
    (["submit", "--dry-run", "--", "frobnicate"], "no cluster entrypoint"),
])
def test_refused_submissions_exit_2_with_a_reason(monkeypatch, capsys, argv, message):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", CANARY)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert CANARY not in err


# Talking to the cluster (faked) -------------------------------------------------------------------


class FakeStatus:
    def __init__(self, value: str):
        self.value = value


class FakeJobs:
    """Stands in for ray.job_submission.JobSubmissionClient."""

    def __init__(self, outcome: str = "SUCCEEDED", existing: tuple[str, ...] = (), tail_fails: bool = False):
        self.outcome = outcome
        self.jobs: dict[str, dict[str, Any]] = {j: {"status": outcome} for j in existing}
        self.submitted: list[dict[str, Any]] = []
        self.tail_fails = tail_fails
        self.stopped: list[str] = []

    def submit_job(self, *, entrypoint, runtime_env, submission_id, metadata):
        if submission_id in self.jobs:
            raise RuntimeError(f"Request failed with status code 400: Job with submission_id {submission_id} "
                               "already exists. Please use a different submission_id.")
        self.jobs[submission_id] = {"status": self.outcome, "entrypoint": entrypoint}
        self.submitted.append(dict(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=submission_id,
                                   metadata=metadata))
        return submission_id

    def get_job_status(self, job):
        if job not in self.jobs:
            raise RuntimeError(f"Request failed with status code 404: Job {job} does not exist.")
        return FakeStatus(self.jobs[job]["status"])

    def get_job_info(self, job):
        self.get_job_status(job)  # the Jobs API answers 404 for an unknown id

        class Info:
            submission_id = job
            job_id = "02000000"
            status = FakeStatus(self.jobs[job]["status"])
            entrypoint = self.jobs[job].get("entrypoint", "python -m jobs.score")
            start_time, end_time = 1_700_000_000_000, 1_700_000_090_000
            message = "Job finished" if status.value == "SUCCEEDED" else "Job entrypoint command failed"
            metadata = {}

        return Info()

    def list_jobs(self):
        return [self.get_job_info(j) for j in self.jobs]

    def get_job_logs(self, job):
        return f"Running entrypoint for job {job}\nrun ...: 5 units committed\n"

    async def tail_job_logs(self, job):
        if self.tail_fails:
            raise ConnectionError("websocket closed")
        for line in ("line one\n", "line two\n"):
            await asyncio.sleep(0)
            yield line

    def stop_job(self, job):
        self.stopped.append(job)
        self.jobs[job]["status"] = "STOPPED"
        return True


@pytest.fixture
def fake(monkeypatch):
    holder: dict[str, FakeJobs] = {"jobs": FakeJobs()}
    seen: dict[str, Any] = {}

    def client(address, token=None):
        seen.update(address=S.normalise_address(address), token=token)
        return holder["jobs"]

    monkeypatch.setattr(S, "client", client)
    monkeypatch.setattr(time, "sleep", lambda s: None)
    holder["seen"] = seen  # type: ignore[assignment]
    return holder


def _submit(*extra: str) -> list[str]:
    return ["submit", "--address", "127.0.0.1:8265", "--no-pip", *extra, "--", "score", *SCORE_ARGS]


def test_submit_without_wait_prints_the_id_and_exits_0(fake, capsys, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "tok-123456789")
    assert cli.main(_submit()) == 0
    out, err = capsys.readouterr()
    job = fake["jobs"].submitted[0]
    assert out.strip() == job["submission_id"]
    assert job["entrypoint"] == "python -m jobs.score " + " ".join(SCORE_ARGS)
    assert "pip" not in job["runtime_env"] and job["runtime_env"]["working_dir"] == str(REPO)
    assert job["metadata"]["aesthetics_command"] == "score"
    assert fake["seen"] == {"address": "http://127.0.0.1:8265", "token": "tok-123456789"}
    assert "tok-123456789" not in out + err


@pytest.mark.parametrize("outcome, code", [("SUCCEEDED", 0), ("FAILED", 1), ("STOPPED", 4)])
def test_submit_wait_streams_logs_and_exits_with_the_outcome(fake, capsys, outcome, code):
    fake["jobs"] = FakeJobs(outcome)
    assert cli.main(_submit("--wait")) == code
    out, err = capsys.readouterr()
    assert "line one\nline two\n" in out
    assert outcome in err


def test_a_dropped_log_stream_still_waits_for_the_outcome(fake, capsys):
    fake["jobs"] = FakeJobs("FAILED", tail_fails=True)
    assert cli.main(_submit("--wait")) == 1
    assert "log stream" in capsys.readouterr().err


def test_the_same_nightly_run_is_not_started_twice(fake, capsys):
    argv = ["submit", "--address", "127.0.0.1:8265", "--no-pip", "--", "nightly", *SCORE_ARGS]
    assert cli.main(argv) == 0
    assert cli.main(argv) == 3  # refused: the cluster already has this night's job
    assert "already submitted" in capsys.readouterr().err
    assert len(fake["jobs"].submitted) == 1
    # A retried scheduler pod waiting for the outcome follows the existing job instead.
    assert cli.main(argv[:3] + ["--wait"] + argv[3:]) == 0
    assert len(fake["jobs"].submitted) == 1


def test_an_unreachable_cluster_exits_5(monkeypatch, capsys):
    def refuse(address, token=None):
        raise S.ClusterUnreachable(f"{address}: the cluster requires a token")

    monkeypatch.setattr(S, "client", refuse)
    assert cli.main(_submit()) == 5
    assert cli.main(["jobs", "--address", "127.0.0.1:8265", "list"]) == 5
    assert "requires a token" in capsys.readouterr().err


def test_jobs_list_status_logs_stop(fake, capsys):
    fake["jobs"] = FakeJobs("FAILED", existing=("aesthetics-nightly-20260301-abc",))
    base = ["jobs", "--address", "127.0.0.1:8265"]
    assert cli.main([*base, "list"]) == 0
    assert "aesthetics-nightly-20260301-abc" in capsys.readouterr().out
    assert cli.main([*base, "status", "aesthetics-nightly-20260301-abc"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "FAILED"
    assert cli.main([*base, "status", "--wait", "aesthetics-nightly-20260301-abc"]) == 1
    assert cli.main(["jobs", "logs", "aesthetics-nightly-20260301-abc", "--address", "127.0.0.1:8265"]) == 0
    assert "5 units committed" in capsys.readouterr().out
    assert cli.main([*base, "logs", "--follow", "aesthetics-nightly-20260301-abc"]) == 1
    assert cli.main([*base, "stop", "--wait", "aesthetics-nightly-20260301-abc"]) == 4
    assert fake["jobs"].stopped == ["aesthetics-nightly-20260301-abc"]
    assert cli.main([*base, "status", "no-such-job"]) == 2


def test_the_token_is_found_where_ray_looks(tmp_path, monkeypatch):
    monkeypatch.setattr(Path, "home", lambda: tmp_path)
    assert S.find_token(environ={}) is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert S.find_token(environ={}) == "from-home"
    path = tmp_path / "token"
    path.write_text("from-path")
    assert S.find_token(environ={"RAY_AUTH_TOKEN_PATH": str(path)}) == "from-path"
    assert S.find_token(environ={"RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": str(path)}) == "from-env"
    flag = tmp_path / "flag"
    flag.write_text("from-flag")
    assert S.find_token(flag, environ={"RAY_AUTH_TOKEN": "from-env"}) == "from-flag"


def test_the_client_sends_the_token_as_a_bearer_header_and_warns_over_plain_http(monkeypatch, caplog):
    import ray.job_submission

    made: list[dict[str, Any]] = []

    class Recorder:
        def __init__(self, address, headers=None, **kwargs):
            made.append({"address": address, "headers": headers})

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", Recorder)
    with caplog.at_level(logging.WARNING, logger="pipeline.submit"):
        S.client("127.0.0.1:8265", "tok")
        assert not caplog.records
        S.client("http://head.example.com:8265", "tok")
        assert "unencrypted" in caplog.text
    S.client("https://head.example.com:8265", None)
    assert made[0] == {"address": "http://127.0.0.1:8265", "headers": {"Authorization": "Bearer tok"}}
    assert made[2]["headers"] == {}
    with pytest.raises(S.SubmitError):
        S.normalise_address("ray://head:10001")


def test_exit_codes_follow_ray_job_status():
    from ray.job_submission import JobStatus

    assert S.exit_code(JobStatus.SUCCEEDED) == 0
    assert S.exit_code(JobStatus.FAILED) == 1
    assert S.exit_code(JobStatus.STOPPED) == 4


def test_follow_writes_the_log_lines():
    out = io.StringIO()
    status = S.follow(FakeJobs("SUCCEEDED", existing=("j",)), "j", out, poll_s=0)
    assert status.value == "SUCCEEDED" and out.getvalue() == "line one\nline two\n"


def test_the_nightly_entrypoint_module_runs_the_nightly_command():
    result = subprocess.run([sys.executable, "-m", "jobs.nightly", "--help"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "aesthetics nightly" in result.stdout
