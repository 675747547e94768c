"""Exactly-once unit commits into an output's two Delta tables.

A unit's rows become visible in one data-table transaction that adds its new files, removes the files of
its previous version, and carries the app transaction ``(unit, version)``. Its facts then go to the unit
table in a second transaction carrying the same app transaction. The order matters, and a crash between
the two is harmless: the data commit also holds the unit's record (in its commit metadata), and
:meth:`UnitCommitter.roll_forward`, run by the next committer before anything else, appends every unit row
the unit table lacks from the data commits it has not seen. A crash before the data commit leaves files
no snapshot lists, and the retry writes the same names again (``<unit>.v<version>.parquet``).

After ``aesthetics optimize`` a unit's rows may share compacted files with other units. Its next version
then replaces them by predicate (``unit = '<unit>'``) through delta-rs, still in one transaction with the
same app transaction: the compacted files holding its rows are rewritten without them. Every file carries
full column statistics, so the predicate reads only the files whose ``unit`` bounds include the unit.

One committer per output at a time (the run's lease); its methods may be called from several threads.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import bands
from pipeline import schema as S
from pipeline.io import units
from pipeline.io.delta import (
    SnapshotFile,
    add_missing_columns,
    open_table,
    snapshot_files,
    storage_options_for,
    table_uri,
)
from pipeline.io.storage import filesystem, join

log = logging.getLogger(__name__)
T = TypeVar("T")

UNIT_KEY, VERSION_KEY, RECORD_KEY = "aesthetics.unit", "aesthetics.unit_version", "aesthetics.unit_record"


@dataclass(frozen=True)
class DataFile:
    """A Parquet file written under the table root, ready to be added."""

    path: str  # relative to the table root: score_band=<band>/<unit>.v<version>.parquet
    band: str
    rows: int
    size: int
    stats: Mapping[str, Any]  # Delta file statistics: numRecords, minValues, maxValues, nullCount


def data_file_name(unit_id: str, version: int, band: str) -> str:
    return f"{bands.COLUMN}={band}/{unit_id}.v{version}.parquet"


_VERSIONED_NAME = re.compile(r"^(?P<unit>.+)\.v\d+\.parquet$")


def unit_of_path(path: str) -> str:
    """The unit a data file belongs to, from its name (``<unit>.v<version>.parquet``)."""
    name = path.rsplit("/", 1)[-1]
    match = _VERSIONED_NAME.match(name)
    return match.group("unit") if match else name.removesuffix(".parquet")


class UnitCommitter:
    def __init__(self, output: str, storage_options: Mapping[str, Any] | None = None):
        self.output = output
        self.storage_options = dict(storage_options or {})
        self._uri = table_uri(output)
        self._delta_options = storage_options_for(output, storage_options)
        self._lock = threading.Lock()
        self._table = open_table(output, storage_options)
        self.roll_forward()
        self._snapshot: _Snapshot | None = None  # read on the first commit: a run with nothing to commit never pays
        self.files_committed = 0  # data files this committer has added

    def exclusively(self, work: Callable[[], T]) -> T:
        """Run ``work`` (a compaction) with no commit in flight, then read the table again: files it rewrote
        are no longer any unit's own, and a unit scored again must replace its rows where they now lie."""
        with self._lock:
            try:
                return work()
            finally:
                self._table = open_table(self.output, self.storage_options)
                self._snapshot = None

    def _files(self) -> _Snapshot:
        if self._snapshot is None:
            self._snapshot = _Snapshot.of(self._table)
        return self._snapshot

    # -- recovery -------------------------------------------------------------------------------------
    def roll_forward(self) -> int:
        """Append the unit rows of data commits the unit table lacks; how many were appended."""
        if self._table is None:
            return 0
        seen = units.last_data_version(self.output, self.storage_options)
        newest = self._table.version()
        if newest <= seen:
            return 0
        unit_table = open_table(units.units_uri(self.output), self.storage_options)
        missing = []
        for entry in self._table.history(limit=newest - seen):
            if entry.get("version", -1) <= seen or RECORD_KEY not in entry:
                continue
            unit, version = entry[UNIT_KEY], int(entry[VERSION_KEY])
            if unit_table is not None and (unit_table.transaction_version(unit) or 0) >= version:
                continue
            missing.append(units.to_row(json.loads(entry[RECORD_KEY]), version, int(entry["version"])))
        if missing:
            log.warning("%s: %d unit(s) were committed but not recorded (a run stopped between the two "
                        "commits); recording them now", self.output, len(missing))
            units.append(self.output, missing, self.storage_options,
                         [(row["unit"], row["unit_version"]) for row in missing])
        return len(missing)

    # -- committing ---------------------------------------------------------------------------------------
    def next_version(self, unit_id: str) -> int:
        """The version the unit's next commit will be (its data files are named with it)."""
        with self._lock:
            if self._table is None:
                return 1
            self._table.update_incremental()
            return (self._table.transaction_version(unit_id) or 0) + 1

    def commit(self, unit_id: str, version: int, files: Sequence[DataFile], schema: pa.Schema,
               record: Mapping[str, Any]) -> int:
        """Make ``files`` the unit's rows and record it; the data table version that did. Committing the
        same (unit, version) again changes nothing."""
        from deltalake import CommitProperties, Schema, Transaction
        from deltalake.transaction import AddAction, RemoveAction, create_table_with_add_actions

        now_ms = int(time.time() * 1000)
        adds = [AddAction(f.path, f.size, {bands.COLUMN: f.band}, now_ms, True, json.dumps(f.stats)) for f in files]
        full_schema = schema.append(pa.field(bands.COLUMN, pa.string()))
        properties = CommitProperties(
            app_transactions=[Transaction(unit_id, version)],
            custom_metadata={UNIT_KEY: unit_id, VERSION_KEY: version, RECORD_KEY: json.dumps(record, default=str)})
        with self._lock:
            if self._table is None:
                create_table_with_add_actions(self._uri, Schema.from_arrow(full_schema), adds, mode="append",
                                              partition_by=[bands.COLUMN], storage_options=self._delta_options,
                                              commit_properties=properties)
                self._table = open_table(self.output, self.storage_options)
            else:
                self._table.update_incremental()
                if (self._table.transaction_version(unit_id) or 0) >= version:
                    return self._table.version()  # committed already: a retry after a lost answer
                add_missing_columns(self._table, full_schema)
                if self._files().shared_with(unit_id):
                    self._replace_by_predicate(unit_id, files, full_schema, properties)
                else:
                    removes = [RemoveAction(path, True, now_ms, None, {bands.COLUMN: band})
                               for path, band in self._files().own.get(unit_id, [])
                               if path not in {f.path for f in files}]
                    self._table.create_write_transaction(adds + removes, mode="append", schema=self._table.schema(),
                                                         partition_by=[bands.COLUMN], commit_properties=properties)
                    self._files().own[unit_id] = [(f.path, f.band) for f in files]
                self._table.update_incremental()
            data_version = self._table.version()
            self.files_committed += len(files)
            units.append(self.output, [units.to_row(record, version, data_version)], self.storage_options,
                         [(unit_id, version)])
            return data_version

    def _replace_by_predicate(self, unit_id: str, files: Sequence[DataFile], schema: pa.Schema,
                              properties: Any) -> None:
        """Replace the unit's rows where they share compacted files with other units: delta-rs rewrites
        those files without them and adds the new rows, in one transaction. The new rows are read back from
        the unit's written files, which are then left to vacuum."""
        from deltalake import write_deltalake

        fs, root = filesystem(self.output, self.storage_options)
        parts = [pq.read_table(join(root, f.path), filesystem=fs).append_column(
                     bands.COLUMN, pa.array([f.band] * f.rows, pa.string())) for f in files]
        rows = pa.concat_tables(parts, promote_options="permissive").cast(schema) if parts else schema.empty_table()
        quoted = unit_id.replace("'", "''")
        write_deltalake(self._table, rows, mode="overwrite", predicate=f"{S.UNIT} = '{quoted}'",
                        partition_by=[bands.COLUMN], commit_properties=properties)
        self._snapshot = None  # the rewritten files have new names; read the snapshot again when next needed


@dataclass
class _Snapshot:
    """The data files of a snapshot: each unit's own files, and the compacted files units share."""

    own: dict[str, list[tuple[str, str]]]  # unit -> [(path, band)] of its <unit>.v<version>.parquet files
    shared: list[SnapshotFile]  # the compacted files

    @classmethod
    def of(cls, table: Any) -> "_Snapshot":
        own: dict[str, list[tuple[str, str]]] = {}
        shared: list[SnapshotFile] = []
        if table is None:
            return cls(own, shared)
        for file in snapshot_files(table):
            if _VERSIONED_NAME.match(file.path.rsplit("/", 1)[-1]):
                own.setdefault(unit_of_path(file.path), []).append((file.path, file.band))
            else:
                shared.append(file)
        return cls(own, shared)

    def shared_with(self, unit_id: str) -> bool:
        """Whether a compacted file may hold rows of the unit (a file without bounds may hold any)."""
        return any(file.may_hold([unit_id]) for file in self.shared)
