"""Exactly-once unit commits into an output's two Delta tables.

A unit's rows become visible in one data-table transaction that adds its new files, removes the files of
its previous version, and carries the app transaction ``(unit, version)``. Its facts then go to the unit
table in a second transaction carrying the same app transaction. The order matters, and a crash between
the two is harmless: the data commit also holds the unit's record (in its commit metadata), and
:meth:`UnitCommitter.roll_forward`, run by the next committer before anything else, appends every unit row
the unit table lacks from the data commits it has not seen. A crash before the data commit leaves files
no snapshot lists, and the retry writes the same names again (``<unit>.v<version>.parquet``).

One committer per output at a time (the run's lease); its methods may be called from several threads.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import pyarrow as pa

from pipeline import bands
from pipeline.io import units
from pipeline.io.delta import add_missing_columns, open_table, storage_options_for, table_uri

log = logging.getLogger(__name__)

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
        self._paths: dict[str, list[tuple[str, str]]] | None = None  # unit -> [(path, band)], read on first commit

    def _current_paths(self) -> dict[str, list[tuple[str, str]]]:
        """Each unit's files in the current snapshot (read once: a run with nothing to commit never pays)."""
        if self._paths is None:
            self._paths = {}
            if self._table is not None:
                actions = pa.table(self._table.get_add_actions(flatten=True)).to_pydict()
                bands_of = actions.get(f"partition.{bands.COLUMN}") or [None] * len(actions["path"])
                for path, band in zip(actions["path"], bands_of):
                    self._paths.setdefault(unit_of_path(path), []).append((path, band))
        return self._paths

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
                removes = [RemoveAction(path, True, now_ms, None, {bands.COLUMN: band})
                           for path, band in self._current_paths().get(unit_id, [])
                           if path not in {f.path for f in files}]
                self._table.create_write_transaction(adds + removes, mode="append", schema=self._table.schema(),
                                                     partition_by=[bands.COLUMN], commit_properties=properties)
                self._table.update_incremental()
            data_version = self._table.version()
            self._current_paths()[unit_id] = [(f.path, f.band) for f in files]
            units.append(self.output, [units.to_row(record, version, data_version)], self.storage_options,
                         [(unit_id, version)])
            return data_version
