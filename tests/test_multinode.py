"""A real multi-node Ray cluster on this machine: jobs go in through the Jobs API, a node dies mid-job.

Three `ray start` nodes with one CPU each (a head and two workers), every one in its own session,
temp dir and environment marker, token authentication on, the dashboard on 127.0.0.1. Jobs are
submitted with `aesthetics submit` (a subprocess, as a user would) or with pipeline.submit.

Teardown kills exactly the processes that carry this cluster's environment marker (every Ray
process of a node inherits its environment, and so do job drivers, which Ray starts in sessions
of their own). It never runs `ray stop`: that kills every Ray process on the machine, including
other people's local Rays and other test sessions.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
HEADS = (REPO / ".." / "shared" / "reference" / "laion-aesthetics" / "heads").resolve()
RAY = Path(sys.executable).parent / "ray"
CANARY = "sekret-canary-123"
MARKER = "AESTHETICS_TEST_RAY_NODE"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _processes_marked(value: str) -> list[int]:
    """Pids whose environment holds MARKER=<value> exactly (so a prefix never matches another node)."""
    needle = f"{MARKER}={value}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _kill_marked(value: str, timeout_s: float = 20) -> list[str]:
    """SIGKILL every process of one node until none is left; returns what was running."""
    killed: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pids = _processes_marked(value)
        if not pids:
            break
        for pid in pids:
            killed.append(_cmdline(pid)[:100])
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    return killed


@dataclass
class Node:
    name: str
    marker: str
    temp_dir: str
    log: Path


@dataclass
class Cluster:
    gcs: str
    dashboard: str  # http://127.0.0.1:PORT, the Jobs API
    token: str
    cluster_id: str
    env: dict[str, str]  # what every node was started with
    nodes: dict[str, Node] = field(default_factory=dict)

    def client_env(self, **extra: str) -> dict[str, str]:
        """An environment for `aesthetics ...` subprocesses: our token, no RAY_ADDRESS, no AWS_*."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("AWS_", "RAY_")) and k != MARKER}
        env.update(RAY_AUTH_TOKEN=self.token, PYTHONUNBUFFERED="1", **extra)
        return env

    def client(self):
        from pipeline import submit

        return submit.client(self.dashboard, self.token)

    def alive_nodes(self) -> int:
        request = urllib.request.Request(f"{self.dashboard}/api/v0/nodes?limit=100",
                                         headers={"Authorization": f"Bearer {self.token}"})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(request, timeout=10) as response:
            nodes = json.load(response)["data"]["result"]["result"]
        return sum(1 for n in nodes if n.get("state") == "ALIVE")


