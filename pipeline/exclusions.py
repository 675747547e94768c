"""Exclusion lists: hex MD5 or SHA-256 digests of image bytes or of URLs, one per line, as Re-LAION-5B
publishes them (a ``.gz`` list is read as such; blank lines and ``#`` comments are skipped).

A row whose image bytes or URL has a listed digest keeps its row, with status ``excluded``, no image
decoded and no score, and the cutoff table counts it: nothing is dropped silently. The digests are held
as sorted numpy arrays (40 bytes a SHA-256, tens of MB for millions of them), which Ray hands to every read
task through the object store without copying.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from pipeline.errors import InputError
from pipeline.io.storage import filesystem

_HEX = frozenset("0123456789abcdef")
MD5_HEX, SHA256_HEX = 32, 64


class DigestSet:
    """Fixed-width digests, sorted by their first 8 bytes: a uint64 array to search, and the digests as rows of
    bytes to confirm a hit (numpy's bytes dtype would strip a digest's trailing zero bytes)."""

    def __init__(self, digests: list[bytes], width: int):
        rows = np.frombuffer(b"".join(sorted(set(digests))), dtype=np.uint8).reshape(-1, width)
        self.rows = rows
        self.prefixes = rows[:, :8].copy().view(">u8").ravel().astype(np.uint64)

    def __len__(self) -> int:
        return len(self.rows)

    def __contains__(self, digest: bytes) -> bool:
        prefix = np.uint64(int.from_bytes(digest[:8], "big"))
        low, high = np.searchsorted(self.prefixes, prefix, "left"), np.searchsorted(self.prefixes, prefix, "right")
        return bool((self.rows[low:high] == np.frombuffer(digest, dtype=np.uint8)).all(axis=1).any())


@dataclass(frozen=True, eq=False)
class Exclusions:
    source: str
    sha256: str  # of the list file itself
    md5: DigestSet
    sha256s: DigestSet

    def __len__(self) -> int:
        return len(self.md5) + len(self.sha256s)

    def match(self, image: bytes | None, url: str | None, image_sha256: str | None = None) -> str | None:
        """What matched ("image sha256", "image md5", "url sha256", "url md5"), or None."""
        candidates = []
        if image is not None:
            candidates.append(("image", image, image_sha256))
        if url:
            candidates.append(("url", url.encode("utf-8"), None))
        for what, data, known_sha256 in candidates:
            if len(self.sha256s):
                digest = bytes.fromhex(known_sha256) if known_sha256 else hashlib.sha256(data).digest()
                if digest in self.sha256s:
                    return f"{what} sha256"
            if len(self.md5) and hashlib.md5(data, usedforsecurity=False).digest() in self.md5:
                return f"{what} md5"
        return None


def load_exclusions(uri: str, storage_options: Mapping[str, Any] | None = None) -> Exclusions:
    """The list at ``uri``; a line that is not a hex MD5 or SHA-256 digest is an InputError naming it."""
    fs, path = filesystem(uri, storage_options)
    try:
        with fs.open(path, "rb", compression="infer") as handle:
            data = handle.read()
    except FileNotFoundError as error:
        raise InputError(f"--exclude-hashes {uri}: no such file") from error
    except OSError as error:
        raise InputError(f"--exclude-hashes {uri}: cannot read it ({type(error).__name__}: {error})") from error
    md5, sha256 = [], []
    for number, raw in enumerate(data.splitlines(), start=1):
        line = raw.split(b"#", 1)[0].strip().lower()
        if not line:
            continue
        text = line.decode("ascii", errors="replace")
        if len(text) not in (MD5_HEX, SHA256_HEX) or not set(text) <= _HEX:
            raise InputError(f"--exclude-hashes {uri}: line {number} is not a hex MD5 (32 digits) or SHA-256 "
                             f"(64 digits): {text[:70]!r}")
        (md5 if len(text) == MD5_HEX else sha256).append(bytes.fromhex(text))
    if not md5 and not sha256:
        raise InputError(f"--exclude-hashes {uri}: the list holds no digests")
    return Exclusions(uri, hashlib.sha256(data).hexdigest(), DigestSet(md5, 16), DigestSet(sha256, 32))
