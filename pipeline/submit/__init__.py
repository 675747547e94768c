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

from pipeline.submit.entry import (
    check_submission_id,
    code_version,
    entrypoint,
    job_metadata,
    job_modules,
    plan,
    run_date,
    submission_id,
    validate_locally,
)
from pipeline.submit.jobs_api import (
    ClusterUnreachable,
    Submitted,
    client,
    describe,
    exit_code,
    find_token,
    follow,
    iter_jobs,
    normalise_address,
    submit,
    wait,
)
from pipeline.submit.package import (
    AWS_ALLOWED,
    BASE_EXCLUDES,
    NOT_PINNED,
    REPO_ROOT,
    RUNTIME_ENV_FILE,
    SubmitError,
    build_runtime_env,
    check_args,
    check_env_vars,
    check_runtime_env,
    is_secret_name,
    load_runtime_env_file,
    pinned_requirements,
    read_requirements,
    secret_values,
    write_requirements,
)

__all__ = [
    "AWS_ALLOWED", "BASE_EXCLUDES", "NOT_PINNED", "REPO_ROOT", "RUNTIME_ENV_FILE", "ClusterUnreachable", "SubmitError",
    "Submitted", "build_runtime_env", "check_args", "check_env_vars", "check_runtime_env", "check_submission_id",
    "client", "code_version", "describe", "entrypoint", "exit_code", "find_token", "follow", "is_secret_name",
    "iter_jobs", "job_metadata", "job_modules", "load_runtime_env_file", "normalise_address", "pinned_requirements",
    "plan", "read_requirements", "run_date", "secret_values", "submission_id", "submit", "validate_locally", "wait",
    "write_requirements",
]
