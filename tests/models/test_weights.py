"""Weights resolution: in place, search dirs, URIs, http download into the cache, sha256 pins."""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading
import urllib.parse
from pathlib import Path

import fsspec
import pytest

from pipeline.config import KNOWN_HEADS, WeightsSpec
from pipeline.models import weights
from pipeline.models.weights import WeightsChecksumMismatch, WeightsNotFound, resolve_weights, sha256_of

REFERENCE_HEADS = Path(__file__).resolve().parents[2].parent / "shared" / "reference" / "laion-aesthetics" / "heads"
PAYLOAD = b"not really a checkpoint, but bytes with a known digest\n" * 100
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()
NAME = "sac+logos+ava1-l14-linearMSE.pth"
QUOTED_URL = "https://example.invalid/raw/main/sac%2Blogos%2Bava1-l14-linearMSE.pth"


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def weights_file(tmp_path: Path) -> Path:
    directory = tmp_path / "weights"
    directory.mkdir()
    path = directory / NAME
    path.write_bytes(PAYLOAD)
    return path


def test_sha256_of(weights_file: Path) -> None:
    assert sha256_of(weights_file) == PAYLOAD_SHA


def test_local_path_is_used_in_place(weights_file: Path, cache_dir: Path) -> None:
    resolved = resolve_weights(WeightsSpec(str(weights_file), PAYLOAD_SHA), cache_dir=cache_dir)
    assert resolved == weights_file
    assert not cache_dir.exists()


def test_file_uri_is_used_in_place(weights_file: Path, cache_dir: Path) -> None:
    resolved = resolve_weights(WeightsSpec(weights_file.as_uri(), PAYLOAD_SHA), cache_dir=cache_dir)
    assert resolved == weights_file


def test_unpinned_file_is_accepted_and_its_digest_known(weights_file: Path) -> None:
    resolved = resolve_weights(WeightsSpec(str(weights_file)))
    assert sha256_of(resolved) == PAYLOAD_SHA


def test_sha256_mismatch_names_both_digests(weights_file: Path) -> None:
    wrong = "0" * 64
    with pytest.raises(WeightsChecksumMismatch) as caught:
        resolve_weights(WeightsSpec(str(weights_file), wrong))
    assert wrong in str(caught.value) and PAYLOAD_SHA in str(caught.value)


def test_search_dir_is_tried_with_the_unquoted_basename(weights_file: Path, cache_dir: Path) -> None:
    spec = WeightsSpec(QUOTED_URL, PAYLOAD_SHA)  # example.invalid is never reached: the search dir has it
    assert resolve_weights(spec, [str(weights_file.parent)], cache_dir) == weights_file
    assert resolve_weights(spec, [weights_file.parent.as_uri() + "/"], cache_dir) == weights_file


def test_remote_search_dir_is_downloaded_into_the_cache_once(cache_dir: Path) -> None:
    memory = fsspec.filesystem("memory")
    memory.pipe("/weights-test/" + NAME, PAYLOAD)
    try:
        spec = WeightsSpec(QUOTED_URL, PAYLOAD_SHA)
        first = resolve_weights(spec, ["memory://weights-test/"], cache_dir)
        assert first.parent == cache_dir and PAYLOAD_SHA in first.name and first.name.endswith(NAME)
        assert first.read_bytes() == PAYLOAD
        memory.rm("/weights-test/" + NAME)
        assert resolve_weights(spec, ["memory://weights-test/"], cache_dir) == first  # from the cache
    finally:
        if memory.exists("/weights-test"):
            memory.rm("/weights-test", recursive=True)


def test_missing_weights_say_how_to_provide_them(tmp_path: Path, cache_dir: Path) -> None:
    url = "http://127.0.0.1:9/raw/main/sac%2Blogos%2Bava1-l14-linearMSE.pth"  # port 9: connection refused
    with pytest.raises(WeightsNotFound) as caught:
        resolve_weights(WeightsSpec(url, PAYLOAD_SHA), [str(tmp_path / "empty")], cache_dir)
    message = str(caught.value)
    assert "--weights-dir" in message and NAME in message and url in message and PAYLOAD_SHA in message
    assert str(tmp_path / "empty" / NAME) in message  # says where it looked
    assert not list(cache_dir.glob("*" + NAME))  # no half file left behind

    with pytest.raises(WeightsNotFound, match="local path"):
        resolve_weights(WeightsSpec(str(tmp_path / "nowhere.pth")))


def test_default_cache_dir_honours_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(weights.CACHE_DIR_ENV, str(tmp_path / "elsewhere"))
    assert weights.default_cache_dir() == tmp_path / "elsewhere"


class _CountingHandler(http.server.SimpleHTTPRequestHandler):
    requests: list[str]

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.requests.append(urllib.parse.unquote(self.path))
        super().do_GET()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A bounded local http.server over a directory holding a head file; yields (base URL, served dir, requests)."""
    served = tmp_path / "served"
    served.mkdir()
    for variable in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    requests: list[str] = []
    handler = type("Handler", (_CountingHandler,), {"requests": requests})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(served)))
    server.timeout = 5
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", served, requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _head_file(served: Path) -> tuple[str, str]:
    """A real V1 head file to serve when the reference copy exists, else a small stand-in."""
    name = "sa_0_4_vit_l_14_linear.pth"
    reference = REFERENCE_HEADS / name
    data = reference.read_bytes() if reference.is_file() else PAYLOAD
    (served / name).write_bytes(data)
    return name, hashlib.sha256(data).hexdigest()


def test_http_download_is_cached_under_its_digest(http_server, cache_dir: Path) -> None:
    base, served, requests = http_server
    name, digest = _head_file(served)
    spec = WeightsSpec(f"{base}/{name}", digest)
    first = resolve_weights(spec, cache_dir=cache_dir)
    assert first == cache_dir / f"{digest}-{name}"
    assert first.read_bytes() == (served / name).read_bytes()
    assert requests == [f"/{name}"]
    assert resolve_weights(spec, cache_dir=cache_dir) == first
    assert requests == [f"/{name}"]  # the second resolve did not download
    if digest == KNOWN_HEADS["sa_0_4_vit_l_14_linear"].weights.sha256:
        from pipeline.models.heads import load_head_bank

        # The known head's GitHub URL now resolves from the cache, offline.
        bank = load_head_bank([KNOWN_HEADS["sa_0_4_vit_l_14_linear"]], cache_dir=str(cache_dir))
        assert bank.input_dim == 768 and len(requests) == 1


def test_http_unpinned_download_is_cached_and_its_digest_recorded(http_server, cache_dir: Path) -> None:
    base, served, requests = http_server
    name, digest = _head_file(served)
    first = resolve_weights(WeightsSpec(f"{base}/{name}"), cache_dir=cache_dir)
    assert digest in first.name and sha256_of(first) == digest
    assert resolve_weights(WeightsSpec(f"{base}/{name}"), cache_dir=cache_dir) == first
    assert len(requests) == 1


def test_http_download_with_wrong_digest_fails_and_leaves_nothing(http_server, cache_dir: Path) -> None:
    base, served, _ = http_server
    name, digest = _head_file(served)
    with pytest.raises(WeightsChecksumMismatch) as caught:
        resolve_weights(WeightsSpec(f"{base}/{name}", "f" * 64), cache_dir=cache_dir)
    assert digest in str(caught.value) and "f" * 64 in str(caught.value)
    assert not [p for p in cache_dir.rglob("*") if p.is_file()]
