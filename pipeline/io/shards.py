"""Find the input shards and group them into work units.

A shard is one img2dataset output pair in one folder: ``NNNNN.tar`` and its sidecar
``NNNNN.parquet``; either may be missing (a tar without sidecar, or a sidecar whose tar never
arrived). A work unit is a few shards of one folder, named deterministically so that a rerun
writes the same files instead of new ones.
"""

from __future__ import annotations

import hashlib
import posixpath
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from pipeline.errors import InputError
from pipeline.io.storage import filesystem, full_uri

TAR_SUFFIX = ".tar"
SIDECAR_SUFFIX = ".parquet"
_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class Shard:
    """One shard as listed: its tar and sidecar URIs and what identifies this version of it."""

    name: str  # URI of the tar, or of the sidecar when there is no tar
    tar: str | None
    sidecar: str | None
    size: int  # bytes of the tar (0 without one): a changed size means a changed shard
    etag: str | None  # the object store's ETag or the file's mtime: a changed tag means a changed shard

    @property
    def folder(self) -> str:
        return posixpath.dirname(self.name)

    @property
    def stem(self) -> str:
        base = posixpath.basename(self.name)
        return base.rsplit(".", 1)[0]

    def version(self) -> dict[str, Any]:
        return {"name": self.name, "tar": self.tar, "sidecar": self.sidecar, "size": self.size, "etag": self.etag}


@dataclass(frozen=True)
class WorkUnit:
    """A few shards scored and committed together: one Parquet file per score band, one unit record."""

    unit_id: str
    shards: tuple[Shard, ...]

    def versions(self) -> list[dict[str, Any]]:
        return [s.version() for s in self.shards]

    def matches(self, committed_shards: Iterable[Mapping[str, Any]]) -> bool:
        """Whether a unit record's shard list is exactly this unit's shards, at these versions."""
        def identity(v: Mapping[str, Any]) -> tuple:
            return v["name"], v.get("size"), v.get("etag")
        return sorted(map(identity, self.versions())) == sorted(map(identity, committed_shards))


def _tag(info: Mapping[str, Any]) -> str | None:
    for field in ("ETag", "etag", "mtime", "LastModified", "last_modified", "created"):
        value = info.get(field)
        if value is not None:
            return str(value).strip('"')
    return None


def _entries(pattern: str, storage_options: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    fs, path = filesystem(pattern, storage_options)
    if any(c in path for c in _GLOB_CHARS):
        found = fs.glob(path, detail=True)
        # A glob names tars; sidecars beside them are found on their own.
        items = list(found.items())
        folders = {posixpath.dirname(p) for p, _ in items}
        for folder in folders:
            items += [(p, i) for p, i in fs.find(folder, maxdepth=1, detail=True).items()
                      if p.endswith(SIDECAR_SUFFIX)]
    elif fs.isdir(path):
        items = list(fs.find(path, detail=True).items())
    elif fs.exists(path):
        items = [(path, fs.info(path))]
        if path.endswith(TAR_SUFFIX):
            sidecar = path[: -len(TAR_SUFFIX)] + SIDECAR_SUFFIX
            if fs.exists(sidecar):
                items.append((sidecar, fs.info(sidecar)))
    else:
        raise InputError(f"input {pattern!r} does not exist; give a folder, a glob or .tar files of "
                         f"img2dataset shards")
    return [(full_uri(fs, p), info) for p, info in items if info.get("type", "file") != "directory"]


def list_shards(inputs: Iterable[str], storage_options: Mapping[str, Any] | None = None) -> list[Shard]:
    """Every shard named by the inputs (folders, globs or single files), sorted by name."""
    storage_options = storage_options or {}
    tars: dict[str, tuple[str, dict[str, Any]]] = {}
    sidecars: dict[str, str] = {}
    for pattern in inputs:
        try:
            entries = _entries(pattern, storage_options)
        except PermissionError as error:
            raise InputError(f"cannot list the input {pattern!r}: permission denied ({error})") from error
        for uri, info in entries:
            if uri.endswith(TAR_SUFFIX):
                tars[uri[: -len(TAR_SUFFIX)]] = (uri, info)
            elif uri.endswith(SIDECAR_SUFFIX):
                sidecars[uri[: -len(SIDECAR_SUFFIX)]] = uri
    shards = []
    for base in sorted(set(tars) | set(sidecars)):
        tar = tars.get(base)
        sidecar = sidecars.get(base)
        if tar is None and not posixpath.basename(base).isdigit():
            continue  # a Parquet file that is no img2dataset sidecar (stats, other tables)
        shards.append(Shard(
            name=tar[0] if tar else sidecar,
            tar=tar[0] if tar else None,
            sidecar=sidecar,
            size=int(tar[1].get("size") or 0) if tar else 0,
            etag=_tag(tar[1]) if tar else None,
        ))
    if not shards:
        raise InputError(f"no .tar shards (or img2dataset .parquet sidecars) under {', '.join(inputs)}; "
                         f"give a folder, a glob or .tar files of img2dataset shards")
    return shards


def plan_units(shards: Iterable[Shard], shards_per_unit: int) -> list[WorkUnit]:
    """Group shards into units that do not depend on which shards are already done.

    Numbered shards (img2dataset's 00000.tar) go by number // shards_per_unit, so a shard that
    arrives later joins the same unit on every run; other names go by sorted position.
    """
    by_folder: dict[str, list[Shard]] = {}
    for shard in shards:
        by_folder.setdefault(shard.folder, []).append(shard)
    units = []
    for folder, members in sorted(by_folder.items()):
        folder_tag = hashlib.sha1(folder.encode()).hexdigest()[:8]
        label = "".join(c if c.isalnum() or c in "-_" else "_" for c in posixpath.basename(folder)) or "root"
        groups: dict[str, list[Shard]] = {}
        named = sorted((s.name for s in members if not s.stem.isdigit()))
        position = {name: i for i, name in enumerate(named)}
        for shard in members:
            if shard.stem.isdigit():
                index = f"{int(shard.stem) // shards_per_unit:06d}"
            else:
                index = f"n{position[shard.name] // shards_per_unit:06d}"
            groups.setdefault(index, []).append(shard)
        for index, group in sorted(groups.items()):
            units.append(WorkUnit(f"{label}-{folder_tag}-{index}", tuple(sorted(group, key=lambda s: s.name))))
    return units
