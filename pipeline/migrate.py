"""`aesthetics migrate`: turn an output of the earlier layout (one JSON manifest per unit) into Delta tables.

Each committed unit becomes one Delta commit, exactly as a scoring run commits it: its files are rewritten
under the new names (embeddings as float lists, which Delta can hold), its manifest becomes its unit
record. The manifests move to ``_manifests.migrated/`` and the old data files are removed, so nothing of
the earlier layout is left for a reader to misread. A migration that stops part way is run again: units
already converted are skipped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping

import pyarrow.parquet as pq

from pipeline.errors import InputError
from pipeline.io import units
from pipeline.io.commits import DataFile, UnitCommitter, data_file_name
from pipeline.io.delta import delta_compatible, file_stats
from pipeline.io.lease import Lease
from pipeline.io.storage import filesystem, join, read_json

log = logging.getLogger(__name__)

MIGRATED = units.EARLIER_MANIFESTS + ".migrated"


@dataclass(frozen=True)
class Migration:
    units: int
    rows: int
    skipped: int  # converted by an earlier, stopped migration


def migrate(output: str, storage_options: Mapping[str, Any] | None = None, run_id: str = "migrate") -> Migration:
    fs, root = filesystem(output, storage_options)
    folder = join(root, units.EARLIER_MANIFESTS)
    if not fs.exists(folder):
        raise InputError(f"{output} has no {units.EARLIER_MANIFESTS}/: it is not an output of the earlier layout")
    manifests = [read_json(fs, path) for path in sorted(fs.find(folder)) if path.endswith(".json")]
    migrated = skipped = rows = 0
    with Lease(output, run_id, storage_options=storage_options):
        committer = UnitCommitter(output, storage_options)
        done = units.versions(output, storage_options) if fs.exists(join(root, "_delta_log")) else {}
        for manifest in manifests:
            unit_id = manifest["unit"]
            if unit_id in done:
                skipped += 1
                continue
            version = committer.next_version(unit_id)
            files, schema = [], None
            for entry in manifest["files"]:
                table = delta_compatible(pq.read_table(join(root, entry["path"]), filesystem=fs))
                name = data_file_name(unit_id, version, entry["band"])
                fs.makedirs(join(root, name).rsplit("/", 1)[0], exist_ok=True)
                pq.write_table(table, join(root, name), filesystem=fs, row_group_size=8192, compression="zstd")
                files.append(DataFile(name, entry["band"], table.num_rows, int(fs.size(join(root, name))),
                                      file_stats(table)))
                schema = table.schema
            record = {**manifest, "files": [{"path": f.path, "band": f.band, "rows": f.rows} for f in files],
                      "migrated_from": units.EARLIER_MANIFESTS}
            record.pop("format", None)
            committer.commit(unit_id, version, files, schema, record)
            migrated += 1
            rows += int(manifest["rows"])
        units.compact(output, storage_options)
        for manifest in manifests:  # only now: a stopped migration still has every old file to read
            for entry in manifest["files"]:
                old = join(root, entry["path"])
                if fs.exists(old):
                    fs.rm(old)
        fs.mv(folder, join(root, MIGRATED), recursive=True)
    log.info("migrated %d units (%d rows) of %s; %d were already", migrated, rows, output, skipped)
    return Migration(migrated, rows, skipped)

