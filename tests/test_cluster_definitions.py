"""The cluster definitions under cluster/ parse, have what they need, agree with the project, and are safe.

Schema and consistency checks only (no cloud, no Kubernetes): the launcher YAML goes through Ray's
own validator; the KubeRay and Kubernetes manifests are checked field by field; every entrypoint must
name a real jobs/ module and its arguments must parse with this checkout's CLI; the dashboard / Jobs
API never sits on a public address; token authentication is on; no credentials anywhere.
"""

from __future__ import annotations

import re
import shlex
import sys
import tomllib
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from pipeline import submit as S

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
PROJECT_IMAGE = f"ghcr.io/laion-aesthetics/laion-aesthetics-ray:{PROJECT['version']}"


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _one(kind: str) -> dict[str, Any]:
    found = [d for p in sorted(KUBERAY.glob("*.yaml")) for d in _docs(p) if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _walk(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield f"{path}.{key}", value
            yield from _walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield f"{path}[{i}]", value
            yield from _walk(value, f"{path}[{i}]")


def _containers(pod_spec: dict[str, Any]) -> list[dict[str, Any]]:
    return pod_spec.get("containers", []) + pod_spec.get("initContainers", [])


def _ray_pod_specs(cluster_spec: dict[str, Any]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    groups = [("head", cluster_spec["headGroupSpec"])] + [(g["groupName"], g) for g in cluster_spec["workerGroupSpecs"]]
    return [(name, group, group["template"]["spec"]) for name, group in groups]


def _check_job_command(command: list[str]) -> None:
    """`python -m jobs.X ARGS`: X is a module under jobs/, ARGS parse with this checkout's CLI."""
    assert command[:2] == ["python", "-m"], command
    module = command[2]
    assert module.startswith("jobs."), command
    assert (REPO / "jobs" / f"{module.split('.', 1)[1]}.py").exists(), f"{module} is not a module under jobs/"
    S.validate_locally(module.split(".", 1)[1], command[3:])


# Every file -------------------------------------------------------------------------------------


YAML_FILES = sorted(CLUSTER.rglob("*.yaml"))
SECRET_PATTERNS = [
    re.compile(r"\b(AKIA|ASIA)[A-Z0-9]{16}\b"),
    re.compile(r"aws_secret_access_key\s*[:=]", re.I),
    re.compile(r"AWS_SECRET_ACCESS_KEY\s*[:=]\s*\S"),
    re.compile(r"RAY_AUTH_TOKEN\s*[:=]\s*['\"]?[A-Za-z0-9]"),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
]


def test_the_expected_definitions_exist():
    names = {p.relative_to(CLUSTER).as_posix() for p in CLUSTER.rglob("*") if p.is_file()}
    assert {"cluster.yaml", "runtime_env.yaml", "requirements.txt", "Dockerfile", "README.md",
            "kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "kuberay/nightly-cronjob.yaml",
            "kuberay/networkpolicy.yaml", "kuberay/base.yaml"} <= names


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.relative_to(CLUSTER).as_posix())
def test_every_yaml_file_parses(path):
    assert _docs(path), f"{path} is empty"


@pytest.mark.parametrize("path", sorted(p for p in CLUSTER.rglob("*") if p.is_file()),
                         ids=lambda p: p.relative_to(CLUSTER).as_posix())
def test_no_credentials_in_any_definition(path):
    text = path.read_text()
    for pattern in SECRET_PATTERNS:
        assert not pattern.search(text), f"{path}: {pattern.pattern}"


def test_every_entrypoint_mentioned_names_a_real_jobs_module():
    mentioned = set()
    for path in CLUSTER.rglob("*"):
        if path.is_file():
            mentioned |= set(re.findall(r"python -m (jobs\.\w+)", path.read_text()))
    assert mentioned, "no entrypoints mentioned at all"
    for module in mentioned:
        assert (REPO / "jobs" / f"{module.split('.')[1]}.py").exists(), module


def test_nothing_is_exposed_outside_the_cluster():
    for path in YAML_FILES:
        for doc in _docs(path):
            assert doc.get("kind") not in ("Ingress", "Route", "Gateway", "HTTPRoute"), f"{path}: {doc['kind']}"
            for where, value in _walk(doc):
                key = where.rsplit(".", 1)[-1]
                if key in ("serviceType", "type") and isinstance(value, str):
                    assert value not in ("LoadBalancer", "NodePort"), f"{path}{where}"
                assert key not in ("hostNetwork", "hostPort", "externalIPs"), f"{path}{where}"


# runtime_env and pins -----------------------------------------------------------------------------


def test_the_runtime_env_is_valid_ships_code_not_baggage_and_pins_dependencies():
    from ray.runtime_env import RuntimeEnv

    raw = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    assert raw["working_dir"] == "."
    env = S.load_runtime_env_file(CLUSTER / "runtime_env.yaml", REPO)
    RuntimeEnv(**env)  # Ray's own validation of every field
    for excluded in (".git", ".venv", "demo-output", "bench-output", "*.tar", "tests"):
        assert excluded in env["excludes"]
    assert not any(S.is_secret_name(name) for name in env.get("env_vars", {}))
    assert env["pip"]["packages"] == S.read_requirements(REPO / raw["pip"])


def test_the_requirements_pin_every_runtime_dependency_within_pyproject_ranges():
    from packaging.requirements import Requirement

    pins = {Requirement(line).name.lower(): Requirement(line)
            for line in S.read_requirements(CLUSTER / "requirements.txt")}
    assert "ray" not in pins, "Ray comes from the cluster image, never from a runtime_env"
    for text in PROJECT["dependencies"]:
        wanted = Requirement(text)
        if wanted.name.lower() == "ray":
            continue
        pin = pins.get(wanted.name.lower())
        assert pin is not None, (f"{wanted.name} is not pinned: run "
                                 "`aesthetics submit --write-requirements cluster/requirements.txt`")
        (spec,) = pin.specifier
        assert spec.operator == "==", pin
        assert wanted.specifier.contains(spec.version, prereleases=True), f"{pin} is outside pyproject's {wanted}"


# Image and Ray version --------------------------------------------------------------------------


def test_the_image_is_built_on_the_ray_version_the_manifests_declare():
    import ray

    base = re.search(r"^FROM (\S+)", (CLUSTER / "Dockerfile").read_text(), re.M).group(1)
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    assert base == f"rayproject/ray:{ray.__version__}-{py}-gpu", base
    assert _one("RayCluster")["spec"]["rayVersion"] == ray.__version__
    assert _one("RayJob")["spec"]["rayClusterSpec"]["rayVersion"] == ray.__version__
    docker = (CLUSTER / "Dockerfile").read_text()
    assert "cluster/requirements.txt" in docker and "--no-deps" in docker


def test_every_definition_runs_the_project_image():
    images = set()
    for path in YAML_FILES:
        for doc in _docs(path):
            images |= {value for where, value in _walk(doc) if where.endswith(".image") and isinstance(value, str)}
    images.add(yaml.safe_load((CLUSTER / "cluster.yaml").read_text())["docker"]["image"])
    assert images == {PROJECT_IMAGE}


# Cluster launcher ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def launcher() -> dict[str, Any]:
    return yaml.safe_load((CLUSTER / "cluster.yaml").read_text())


def test_the_launcher_config_passes_rays_own_validation(launcher):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(launcher))


def test_the_launcher_has_a_cpu_head_and_separately_autoscaling_gpu_and_cpu_workers(launcher):
    types = launcher["available_node_types"]
    head = types[launcher["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"].get("CPU") == 0
    workers = {name: t for name, t in types.items() if name != launcher["head_node_type"]}
    gpu = [t for t in workers.values() if t["resources"].get("GPU", 0) > 0]
    cpu = [t for t in workers.values() if t["resources"].get("GPU", 0) == 0 and t["resources"].get("CPU", 0) > 0]
    assert gpu and cpu
    for t in gpu + cpu:
        assert t.get("min_workers", 0) < t["max_workers"], "a worker type that cannot scale"
    assert launcher["max_workers"] >= sum(t["max_workers"] for t in workers.values())


def test_the_launcher_keeps_the_dashboard_on_loopback_and_turns_token_auth_on(launcher):
    head = " ".join(launcher["head_start_ray_commands"])
    workers = " ".join(launcher["worker_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    assert "0.0.0.0" not in head + workers
    assert "RAY_AUTH_MODE=token" in head and "RAY_AUTH_MODE=token" in workers
    assert "~/.ray/auth_token" in launcher["file_mounts"]
    assert launcher["provider"]["use_internal_ips"] is True
    for t in launcher["available_node_types"].values():
        for interface in t["node_config"].get("NetworkInterfaces", [{}]):
            assert interface.get("AssociatePublicIpAddress") is False
        assert "IamInstanceProfile" in t["node_config"], "object-store access comes from the node's role"


# KubeRay --------------------------------------------------------------------------------------------


def test_the_raycluster_autoscales_gpu_and_cpu_groups_separately_with_token_auth():
    cluster = _one("RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1"
    spec = cluster["spec"]
    assert spec["authOptions"]["mode"] == "token"
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP"
    assert head["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}

    def gpus(group):
        return sum(int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
                   for c in _containers(group["template"]["spec"]))

    gpu = [g for g in groups.values() if gpus(g) > 0]
    cpu = [g for g in groups.values() if gpus(g) == 0]
    assert gpu and cpu
    for group in groups.values():
        assert group["minReplicas"] < group["maxReplicas"]
    for name, _, pod in _ray_pod_specs(spec):
        for container in _containers(pod):
            for var in container.get("env", []):
                assert not (S.is_secret_name(var["name"]) and "value" in var), f"{name}: {var['name']} in clear"


def test_the_rayjob_uses_the_raycluster_spec_and_a_real_entrypoint():
    job = _one("RayJob")
    spec = job["spec"]
    assert spec["rayClusterSpec"] == _one("RayCluster")["spec"], "keep rayjob.yaml's rayClusterSpec in sync"
    _check_job_command(shlex.split(spec["entrypoint"]))
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    S.check_runtime_env(runtime_env, environ={})
    assert "pip" not in runtime_env, "the image carries the dependencies"
    assert spec["shutdownAfterJobFinishes"] is True


def test_the_nightly_schedule_submits_nightly_once_a_night_with_the_token_from_the_secret():
    cron = _one("CronJob")
    assert cron["apiVersion"] == "batch/v1"
    spec = cron["spec"]
    assert len(spec["schedule"].split()) == 5
    assert spec["concurrencyPolicy"] == "Forbid"
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    command = container["command"]
    assert command[:2] == ["aesthetics", "submit"] and "--wait" in command
    split = command.index("--")
    assert command[split + 1] == "nightly"
    _check_job_command(["python", "-m", "jobs.nightly", *command[split + 2:]])
    cluster = _one("RayCluster")
    address = command[command.index("--address") + 1]
    name, namespace = cluster["metadata"]["name"], cluster["metadata"]["namespace"]
    assert address == f"http://{name}-head-svc.{namespace}.svc.cluster.local:8265"
    (token,) = [v for v in container["env"] if v["name"] == "RAY_AUTH_TOKEN"]
    assert token["valueFrom"]["secretKeyRef"] == {"name": cluster["spec"]["authOptions"]["secretName"],
                                                  "key": "auth_token"}
    assert pod.get("automountServiceAccountToken") is False


def _flag(command: list[str], name: str) -> float:
    return float(command[command.index(name) + 1])


@pytest.mark.parametrize("kind", ["RayJob", "CronJob"])
def test_the_jobs_size_the_model_pool_and_its_decode_feed_to_the_cluster(kind):
    """One model actor per GPU pod, and the decode CPUs per actor exist on the CPU groups."""
    if kind == "RayJob":
        command = shlex.split(_one("RayJob")["spec"]["entrypoint"])
    else:
        (container,) = _one("CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
        command = container["command"]
    groups = {g["groupName"]: g for g in _one("RayCluster")["spec"]["workerGroupSpecs"]}
    gpu_group, cpu_group = groups["gpu-embed"], groups["cpu-decode"]
    assert _flag(command, "--max-actors") == gpu_group["maxReplicas"]
    cpus = {name: float(g["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"])
            for name, g in groups.items()}
    # Each GPU pod keeps one CPU for its actor; the rest of its CPUs and the CPU group's decode.
    decode_cpus = gpu_group["maxReplicas"] * (cpus["gpu-embed"] - 1) + cpu_group["maxReplicas"] * cpus["cpu-decode"]
    assert _flag(command, "--decode-cpus-per-actor") * gpu_group["maxReplicas"] <= decode_cpus


def test_the_network_policy_covers_the_ray_pods_and_admits_the_submitter():
    policy = _one("NetworkPolicy")
    selected = policy["spec"]["podSelector"]["matchLabels"]
    for group in [_one("RayCluster")["spec"]["headGroupSpec"], *_one("RayCluster")["spec"]["workerGroupSpecs"]]:
        labels = group["template"]["metadata"]["labels"]
        assert selected.items() <= labels.items()
    submitter = _one("CronJob")["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]
    admitted = [peer["podSelector"]["matchLabels"] for rule in policy["spec"]["ingress"]
                for peer in rule["from"] if "podSelector" in peer]
    assert any(labels.items() <= submitter.items() for labels in admitted)


def test_service_accounts_carry_roles_not_keys():
    accounts = {d["metadata"]["name"]: d for d in _docs(KUBERAY / "base.yaml") if d["kind"] == "ServiceAccount"}
    ray_pods = {pod.get("serviceAccountName") for _, _, pod in _ray_pod_specs(_one("RayCluster")["spec"])}
    assert ray_pods <= set(accounts)
    assert _one("CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]["serviceAccountName"] in accounts
    for account in accounts.values():
        assert account.get("automountServiceAccountToken") is False
