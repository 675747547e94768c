"""The LAION-Aesthetics cutoff table: our counts per threshold beside the published ones.

Built from the unit table alone (each holds its unit's counts at every threshold), never by rescanning
the Parquet, so it costs the same for a thousand rows or two billion.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tabulate import tabulate

from pipeline import schema as S
from pipeline.io import layout
from pipeline.io.storage import filesystem, join, write_bytes_atomic, write_json_atomic
from pipeline.io.units import read_facts, read_table

# LAION blog "LAION-Aesthetics" (2022-08-16), V2 predictor over LAION-2B-en.
LAION_2B_EN_SAMPLES = 2_322_161_808
LAION_PUBLISHED_COUNTS = {4.5: 1_200_000_000, 4.75: 939_000_000, 5.0: 600_000_000,
                          6.0: 12_000_000, 6.25: 3_000_000, 6.5: 625_000}


@dataclass(frozen=True)
class CutoffRow:
    threshold: float
    count: int
    fraction: float | None
    laion_count: int
    laion_fraction: float


@dataclass(frozen=True)
class CutoffTable:
    model_key: str
    units: int
    rows: int
    scored: int
    counts_by_status: Mapping[str, int]
    rows_by_threshold: tuple[CutoffRow, ...]
    tiny_random: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "model_key": self.model_key, "units": self.units, "rows": self.rows, "scored": self.scored,
            "counts_by_status": dict(self.counts_by_status), "tiny_random": self.tiny_random,
            "laion_reference": {"dataset": "LAION-2B-en", "samples": LAION_2B_EN_SAMPLES},
            "thresholds": [row.__dict__ for row in self.rows_by_threshold],
        }

    def to_markdown(self) -> str:
        lines = []
        if self.tiny_random:
            lines.append("**WARNING: scored with the tiny random-weight model. These scores mean nothing.**\n")
        lines += [
            f"Model: `{self.model_key}` — {self.units} units, {self.rows} rows, {self.scored} scored "
            f"(fractions are of scored rows; LAION's are of all {LAION_2B_EN_SAMPLES:,} LAION-2B-en samples).",
            "",
            tabulate([(f"{row.threshold:g}", f"{row.count:,}",
                       f"{row.fraction:.4%}" if row.fraction is not None else "n/a",
                       f"{row.laion_count:,}", f"{row.laion_fraction:.4%}") for row in self.rows_by_threshold],
                     headers=["score ≥", "our count", "our fraction", "LAION count", "LAION fraction"],
                     tablefmt="pipe", disable_numparse=True, colalign=("right",) * 5),
        ]
        status = ", ".join(f"{k}: {v}" for k, v in sorted(self.counts_by_status.items()))
        lines += ["", f"Rows by status: {status}"]
        return "\n".join(lines) + "\n"


# The unit table's columns the cutoff table is built from (pipeline.io.units.SCHEMA).
FACT_COLUMNS = ["model_key", "tiny_random", "rows", "scored", "counts_by_status", "counts_ge"]


def facts_of(records: Iterable[Mapping[str, Any]]) -> pa.Table:
    """Unit records (or facts, pipeline.io.units.read_facts) as the unit table's columns :data:`FACT_COLUMNS`."""
    from pipeline.io.units import SCHEMA

    rows = [{"model_key": r["model_key"], "tiny_random": bool(r.get("tiny_random")), "rows": r["rows"],
             "scored": r["score"]["scored"], "counts_by_status": list(r["counts_by_status"].items()),
             "counts_ge": list(r["score"]["counts_ge"].items())} for r in records]
    return pa.Table.from_pylist(rows, schema=pa.schema([SCHEMA.field(name) for name in FACT_COLUMNS]))


def _map_sums(facts: pa.Table, column: str) -> dict[tuple[str, str], int]:
    """(model key, map key) -> the sum of that map entry over the units."""
    map_type = facts.schema.field(column).type
    maps = facts[column].combine_chunks().cast(pa.list_(pa.struct([("key", map_type.key_type),
                                                                     ("value", map_type.item_type)])))
    entries = pc.list_flatten(maps)
    summed = pa.table({"model_key": facts["model_key"].combine_chunks().take(pc.list_parent_indices(maps)),
                       "key": entries.field("key"), "value": entries.field("value")}
                      ).group_by(["model_key", "key"]).aggregate([("value", "sum")])
    return {(m, k): v for m, k, v in zip(summed["model_key"].to_pylist(), summed["key"].to_pylist(),
                                         summed["value_sum"].to_pylist())}