def _ray_start(node: Node, args: list[str], env: dict[str, str]) -> subprocess.Popen:
    with open(node.log, "ab") as log:
        return subprocess.Popen(
            [str(RAY), "start", *args, f"--temp-dir={node.temp_dir}", "--disable-usage-stats",
             "--object-store-memory=300000000",
             # Nodes sharing one machine must not collide on the agents' fixed default ports.
             f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
             f"--metrics-export-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}"],
            env={**env, MARKER: node.marker}, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def _wait_started(process: subprocess.Popen, node: Node, timeout_s: float = 180) -> None:
    try:
        rc = process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        rc = "timeout"
    if rc != 0:
        raise RuntimeError(f"ray start for {node.name} failed ({rc}):\n{node.log.read_text()[-3000:]}")


def _start_node(node: Node, args: list[str], env: dict[str, str], attempts: int = 3) -> None:
    """`ray start`, retried: on a loaded machine a raylet can miss its fixed start-up windows.

    Ray 2.60's raylet gives its dashboard agent 15 s to report its ports and aborts otherwise; the
    agent imports every dashboard module first (tens of seconds when the 2 cores are shared with
    other work). A second attempt finds those imports in the page cache.
    """
    for attempt in range(1, attempts + 1):
        try:
            return _wait_started(_ray_start(node, args, env), node)
        except RuntimeError:
            _kill_marked(node.marker)  # whatever the failed start left behind
            if attempt == attempts:
                raise
            print(f"ray start for {node.name} failed (attempt {attempt}); retrying")


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """Head + two workers, one CPU each, token auth on, Jobs API on 127.0.0.1 only."""
    if not sys.platform.startswith("linux"):
        pytest.skip("finds each node's processes through /proc")
    if not RAY.exists():
        pytest.skip(f"no ray CLI beside {sys.executable}")
    pytest.importorskip("ray.dashboard.modules.job.sdk")
    try:
        import aiohttp_cors  # noqa: F401 - the dashboard's job module needs ray[default]
    except ImportError:
        pytest.skip("the Jobs API needs ray[default] (aiohttp_cors, grpcio...)")
    cluster_id = secrets.token_hex(4)
    root = tempfile.mkdtemp(prefix=f"aes-mn-{cluster_id}-", dir="/tmp")  # short: Unix socket paths
    token = secrets.token_hex(32)
    gcs_port, dashboard_port = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_")) and k != MARKER}
    env.update(
        # The job's `python` is this interpreter, as `python` is the image's on a real cluster.
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token,
        NO_ALBUMENTATIONS_UPDATE="1", PYTHONUNBUFFERED="1",
    )
    nodes = {name: Node(name, f"{cluster_id}-{name}", os.path.join(root, name), Path(root) / f"{name}.log")
             for name in ("head", "worker-a", "worker-b")}
    for node in nodes.values():
        os.makedirs(node.temp_dir)
    made = Cluster(f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dashboard_port}", token, cluster_id, env, nodes)
    try:
        _start_node(nodes["head"], [
            "--head", f"--port={gcs_port}", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard_port}", "--include-dashboard=true", "--num-cpus=1",
            f"--ray-client-server-port={_free_port()}",
        ], env)
        for name in ("worker-a", "worker-b"):  # one at a time: see _start_node
            _start_node(nodes[name], [f"--address={made.gcs}", "--node-ip-address=127.0.0.1", "--num-cpus=1"], env)
        deadline = time.monotonic() + 120
        while True:
            try:
                if made.alive_nodes() == 3:
                    break
            except (OSError, KeyError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the cluster never showed 3 alive nodes")
            time.sleep(1)
        yield made
    finally:
        for node in nodes.values():
            _kill_marked(node.marker)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """20 photos + 4 failures through img2dataset, 5 URLs a shard: 5 shards, 5 work units."""
    from pipeline.sample_data import build_sample_dataset

    return build_sample_dataset(tmp_path_factory.mktemp("multinode"), n_images=20, images_per_shard=5)


@pytest.fixture(scope="module")
def heads_dir() -> Path:
    if not (HEADS / "sac+logos+ava1-l14-linearMSE.pth").exists():
        pytest.skip(f"the LAION heads are not in {HEADS}")
    return HEADS


def _job_args(shards_dir: str, output: Path, heads: Path) -> list[str]:
    return ["--input", shards_dir, "--output", str(output), "--model", "tiny-random", "--precision", "fp32",
            "--weights-dir", str(heads), "--shards-per-unit", "1", "--batch-size", "8", "--decode-batch-size", "8"]


def _aesthetics(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _rows(output: Path) -> list[tuple[str, str, str]]:
    import pyarrow.dataset as pads

    from pipeline.io.delta import committed_files

    table = pads.dataset(committed_files(str(output)), format="parquet", partitioning="hive").to_table(
        columns=["unit", "key", "status"])
    return list(zip(table["unit"].to_pylist(), table["key"].to_pylist(), table["status"].to_pylist(), strict=True))


def _check_output(output: Path, dataset) -> None:
    from pipeline.io.units import read_units

    records = read_units(str(output))
    assert len(records) == len(dataset.tar_paths) == 5, sorted(records)
    rows = _rows(output)
    keys = [key for _, key, _ in rows]
    assert len(keys) == len(set(keys)), "a key was written twice"
    assert sorted(keys) == dataset.all_keys
    statuses = {key: status for _, key, status in rows}
    assert all(statuses[k] == "ok" for k in dataset.expected_keys)
    assert all(statuses[k] == "download_failed" for k in dataset.failed_keys)
    total = sum(record["rows"] for record in records.values())
    assert total == len(keys)


def _no_secret_under(output: Path, secret: str) -> None:
    for path in output.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), f"{secret!r} leaked into {path}"


def test_the_jobs_api_refuses_a_client_without_the_token(cluster, tmp_path):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with pytest.raises(urllib.error.HTTPError) as refused:
        opener.open(f"{cluster.dashboard}/api/jobs/", timeout=10)
    assert refused.value.code == 401
    # No RAY_AUTH_TOKEN, and a HOME without ~/.ray/auth_token: the CLI says what is missing.
    result = _aesthetics("jobs", "--address", cluster.dashboard, "list",
                         env={**cluster.client_env(HOME=str(tmp_path)), "RAY_AUTH_TOKEN": ""}, timeout=60)
    assert result.returncode == 5, result.stderr
    assert "token" in result.stderr


def _busy_workers(node: Node) -> list[str]:
    """What a node's Ray workers are running now (their process titles), idle ones and agents left out."""
    idle = ("ray::IDLE", "ray::DashboardAgent", "ray::RuntimeEnvAgent")
    return [cmd for pid in _processes_marked(node.marker)
            if (cmd := _cmdline(pid)).startswith("ray::") and not cmd.startswith(idle)]


@dataclass
class KilledRun:
    output: Path
    job: str
    outcome: str  # "survived" or "failed, rerun completed"
    killed_while: list[str]
    committed_before_kill: int
    submit_output: str  # what `aesthetics submit --wait` printed, both runs
    job_logs: str  # the cluster's logs of every job of this run


@pytest.fixture(scope="module")
def killed_run(cluster, shards, heads_dir, tmp_path_factory) -> KilledRun:
    """`aesthetics submit --wait -- score ...` and, while worker-b runs part of it, worker-b dies.

    worker-b's raylet, object store and workers are SIGKILLed together, as when a machine is lost.
    Either the job survives (Ray Data retries the lost tasks, the actor pool restarts a lost actor,
    lost blocks are rebuilt from lineage) and every key lands once, or the job fails cleanly and a
    rerun, which skips the committed units, completes it. Both are accepted; which one happened is
    printed (run pytest with -s) and checked against what the job's log says.

    The submitting process has a canary AWS secret in its environment: it must not reach the
    cluster, the job logs, or anything under the output.
    """
    output = tmp_path_factory.mktemp("killed") / "scores"
    job = f"multinode-{cluster.cluster_id}"
    env = cluster.client_env(AWS_SECRET_ACCESS_KEY=CANARY, AWS_ACCESS_KEY_ID="AKIACANARYCANARY0000")
    log_path = output.parent / "submit.log"
    with open(log_path, "wb") as log:
        submitter = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "submit", "--address", cluster.dashboard, "--wait", "--no-pip",
             "--submission-id", job, "--", "score", *_job_args(shards.shards_dir, output, heads_dir)],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    job_client = cluster.client()
    victim = cluster.nodes["worker-b"]
    busy: list[str] = []
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            assert submitter.poll() is None, "the job ended before worker-b got any work:\n" + \
                log_path.read_text()[-3000:]
            busy = _busy_workers(victim)
            # Data work: a read/decode or staging task, or the model actor running a batch (not
            # still loading: killing it in __init__ tests less).
            if any("MapBatches" in b and not b.endswith(".__init__") for b in busy):
                break
            time.sleep(0.05)
        else:
            pytest.fail("worker-b never ran a task of the job:\n" + log_path.read_text()[-3000:])
        log_folder = output / "_delta_log"  # one commit (file) per unit
        committed = len(list(log_folder.glob("*.json"))) if log_folder.exists() else 0
        _kill_marked(victim.marker)
        print(f"\n>>> killed worker-b (all its processes) while it ran {busy}; {committed} of 5 units "
              "were committed")
        try:
            rc = submitter.wait(timeout=400)
        except subprocess.TimeoutExpired:  # hung after the loss: stop it, and let the rerun finish
            print(">>> the job still runs 400 s after the kill; stopping it")
            job_client.stop_job(job)
            rc = submitter.wait(timeout=120)
    finally:
        if submitter.poll() is None:
            submitter.kill()
    first = log_path.read_text()
    logs = job_client.get_job_logs(job)
    status = job_client.get_job_status(job).value
    (output.parent / "job.log").write_text(logs)
    print(f">>> job {job}: {status}, `aesthetics submit --wait` exited {rc} (full job log: {output.parent}/job.log)"
          f"\n--- job log (tail) ---\n{logs[-5000:]}")
    assert rc == {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 4}[status], "the exit code must be the job's outcome"
    if status == "SUCCEEDED":
        return KilledRun(output, job, "survived", busy, committed, first, logs)

    print(">>> the job failed; rerunning it: committed units are skipped")
    rerun = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "submit", "--address", cluster.dashboard, "--wait", "--no-pip",
         "--", "score", *_job_args(shards.shards_dir, output, heads_dir)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    print(rerun.stdout[-2500:])
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-3000:]
    reruns = [j for j in job_client.list_jobs() if (j.submission_id or "").startswith("aesthetics-score-")]
    logs += "".join(job_client.get_job_logs(j.submission_id) for j in reruns)
    return KilledRun(output, job, "failed, rerun completed", busy, committed,
                     first + rerun.stdout + rerun.stderr, logs)


