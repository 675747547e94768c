"""`aesthetics vacuum`: delete the files an output's snapshots no longer need.

A unit scored again leaves its earlier files behind (earlier table versions still read them), and a run
stopped before its commit leaves files no version lists. Vacuum deletes both once they are older than the
retention, from the data table and the unit table, holding the output's lease so that no running job's
files-about-to-be-committed are among them. Time travel reaches back as far as the retention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from pipeline.errors import InputError
from pipeline.io import units
from pipeline.io.delta import open_table
from pipeline.io.lease import Lease

DEFAULT_RETENTION_HOURS = 168  # Delta's own default: a week of time travel


@dataclass(frozen=True)
class Vacuumed:
    data_files: list[str]
    unit_files: list[str]
    dry_run: bool


def vacuum(output: str, retention_hours: int = DEFAULT_RETENTION_HOURS, dry_run: bool = False,
           storage_options: Mapping[str, Any] | None = None, run_id: str = "vacuum") -> Vacuumed:
    if retention_hours < 0:
        raise InputError(f"retention must be 0 hours or more, got {retention_hours}")
    units.refuse_earlier_layout(output, storage_options)
    data = open_table(output, storage_options)
    if data is None:
        raise InputError(f"no Delta table under {output}: nothing to vacuum")
    with Lease(output, run_id, storage_options=storage_options):
        options = dict(retention_hours=retention_hours, dry_run=dry_run, enforce_retention_duration=False, full=True)
        removed = data.vacuum(**options)
        unit_table = open_table(units.units_uri(output), storage_options)
        unit_removed = unit_table.vacuum(**options) if unit_table is not None else []
    return Vacuumed(sorted(removed), sorted(unit_removed), dry_run)
