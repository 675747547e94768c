"""Shared fixtures: a sample dataset built by img2dataset, and a local S3 (moto_server) on 127.0.0.1.

Tests that use these fixtures are marked ``integration`` automatically, so
``pytest -m "not integration"`` runs only the tests that need no img2dataset, server or Ray. Tests marked
``gpu`` are skipped, with the reason, where torch sees no CUDA device.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest

# albumentations (imported by img2dataset) asks PyPI for its latest version on import unless told
# not to: a 2 s stall per process on an offline machine, and a network call from a test.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

# Fixtures that start servers or run img2dataset: any test using one is an integration test.
INTEGRATION_FIXTURES = frozenset(
    {"sample_dataset", "sample_shards_s3", "s3_server", "s3_bucket", "upload_dir", "ray_local"}
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if INTEGRATION_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if gpu_items:  # torch is imported only when a collected test needs a GPU
        import torch

        if not torch.cuda.is_available():
            skip = pytest.mark.skip(reason=f"needs a CUDA GPU: torch {torch.__version__} sees none "
                                           f"(torch.cuda.is_available() is False)")
            for item in gpu_items:
                item.add_marker(skip)


# Sample dataset ------------------------------------------------------------------------------

SAMPLE_IMAGES = 24  # every variant of several subjects, grayscale and PNG/WebP sources included
SAMPLE_BROKEN_URLS = 3  # 404s; plus one text body, so 28 URLs
SAMPLE_IMAGES_PER_SHARD = 10  # -> 3 shards of 10, 10 and 8 URLs


@pytest.fixture(scope="session")
def sample_dataset(tmp_path_factory: pytest.TempPathFactory):
    """24 photos + 3 404s + 1 text body, through img2dataset into 3 local shards."""
    from pipeline.sample_data import build_sample_dataset

    return build_sample_dataset(
        tmp_path_factory.mktemp("sample_dataset"),
        n_images=SAMPLE_IMAGES,
        images_per_shard=SAMPLE_IMAGES_PER_SHARD,
        broken_urls=SAMPLE_BROKEN_URLS,
    )


# CLIP weights --------------------------------------------------------------------------------

TEST_ARCH = "tiny-arch-for-tests"  # the tiny architecture under another name, so it can take a weights file


@pytest.fixture(scope="session")
def weights_file(tmp_path_factory: pytest.TempPathFactory):
    """(path, state dict): a safetensors file of seeded weights for the tiny architecture registered as
    TEST_ARCH, which (unlike tiny-random) loads its weights from a file as a real model does."""
    import json

    import open_clip
    import torch
    from safetensors.torch import save_file

    from pipeline.models.clip import TINY_MODEL_CONFIG

    directory = tmp_path_factory.mktemp("arch")
    config_path = directory / f"{TEST_ARCH}.json"
    config_path.write_text(json.dumps(json.loads(TINY_MODEL_CONFIG.read_text())))
    if TEST_ARCH not in open_clip.list_models():
        open_clip.add_model_config(config_path)
    torch.manual_seed(7)
    state_dict = {k: v.contiguous() for k, v in open_clip.create_model(TEST_ARCH).state_dict().items()}
    path = directory / "weights" / "open_clip_model.safetensors"
    path.parent.mkdir()
    save_file(state_dict, str(path))
    return path, state_dict


# Local S3 ------------------------------------------------------------------------------------

S3_ACCESS_KEY = "testing"
S3_SECRET_KEY = "testing"
S3_REGION = "us-east-1"


@dataclass(frozen=True)
class S3Server:
    """A moto_server on 127.0.0.1. While the fixture lives, AWS_* in os.environ point at it."""

    endpoint_url: str
    host: str
    port: int
    log_path: Path

    @property
    def env(self) -> dict[str, str]:
        """What boto3 and s3fs need (also what to pass to a Ray runtime_env or a subprocess)."""
        return {
            "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY,
            "AWS_DEFAULT_REGION": S3_REGION,
            "AWS_ENDPOINT_URL": self.endpoint_url,
        }

    @property
    def storage_options(self) -> dict[str, object]:
        """fsspec/s3fs options that reach the server without relying on the environment."""
        return {
            "endpoint_url": self.endpoint_url,
            "key": S3_ACCESS_KEY,
            "secret": S3_SECRET_KEY,
            "client_kwargs": {"region_name": S3_REGION},
        }

    def filesystem(self):
        """A fresh s3fs filesystem (no instance or listing cache shared with other tests)."""
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, **self.storage_options)

    def pyarrow_filesystem(self):
        """pyarrow's own S3 client: it ignores AWS_ENDPOINT_URL, so the endpoint goes in explicitly."""
        import pyarrow.fs

        return pyarrow.fs.S3FileSystem(
            access_key=S3_ACCESS_KEY, secret_key=S3_SECRET_KEY, region=S3_REGION,
            endpoint_override=f"{self.host}:{self.port}", scheme="http",
        )

    def client(self):
        import boto3

        return boto3.client(
            "s3", endpoint_url=self.endpoint_url, aws_access_key_id=S3_ACCESS_KEY,
            aws_secret_access_key=S3_SECRET_KEY, region_name=S3_REGION,
        )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _answers(url: str) -> bool:
    # No proxy: an HTTP(S)_PROXY in the environment must not swallow a 127.0.0.1 health check.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=1):
            return True
    except urllib.error.HTTPError:
        return True  # any HTTP answer means it is serving
    except OSError:
        return False