def test_every_key_lands_exactly_once_after_a_worker_node_dies(killed_run, shards):
    print(f"outcome: {killed_run.outcome}")
    _check_output(killed_run.output, shards)
    assert "5 units committed" in killed_run.job_logs or killed_run.outcome != "survived"
    assert not (killed_run.output / "_staging").exists() or not any((killed_run.output / "_staging").iterdir())


def test_the_job_ran_on_several_nodes(killed_run, cluster):
    job_id = cluster.client().get_job_info(killed_run.job).job_id
    with_workers = [name for name, node in cluster.nodes.items()
                    if any(Path(node.temp_dir).glob(f"session_*/logs/worker-*-{job_id}-*"))]
    assert "worker-b" in with_workers and len(with_workers) >= 2, with_workers


def test_no_secret_reaches_the_cluster_its_logs_or_the_output(killed_run, cluster):
    job_client = cluster.client()
    infos = repr([job_client.get_job_info(j.submission_id) for j in job_client.list_jobs() if j.submission_id])
    for secret in (CANARY, "AKIACANARYCANARY0000", cluster.token):
        assert secret not in killed_run.job_logs
        assert secret not in killed_run.submit_output
        assert secret not in infos  # entrypoints, runtime_envs, metadata
        _no_secret_under(killed_run.output, secret)


