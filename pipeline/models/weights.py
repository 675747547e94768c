"""Find a weights file, fetch it once into a local cache, and check it is the file we pinned.

Order of search for ``WeightsSpec(uri, sha256)``:

1. ``uri`` is a local path or ``file://`` URI: used in place when it exists (never copied).
2. ``uri`` is remote and a cached copy with the pinned digest exists: used, without touching the network.
3. Each search dir (a local directory or a URI prefix such as ``s3://bucket/weights/``, for clusters
   without internet) is tried for a file named like the URI's url-unquoted basename; local ones are used
   in place, remote ones are downloaded into the cache.
4. The URI itself (s3://, gs://, any fsspec protocol, or http(s)) is downloaded into the cache.

Downloads go to a temporary file in the cache dir and are renamed into place only once complete and
verified, so a crash never leaves a half file under a final name. A cached file's name starts with its
sha256. A file without a pinned sha256 is accepted; its digest is computed and remembered, so
:func:`sha256_of` on the returned path costs nothing.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import tempfile
import urllib.parse
import urllib.request
from typing import IO, Any, Mapping, Sequence

from pipeline.config import WeightsSpec
from pipeline.errors import WeightsError
from pipeline.io.storage import filesystem, is_local, local_path

CACHE_DIR_ENV = "LAION_AESTHETICS_RAY_CACHE"
DEFAULT_CACHE_DIR = "~/.cache/laion-aesthetics-ray"
HTTP_TIMEOUT_S = 60
_CHUNK = 1 << 20


class WeightsNotFound(WeightsError, FileNotFoundError):
    """No source could provide the weights; the message says what was tried and how to provide them."""


class WeightsChecksumMismatch(WeightsError, ValueError):
    """A weights file exists but is not the pinned one."""


# (resolved path, size, mtime_ns) -> sha256: hashing a 1.7 GB checkpoint twice per process is waste.
_digest_memo: dict[tuple[str, int, int], str] = {}


def _stat_key(path: pathlib.Path) -> tuple[str, int, int]:
    real = path.resolve()
    stat = real.stat()
    return str(real), stat.st_size, stat.st_mtime_ns


def sha256_of(path: str | os.PathLike) -> str:
    """The hex sha256 of a local file (memoised per process on path, size and mtime)."""
    path = pathlib.Path(path)
    key = _stat_key(path)
    digest = _digest_memo.get(key)
    if digest is None:
        hasher = hashlib.sha256()
        with open(path, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                hasher.update(chunk)
        digest = hasher.hexdigest()
        _digest_memo[key] = digest
    return digest


def default_cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get(CACHE_DIR_ENV) or DEFAULT_CACHE_DIR).expanduser()


def file_name_of(uri: str) -> str:
    """The url-unquoted basename of a path, URI or URL (``sac%2Blogos...pth`` -> ``sac+logos...pth``)."""
    path = urllib.parse.urlparse(uri).path if "://" in uri else uri
    return urllib.parse.unquote(path.rstrip("/").rsplit("/", 1)[-1])


def _local_path(uri: str) -> pathlib.Path:
    return pathlib.Path(local_path(uri))


def _join(directory: str, name: str) -> str:
    if is_local(directory):
        return str(_local_path(directory) / name)
    return directory.rstrip("/") + "/" + name


def _check_digest(source: str, expected: str | None, actual: str) -> None:
    if expected is not None and actual != expected:
        raise WeightsChecksumMismatch(
            f"sha256 mismatch for weights {source}: expected {expected}, got {actual}. "
            "This is not the pinned file: replace it with the right one, or pin the new digest if the "
            "change is intended.")


def _verified_local(path: pathlib.Path, expected: str | None) -> pathlib.Path:
    _check_digest(str(path), expected, sha256_of(path))
    return path


def _open_remote(uri: str, storage_options: Mapping[str, Any]) -> IO[bytes]:
    if uri.startswith(("http://", "https://")):
        # urllib rather than fsspec's HTTP filesystem: it follows GitHub's raw redirects and honours
        # the usual *_proxy variables without the job's object-store options getting in the way.
        return urllib.request.urlopen(uri, timeout=HTTP_TIMEOUT_S)
    fs, path = filesystem(uri, storage_options)
    return fs.open(path, "rb")


def _remote_exists(uri: str, storage_options: Mapping[str, Any]) -> bool:
    fs, path = filesystem(uri, storage_options)
    return fs.isfile(path)


class _Cache:
    """Downloaded weights under ``<sha256>-<name>``; unpinned URIs remembered by a small pointer file."""

    def __init__(self, root: pathlib.Path):
        self.root = root

    def pinned(self, sha256: str, name: str) -> pathlib.Path | None:
        path = self.root / f"{sha256}-{name}"
        return path if path.is_file() else None

    def _pointer(self, uri: str) -> pathlib.Path:
        return self.root / "by-uri" / (hashlib.sha256(uri.encode()).hexdigest()[:32] + ".ref")

    def unpinned(self, uri: str) -> pathlib.Path | None:
        pointer = self._pointer(uri)
        if not pointer.is_file():
            return None
        path = self.root / pointer.read_text().strip()
        return path if path.is_file() else None

    def lookup(self, uri: str, expected: str | None) -> pathlib.Path | None:
        return self.pinned(expected, file_name_of(uri)) if expected else self.unpinned(uri)

    def fetch(self, uri: str, expected: str | None, storage_options: Mapping[str, Any]) -> pathlib.Path:
        cached = self.lookup(uri, expected)
        if cached is not None:
            return _verified_local(cached, expected)
        return self.download(uri, expected, storage_options)

    def download(self, uri: str, expected: str | None, storage_options: Mapping[str, Any]) -> pathlib.Path:
        name = file_name_of(uri)
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=self.root, prefix=".partial-", suffix="-" + name)
        tmp = pathlib.Path(tmp_name)
        try:
            hasher = hashlib.sha256()
            with os.fdopen(fd, "wb") as out, _open_remote(uri, storage_options) as source:
                while chunk := source.read(_CHUNK):
                    hasher.update(chunk)
                    out.write(chunk)
            digest = hasher.hexdigest()
            _check_digest(uri, expected, digest)
            final = self.root / f"{digest}-{name}"
            os.replace(tmp, final)  # atomic: concurrent actors on one node may race, both write the same bytes
            _digest_memo[_stat_key(final)] = digest
            if expected is None:
                self._write_pointer(uri, final.name)
            return final
        finally:
            tmp.unlink(missing_ok=True)

    def _write_pointer(self, uri: str, file_name: str) -> None:
        pointer = self._pointer(uri)
        pointer.parent.mkdir(parents=True, exist_ok=True)
        tmp = pointer.with_name(f"{pointer.name}.tmp-{os.getpid()}")
        tmp.write_text(file_name + "\n")
        os.replace(tmp, pointer)


def _not_found_message(spec: WeightsSpec, attempts: Sequence[str], cache_root: pathlib.Path) -> str:
    """One line: what was looked for, where, and the ways to provide it."""
    name = file_name_of(spec.uri)
    pin = f" (sha256 {spec.sha256})" if spec.sha256 else ""
    ways = [f"put {name!r} in a folder or object-store prefix the nodes can read and pass it with --weights-dir",
            f"or give a local path or URI of the file in place of {spec.uri!r}"]
    if not is_local(spec.uri):
        ways.append(f"or make {spec.uri} reachable from the nodes (it is downloaded once into {cache_root})")
    return (f"weights {name!r}{pin} not found (tried: {'; '.join(attempts) or 'nothing'}); "
            + ", ".join(ways))


def resolve_weights(
    spec: WeightsSpec,
    search_dirs: Sequence[str] = (),
    cache_dir: str | os.PathLike | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> pathlib.Path:
    """A local, verified path to the weights ``spec`` names (see the module docstring for the order)."""
    storage_options = storage_options or {}
    cache = _Cache(pathlib.Path(cache_dir).expanduser() if cache_dir else default_cache_dir())
    name = file_name_of(spec.uri)
    attempts: list[str] = []

    if is_local(spec.uri):
        path = _local_path(spec.uri)
        if path.is_file():
            return _verified_local(path, spec.sha256)
        attempts.append(f"{path}: no such file")
    else:
        cached = cache.lookup(spec.uri, spec.sha256)
        if cached is not None:
            return _verified_local(cached, spec.sha256)

    for directory in search_dirs:
        candidate = _join(directory, name)
        try:
            if is_local(candidate):
                path = _local_path(candidate)
                if path.is_file():
                    return _verified_local(path, spec.sha256)
                attempts.append(f"{path}: no such file")
            elif cache.lookup(candidate, spec.sha256) is not None or _remote_exists(candidate, storage_options):
                return cache.fetch(candidate, spec.sha256, storage_options)
            else:
                attempts.append(f"{candidate}: no such object")
        except WeightsChecksumMismatch:
            raise
        except Exception as error:  # any failure to reach a source means: not here, try the next one
            attempts.append(f"{candidate}: {type(error).__name__}: {error}")

    if not is_local(spec.uri):
        try:
            return cache.download(spec.uri, spec.sha256, storage_options)
        except WeightsChecksumMismatch:
            raise
        except Exception as error:
            attempts.append(f"{spec.uri}: {type(error).__name__}: {error}")

    raise WeightsNotFound(_not_found_message(spec, attempts, cache.root))