def tables_of(facts: pa.Table) -> list[CutoffTable]:
    """One table per model identity found (a prefix mid-way through a rescore holds two), from the unit table's
    columns :data:`FACT_COLUMNS`: sums over Arrow columns, the same for a thousand units or LAION's 58,000."""
    totals = facts.group_by("model_key").aggregate(
        [([], "count_all"), ("rows", "sum"), ("scored", "sum"), ("tiny_random", "any")])
    statuses, counts_ge = _map_sums(facts, "counts_by_status"), _map_sums(facts, "counts_ge")
    tables = []
    for total in sorted(totals.to_pylist(), key=lambda t: t["model_key"]):
        model_key, scored = total["model_key"], total["scored_sum"] or 0
        rows = []
        for threshold in S.LAION_THRESHOLDS:
            count = counts_ge.get((model_key, str(threshold)), 0)
            laion = LAION_PUBLISHED_COUNTS[threshold]
            rows.append(CutoffRow(threshold, count, count / scored if scored else None,
                                  laion, laion / LAION_2B_EN_SAMPLES))
        by_status = {status: count for (key, status), count in statuses.items() if key == model_key}
        tables.append(CutoffTable(model_key, total["count_all"], total["rows_sum"] or 0, scored, by_status,
                                  tuple(rows), bool(total["tiny_random_any"])))
    return tables


def build_tables(records: Iterable[Mapping[str, Any]]) -> list[CutoffTable]:
    """:func:`tables_of` for unit records (or facts)."""
    return tables_of(facts_of(records))


DUPLICATE = "duplicate"  # with --dedup: an ok row that is not its duplicate group's keeper


def without_duplicates(facts: Mapping[str, Mapping[str, Any]], duplicates: Iterable[Mapping[str, Any]]
                       ) -> list[dict[str, Any]]:
    """Unit facts with each duplicate (a row of ``aesthetics dedup``'s table that is not its group's keeper)
    moved from ``ok`` to ``duplicate`` and out of the score counts (and out of the score histogram, where
    the facts are whole records): the cutoff table of the keepers."""
    from pipeline.io.writer import score_summary

    adjusted = {unit: copy.deepcopy(dict(fact)) for unit, fact in facts.items()}
    for row in duplicates:
        fact = adjusted.get(row[S.UNIT])
        if fact is None:
            continue  # a unit committed since the dedup table was made is counted as it is
        statuses, score = fact["counts_by_status"], fact["score"]
        statuses[S.Status.OK.value] = statuses.get(S.Status.OK.value, 0) - 1
        statuses[DUPLICATE] = statuses.get(DUPLICATE, 0) + 1
        value = row.get(S.AESTHETIC_SCORE)
        if value is not None and math.isfinite(value):
            score["scored"] -= 1
            for threshold in S.LAION_THRESHOLDS:
                score["counts_ge"][str(threshold)] -= value >= threshold
            if "histogram" in score:  # the bin the writer counted it in: the same function places it
                own = score_summary(np.asarray([value], dtype=np.float32))["histogram"]
                histogram = score["histogram"]
                histogram["counts"] = [a - b for a, b in zip(histogram["counts"], own["counts"])]
                histogram["underflow"] -= own["underflow"]
                histogram["overflow"] -= own["overflow"]
    return list(adjusted.values())


def dedup_tables(output: str, storage_options: Mapping[str, Any] | None = None) -> list[CutoffTable]:
    """The cutoff tables of the keepers only (``cutoffs --dedup``), from the unit table and the dedup table."""
    from pipeline.dedup import duplicate_rows

    duplicates = duplicate_rows(output, storage_options).select([S.UNIT, S.AESTHETIC_SCORE]).to_pylist()
    return build_tables(without_duplicates(read_facts(output, storage_options, shards=False), duplicates))


def write_cutoffs(output: str, storage_options: Mapping[str, Any] | None = None) -> list[CutoffTable]:
    """Aggregate the committed records and write the cutoff table (JSON and Markdown) under the prefix."""
    tables = tables_of(read_table(output, storage_options, columns=FACT_COLUMNS))
    fs, root = filesystem(output, storage_options)
    write_json_atomic(fs, join(root, layout.CUTOFFS_JSON), {"tables": [t.to_json() for t in tables]})
    markdown = "\n".join(t.to_markdown() for t in tables) or "No committed units yet.\n"
    write_bytes_atomic(fs, join(root, layout.CUTOFFS_MD), markdown.encode())
    return tables
