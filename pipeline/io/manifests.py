"""Manifests: the commit markers of work units, and the only index readers trust.

A unit's data files count only once its manifest exists; the manifest lists those files, so a
reader never lists the data folders (where an uncommitted unit's files may lie) and the cutoff
table never rescans Parquet.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator, Mapping

from pipeline.io import layout
from pipeline.io.storage import filesystem, full_uri, join, read_json

log = logging.getLogger(__name__)

MANIFEST_FORMAT = 1


def read_manifests(output: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Every committed unit's manifest, by unit id."""
    fs, root = filesystem(output, storage_options)
    folder = join(root, layout.MANIFESTS)
    if not fs.exists(folder):
        return {}
    manifests = {}
    for path in sorted(fs.find(folder)):
        if not path.endswith(".json"):
            continue
        manifest = read_json(fs, path)
        if manifest.get("format") != MANIFEST_FORMAT:
            log.warning("ignoring manifest %s of unknown format %r", path, manifest.get("format"))
            continue
        manifests[manifest["unit"]] = manifest
    return manifests


def committed_files(output: str, storage_options: Mapping[str, Any] | None = None,
                    manifests: Mapping[str, Mapping[str, Any]] | None = None) -> list[str]:
    """Full URIs of the data files of committed units only."""
    fs, root = filesystem(output, storage_options)
    if manifests is None:
        manifests = read_manifests(output, storage_options)
    return [full_uri(fs, join(root, entry["path"])) for m in manifests.values() for entry in m["files"]]


def iter_shard_versions(manifests: Mapping[str, Mapping[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for unit_id, manifest in manifests.items():
        for shard in manifest["shards"]:
            yield unit_id, shard
