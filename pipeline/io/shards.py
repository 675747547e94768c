"""Find the input shards and group them into work units.

A shard is one img2dataset output pair in one folder: ``NNNNN.tar`` and its sidecar
``NNNNN.parquet``; either may be missing (a tar without sidecar, or a sidecar whose tar never
arrived). A work unit is a few shards of one folder, named deterministically so that a rerun
writes the same files instead of new ones.
"""

from __future__ import annotations

import functools
import posixpath
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from pipeline.errors import InputError
from pipeline.sources.base import Entry, WorkUnit, folder_label, list_entries

__all__ = ["InputError", "Shard", "WorkUnit", "list_shards", "plan_units", "shards_from"]

TAR_SUFFIX = ".tar"
SIDECAR_SUFFIX = ".parquet"


@dataclass(frozen=True)
class Shard:
    """One shard as listed: its tar and sidecar URIs and what identifies this version of it."""

    name: str  # URI of the tar, or of the sidecar when there is no tar
    tar: str | None
    sidecar: str | None
    size: int  # bytes of the tar (0 without one): a changed size means a changed shard
    etag: str | None  # the object store's ETag or the file's mtime: a changed tag means a changed shard

    # Computed once: planning LAION's 232,000 shards asks each for them several times.
    @functools.cached_property
    def folder(self) -> str:
        return posixpath.dirname(self.name)

    @functools.cached_property
    def stem(self) -> str:
        base = posixpath.basename(self.name)
        return base.rsplit(".", 1)[0]

    def version(self) -> dict[str, Any]:
        return {"name": self.name, "tar": self.tar, "sidecar": self.sidecar, "size": self.size, "etag": self.etag}

    def task(self) -> dict[str, Any]:
        return {"name": self.name, "tar": self.tar, "sidecar": self.sidecar}


def shards_from(entries: Iterable[Entry]) -> list[Shard]:
    """The shards of a listing, sorted by name: tars paired with the sidecars beside them."""
    tars: dict[str, Entry] = {}
    sidecars: dict[str, str] = {}
    for entry in entries:
        if entry.uri.endswith(TAR_SUFFIX):
            tars[entry.uri[: -len(TAR_SUFFIX)]] = entry
        elif entry.uri.endswith(SIDECAR_SUFFIX):
            sidecars[entry.uri[: -len(SIDECAR_SUFFIX)]] = entry.uri
    shards = []
    for base in sorted(set(tars) | set(sidecars)):
        tar = tars.get(base)
        sidecar = sidecars.get(base)
        if tar is None and not posixpath.basename(base).isdigit():
            continue  # a Parquet file that is no img2dataset sidecar (stats, other tables)
        shards.append(Shard(
            name=tar.uri if tar else sidecar,
            tar=tar.uri if tar else None,
            sidecar=sidecar,
            size=tar.size if tar else 0,
            etag=tar.etag if tar else None,
        ))
    return shards


def list_shards(inputs: Iterable[str], storage_options: Mapping[str, Any] | None = None) -> list[Shard]:
    """Every shard named by the inputs (folders, globs or single files), sorted by name."""
    inputs = list(inputs)
    shards = shards_from(list_entries(inputs, storage_options))
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
        prefix = folder_label(folder)
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
            units.append(WorkUnit(f"{prefix}-{index}", tuple(sorted(group, key=lambda s: s.name))))
    return units
