"""`aesthetics status`: which units are done, pending or failed, by model version, and why.

Everything comes from the output prefix itself: the unit table says what is committed, the last run's
summary says what it tried and which units are still failing, and the last run's input is listed again to find
what is pending (from where the output's kept listing of it ended: pipeline.io.listing).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import pyarrow.compute as pc

from pipeline.config import InputConfig, ListingConfig
from pipeline.io import runs
from pipeline.io.listing import list_input_entries
from pipeline.io.units import Committed
from pipeline.planning import STALE, unit_verdicts
from pipeline.sources import list_input


@dataclass
class StatusReport:
    output: str
    committed_by_model: dict[str, int] = field(default_factory=dict)
    rows_by_model: dict[str, int] = field(default_factory=dict)
    pending: dict[str, str] = field(default_factory=dict)  # unit -> why
    failed: dict[str, str] = field(default_factory=dict)  # unit -> the last failure, not committed since
    last_run: dict[str, Any] | None = None
    input: list[str] = field(default_factory=list)
    listed: str = ""  # how the input was listed

    def to_text(self) -> str:
        lines = [f"output {self.output}"]
        for key, units in sorted(self.committed_by_model.items()):
            lines.append(f"  done     {units:6d} units  {self.rows_by_model[key]:10d} rows  model {key}")
        lines.append(f"  pending  {len(self.pending):6d} units" + (f"  (input {', '.join(self.input)})" if self.input else
                                                                 "  (no input known: pass --input)"))
        if self.listed:
            lines.append(f"    listed: {self.listed}")
        for unit, why in sorted(self.pending.items()):
            lines.append(f"    {unit}: {why}")
        lines.append(f"  failed   {len(self.failed):6d} units")
        for unit, why in sorted(self.failed.items()):
            lines.append(f"    {unit}: {why}")
        if self.last_run:
            lines.append(f"  last run {self.last_run['run_id']}: {len(self.last_run['units_committed'])} committed, "
                         f"{len(self.last_run['units_failed'])} failed, wall {self.last_run['wall_s']}s")
        return "\n".join(lines)


def unit_status(output: str, inputs: Sequence[str] | None = None, model_key: str | None = None,
                shards_per_unit: int | None = None, storage_options: Mapping[str, Any] | None = None,
                listing: ListingConfig = ListingConfig()) -> StatusReport:
    """What is done, pending and failed. The input is listed from where the output's kept listing ended, when
    that listing allows it (pipeline.io.listing); status never writes the kept listing."""
    committed = Committed.read(output, storage_options)
    last = runs.latest(output, storage_options)
    report = StatusReport(output=output, last_run=last, failed=runs.failing(last, output, storage_options))
    by_model = committed.table.group_by("model_key").aggregate([([], "count_all"), ("rows", "sum")])
    for key, units, rows in zip(by_model["model_key"].to_pylist(), by_model["count_all"].to_pylist(),
                                by_model["rows_sum"].to_pylist()):
        report.committed_by_model[key] = units
        report.rows_by_model[key] = rows or 0
    known = last or {}  # what the last run was given, for what this call is not
    report.input = list(inputs or known.get("input", []))
    key = model_key or known.get("model_key")
    if report.input:
        per_unit = shards_per_unit or committed.shards_per_unit() or known.get("shards_per_unit") or 4
        input_config = InputConfig(**(known.get("source") or {}))
        listed = list_input_entries(report.input, storage_options, output, listing)
        report.listed = listed.describe()
        source, items = list_input(report.input, storage_options, input_config, listed.listing)
        verdicts = unit_verdicts(source.plan_units(items, per_unit, committed).table, committed, key)
        verdicts = verdicts.filter(pc.is_valid(verdicts["reason"]))
        for unit, why in zip(verdicts["unit"].to_pylist(), verdicts["reason"].to_pylist()):
            report.pending[unit] = why + (" (needs --rescore)" if why.startswith(STALE) else "")
    return report
