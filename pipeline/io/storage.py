"""One way to reach any fsspec filesystem, with the job's storage options applied.

Credentials never pass through here: s3fs takes them from the environment or the node's role.
A custom S3 endpoint comes from ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3`` or ``endpoint_url``.
"""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.parse
import urllib.request
from typing import Any, Mapping

import fsspec
from fsspec.core import url_to_fs

from pipeline.errors import UnreachableError

# botocore's "standard" mode retries throttling (SlowDown, 503), other 5xx and dropped connections
# with jittered exponential backoff; s3fs retries SlowDown and timeouts again on top of that.
S3_RETRIES = {"mode": "standard", "max_attempts": 10}
# botocore waits 60 s for a TCP connection by default, and retries that too: a wrong endpoint stalls.
S3_CONNECT_TIMEOUT_S = 10
# How long a run waits, before anything else, for an object-store endpoint that refuses connections:
# a refused connection is a wrong address or a server that is down, not throttling worth minutes of retries.
CONNECT_BUDGET_S = 5.0


def s3_options(storage_options: Mapping[str, Any]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        options["endpoint_url"] = endpoint
    options.update(storage_options)
    config_kwargs = dict(storage_options.get("config_kwargs") or {})
    config_kwargs.setdefault("retries", dict(S3_RETRIES))
    config_kwargs.setdefault("connect_timeout", S3_CONNECT_TIMEOUT_S)
    options["config_kwargs"] = config_kwargs
    return options


def _s3_endpoint(uri: str, storage_options: Mapping[str, Any] | None) -> str | None:
    protocol = uri.split("://", 1)[0] if "://" in uri else "file"
    if protocol not in ("s3", "s3a"):
        return None
    return s3_options(storage_options or {}).get("endpoint_url")


def check_reachable(uri: str, storage_options: Mapping[str, Any] | None = None,
                    budget_s: float = CONNECT_BUDGET_S) -> None:
    """Raise :class:`UnreachableError` when the custom S3 endpoint that ``uri`` goes to takes no TCP
    connection within ``budget_s``. Endpoints behind a proxy, and AWS's own, are left to botocore."""
    endpoint = _s3_endpoint(uri, storage_options)
    if not endpoint:
        return
    parsed = urllib.parse.urlparse(endpoint if "://" in endpoint else "http://" + endpoint)
    host = parsed.hostname or ""
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    if urllib.request.getproxies().get(parsed.scheme) and not urllib.request.proxy_bypass(host):
        return
    deadline = time.monotonic() + budget_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=max(0.5, deadline - time.monotonic())):
                return
        except OSError as error:
            if time.monotonic() + 0.5 >= deadline:
                reason = error.strerror or type(error).__name__
                raise UnreachableError(
                    f"cannot connect to the object store at {endpoint} (for {uri}): {reason}, for {budget_s:g} s; "
                    f"check endpoint_url / AWS_ENDPOINT_URL and that the server is up") from error
            time.sleep(0.5)


def filesystem(uri: str, storage_options: Mapping[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem for ``uri`` and the path within it."""
    protocol = uri.split("://", 1)[0] if "://" in uri else "file"
    if protocol == "file":
        return url_to_fs(uri)
    if protocol in ("s3", "s3a"):
        return url_to_fs(uri, **s3_options(storage_options or {}))
    return url_to_fs(uri, **(storage_options or {}))


def is_local(uri: str) -> bool:
    """A plain path or a file:// URI."""
    return "://" not in uri or uri.startswith("file://")


def local_path(uri: str) -> str:
    """The absolute path of a plain path or file:// URI (``~`` expanded, %-escapes decoded)."""
    if uri.startswith("file://"):
        import urllib.parse

        return os.path.abspath(urllib.parse.unquote(urllib.parse.urlparse(uri).path))
    return os.path.abspath(os.path.expanduser(uri))


def pyarrow_filesystem(fs: fsspec.AbstractFileSystem) -> Any:
    """An fsspec filesystem as pyarrow's (Ray Data's readers take pyarrow filesystems)."""
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return PyFileSystem(FSSpecHandler(fs))


def protocol_of(fs: fsspec.AbstractFileSystem) -> str:
    protocol = fs.protocol
    return protocol[0] if isinstance(protocol, (tuple, list)) else protocol


def full_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path as a URI that :func:`filesystem` understands again."""
    protocol = protocol_of(fs)
    if protocol in ("file", "local"):
        return os.path.abspath(path) if not path.startswith("/") else path
    return f"{protocol}://{path}"


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])


def write_bytes_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """A reader sees the old object or the new one, never half of one.

    Object stores make a PUT atomic already; a local filesystem needs write-then-rename.
    """
    if protocol_of(fs) in ("file", "local"):
        fs.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


def write_json_atomic(fs: fsspec.AbstractFileSystem, path: str, payload: Any) -> None:
    write_bytes_atomic(fs, path, json.dumps(payload, indent=2, sort_keys=True, default=str).encode())


def read_json(fs: fsspec.AbstractFileSystem, path: str) -> Any:
    with fs.open(path, "rb") as handle:
        return json.loads(handle.read())
