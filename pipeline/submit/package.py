"""What goes to the cluster with a job: the code (working_dir), pinned requirements, the runtime_env, and
the checks that keep every secret out of it."""

from __future__ import annotations

import importlib.metadata
import logging
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from pipeline.config import ConfigError, is_credential_option

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
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