def _start_moto_server(log_path: Path, attempts: int = 3, startup_seconds: float = 60) -> tuple[subprocess.Popen, int]:
    # moto_server sits beside this interpreter: the venv's, not whichever one is first on PATH.
    moto_server = Path(sys.executable).parent / "moto_server"
    if not moto_server.exists():
        pytest.skip(f"moto_server not installed beside {sys.executable}")
    for _ in range(attempts):
        # The port is free when probed but could be taken before moto binds it: hence the retry.
        port = _free_port()
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                [str(moto_server), "-H", "127.0.0.1", "-p", str(port)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + startup_seconds
        while time.monotonic() < deadline and process.poll() is None:
            if _answers(f"http://127.0.0.1:{port}/"):
                return process, port
            time.sleep(0.1)
        _stop(process)
    raise RuntimeError(f"moto_server did not start; its log:\n{log_path.read_text()[-3000:]}")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A moto S3 server for the session, with AWS_* set in os.environ so boto3 and s3fs find it.

    s3fs (through botocore) honours AWS_ENDPOINT_URL; pyarrow.fs.S3FileSystem does not, use
    ``s3_server.pyarrow_filesystem()``. Processes started before this fixture (a Ray cluster
    started earlier) do not see the variables: pass ``s3_server.env`` to them.
    """
    log_path = tmp_path_factory.mktemp("moto") / "moto_server.log"
    process, port = _start_moto_server(log_path)
    server = S3Server(endpoint_url=f"http://127.0.0.1:{port}", host="127.0.0.1", port=port, log_path=log_path)
    with pytest.MonkeyPatch.context() as patch:
        for name, value in server.env.items():
            patch.setenv(name, value)
        # The per-service variable would beat AWS_ENDPOINT_URL; profiles could add a real endpoint.
        for name in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
            patch.delenv(name, raising=False)
        no_proxy = ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1,localhost"]))
        patch.setenv("NO_PROXY", no_proxy)
        patch.setenv("no_proxy", no_proxy)
        try:
            yield server
        finally:
            _stop(process)


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    """A new, empty bucket on the session's server; returns its name (not a URI)."""
    name = f"test-{uuid.uuid4().hex[:16]}"
    s3_server.client().create_bucket(Bucket=name)
    return name


@pytest.fixture
def upload_dir(s3_server: S3Server) -> Callable[[str | os.PathLike, str], list[str]]:
    """``upload_dir(local_dir, "s3://bucket/prefix")``: copies every file, returns the URIs written."""
    from pipeline.sample_data import upload_directory

    def upload(local_dir: str | os.PathLike, s3_uri: str) -> list[str]:
        return upload_directory(local_dir, s3_uri, s3_server.storage_options)

    return upload


@pytest.fixture(scope="session")
def sample_shards_s3(sample_dataset, s3_server: S3Server) -> str:
    """The sample dataset's shards and sidecars copied to s3://sample-shards/shards (the URI)."""
    from pipeline.sample_data import upload_directory

    s3_server.client().create_bucket(Bucket="sample-shards")
    uri = "s3://sample-shards/shards"
    upload_directory(sample_dataset.shards_dir, uri, s3_server.storage_options)
    return uri


# Local Ray ----------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One local Ray for the whole session. It starts after the S3 server so its workers inherit
    the AWS_* variables, exactly as a node would take them from its environment."""
    import ray

    from pipeline.ray_session import start_local_ray

    start_local_ray(num_cpus=2, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()
