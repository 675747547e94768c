"""`aesthetics optimize` and `aesthetics vacuum`: keep an output's tables quick to read and its prefix small.

Optimize rewrites the many small files a run commits (one per unit and score band, one unit-table file per
unit) into few large ones, per score band, and writes a checkpoint of each table's log so that a reader
opens one Parquet file of log instead of replaying every commit. Plain compaction keeps units together
(files are taken in name order, which is unit order), so scoring a unit again rewrites only the compacted
files whose ``unit`` bounds include it; Z-ordering by score spreads every unit over every file of a band,
which makes filters on score skip more files and a rescore rewrite many.

Vacuum deletes the files no table version within the retention reads: a rescored unit's earlier files,
files optimize replaced, and the files of a run stopped before its commit.

Both hold the output's lease, so that no running job commits meanwhile and none of its files-about-to-be-
committed are deleted. A run compacts on its own, under its own lease, when its commits leave the data table
with many small files (:func:`compact_when_fragmented`): a reader's cost of opening the table follows its
file count, which per-unit commits would otherwise grow without bound.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import schema as S
from pipeline.config import DEFAULT_COMPACT_AT
from pipeline.errors import InputError
from pipeline.io import units
from pipeline.io.delta import open_table
from pipeline.io.lease import Lease

log = logging.getLogger(__name__)

DEFAULT_RETENTION_HOURS = 168  # Delta's own default: a week of time travel
DEFAULT_TARGET_SIZE_MB = 256


@dataclass(frozen=True)
class Optimized:
    files_removed: int
    files_added: int
    unit_files_removed: int
    unit_files_added: int
    zorder_by: tuple[str, ...]
    data_version: int


@dataclass(frozen=True)
class Vacuumed:
    data_files: list[str]
    unit_files: list[str]
    dry_run: bool


def _data_table(output: str, storage_options: Mapping[str, Any] | None, verb: str):
    units.refuse_earlier_layout(output, storage_options)
    data = open_table(output, storage_options)
    if data is None:
        raise InputError(f"no Delta table under {output}: nothing to {verb}")
    return data


def optimize(output: str, target_size_mb: int = DEFAULT_TARGET_SIZE_MB, zorder_by: Sequence[str] = (),
             storage_options: Mapping[str, Any] | None = None, run_id: str = "optimize") -> Optimized:
    if target_size_mb <= 0:
        raise InputError(f"target size must be at least 1 MB, got {target_size_mb}")
    data = _data_table(output, storage_options, "optimize")
    columns = {field.name for field in data.schema().fields}
    unknown = [name for name in zorder_by if name not in columns]
    if unknown:
        raise InputError(f"cannot Z-order by {', '.join(unknown)}: not a column of {output} "
                         f"(for example {S.AESTHETIC_SCORE})")
    with Lease(output, run_id, storage_options=storage_options):
        return _compact(data, output, target_size_mb, zorder_by, storage_options)


def compact_when_fragmented(output: str, storage_options: Mapping[str, Any] | None = None,
                            at: int = DEFAULT_COMPACT_AT,
                            target_size_mb: int = DEFAULT_TARGET_SIZE_MB) -> Optimized | None:
    """Compact the output's tables as :func:`optimize` does when the data table holds ``at`` or more files
    under the target size (``at`` 0: never); None when it did not. The caller holds the output's lease."""
    data = open_table(output, storage_options)
    if at <= 0 or data is None:
        return None
    sizes = pa.table(data.get_add_actions(flatten=True))["size_bytes"]
    small = pc.sum(pc.less(sizes, target_size_mb * 1024 * 1024)).as_py() or 0
    if small < at:
        return None
    return _compact(data, output, target_size_mb, (), storage_options)


class CompactionsDuringRun:
    """A run's compactions: one each time ``at`` more data files were committed and the table then holds ``at``
    small ones, so a long first run does not leave readers a file per unit and band until its end."""

    def __init__(self, output: str, storage_options: Mapping[str, Any] | None, at: int):
        self.output, self.storage_options, self.at = output, storage_options, at
        self.done: list[Optimized] = []
        self._looked_at = 0  # files_committed when the table was last looked at
        self._busy = threading.Lock()

    def after_commit(self, committer: Any) -> None:
        """Called after each unit's commit, from any commit thread; one compaction at a time, others go on."""
        if self.at <= 0 or committer.files_committed - self._looked_at < self.at or not self._busy.acquire(False):
            return
        try:
            self._looked_at = committer.files_committed
            done = committer.exclusively(lambda: compact_when_fragmented(self.output, self.storage_options, self.at))
            if done is not None:
                self.done.append(done)
        except Exception as error:  # noqa: BLE001 - the unit is committed; the run's last look tries again
            log.warning("%s: compacting while committing failed, left for the run's end: %s", self.output, error)
        finally:
            self._busy.release()

    def at_end(self) -> Optimized | None:
        """The run's last look, once every commit is in; what it compacted."""
        done = compact_when_fragmented(self.output, self.storage_options, self.at)
        if done is not None:
            self.done.append(done)
        return done


def _compact(data: Any, output: str, target_size_mb: int, zorder_by: Sequence[str],
             storage_options: Mapping[str, Any] | None) -> Optimized:
    data.update_incremental()
    target = target_size_mb * 1024 * 1024
    metrics = (data.optimize.z_order(list(zorder_by), target_size=target) if zorder_by
               else data.optimize.compact(target_size=target))
    data.update_incremental()
    data.create_checkpoint()
    unit_table = open_table(units.units_uri(output), storage_options)
    unit_metrics = {"numFilesRemoved": 0, "numFilesAdded": 0}
    if unit_table is not None:
        unit_metrics = unit_table.optimize.compact()
        unit_table.update_incremental()
        unit_table.create_checkpoint()
    return Optimized(int(metrics["numFilesRemoved"]), int(metrics["numFilesAdded"]),
                     int(unit_metrics["numFilesRemoved"]), int(unit_metrics["numFilesAdded"]),
                     tuple(zorder_by), data.version())


def vacuum(output: str, retention_hours: int = DEFAULT_RETENTION_HOURS, dry_run: bool = False,
           storage_options: Mapping[str, Any] | None = None, run_id: str = "vacuum") -> Vacuumed:
    if retention_hours < 0:
        raise InputError(f"retention must be 0 hours or more, got {retention_hours}")
    data = _data_table(output, storage_options, "vacuum")
    with Lease(output, run_id, storage_options=storage_options):
        options = dict(retention_hours=retention_hours, dry_run=dry_run, enforce_retention_duration=False, full=True)
        removed = data.vacuum(**options)
        unit_table = open_table(units.units_uri(output), storage_options)
        unit_removed = unit_table.vacuum(**options) if unit_table is not None else []
    return Vacuumed(sorted(removed), sorted(unit_removed), dry_run)
