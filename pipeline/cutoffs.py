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
from tabulate import tabulate

from pipeline import schema as S
from pipeline.io import layout
from pipeline.io.storage import filesystem, join, write_bytes_atomic, write_json_atomic
from pipeline.io.units import read_facts

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


def build_tables(records: Iterable[Mapping[str, Any]]) -> list[CutoffTable]:
    """One table per model identity found (a prefix mid-way through a rescore holds two)."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for record in records:
        groups.setdefault(record["model_key"], []).append(record)
    tables = []
    for model_key, group in sorted(groups.items()):
        scored = sum(m["score"]["scored"] for m in group)
        statuses: dict[str, int] = {}
        for m in group:
            for status, count in m["counts_by_status"].items():
                statuses[status] = statuses.get(status, 0) + count
        rows = []
        for threshold in S.LAION_THRESHOLDS:
            count = sum(m["score"]["counts_ge"][str(threshold)] for m in group)
            laion = LAION_PUBLISHED_COUNTS[threshold]
            rows.append(CutoffRow(threshold, count, count / scored if scored else None,
                                  laion, laion / LAION_2B_EN_SAMPLES))
        tables.append(CutoffTable(model_key, len(group), sum(m["rows"] for m in group), scored, statuses,
                                  tuple(rows), any(m.get("tiny_random") for m in group)))
    return tables


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
    tables = build_tables(read_facts(output, storage_options, shards=False).values())
    fs, root = filesystem(output, storage_options)
    write_json_atomic(fs, join(root, layout.CUTOFFS_JSON), {"tables": [t.to_json() for t in tables]})
    markdown = "\n".join(t.to_markdown() for t in tables) or "No committed units yet.\n"
    write_bytes_atomic(fs, join(root, layout.CUTOFFS_MD), markdown.encode())
    return tables