def test_a_nightly_run_cannot_be_submitted_twice(killed_run, cluster, shards, heads_dir):
    """Over the finished output the nightly run has nothing to do; the second submission is refused."""
    args = ["submit", "--address", cluster.dashboard, "--no-pip", "--wait", "--", "nightly",
            *_job_args(shards.shards_dir, killed_run.output, heads_dir)]
    first = _aesthetics(*args, env=cluster.client_env())
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert "0 units committed, 5 already done" in first.stdout
    again = _aesthetics(*[a for a in args if a != "--wait"], env=cluster.client_env(), timeout=60)
    assert again.returncode == 3, again.stdout + again.stderr
    assert "already submitted" in again.stderr
    nightly = [j for j in cluster.client().list_jobs() if (j.submission_id or "").startswith("aesthetics-nightly-")]
    assert len(nightly) == 1 and nightly[0].status.value == "SUCCEEDED"


def test_jobs_lists_status_and_logs(killed_run, cluster):
    env = cluster.client_env()
    listed = _aesthetics("jobs", "--address", cluster.dashboard, "list", env=env, timeout=60)
    assert listed.returncode == 0 and killed_run.job in listed.stdout, listed.stderr
    status = _aesthetics("jobs", "--address", cluster.dashboard, "status", "--wait", killed_run.job, env=env,
                         timeout=60)
    expected = 0 if killed_run.outcome == "survived" else 1
    assert status.returncode == expected, status.stderr
    logs = _aesthetics("jobs", "logs", killed_run.job, "--address", cluster.dashboard, env=env, timeout=60)
    assert logs.returncode == 0 and "Running entrypoint" in logs.stdout
