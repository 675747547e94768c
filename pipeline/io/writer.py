"""Write scored rows: staging parts as batches arrive, then one atomic commit per unit.

A unit's commit writes one file per score band, rows sorted by score, named by unit and version (a retry
writes the same names), and hands them to :class:`pipeline.io.commits.UnitCommitter`, whose one Delta
transaction makes them the unit's rows. Rows are deduplicated on (shard, key) first, so a batch that Ray
retried after a worker died cannot count twice.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections import Counter
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import bands
from pipeline import schema as S
from pipeline.io import layout
from pipeline.io.commits import DataFile, UnitCommitter, data_file_name
from pipeline.io.delta import delta_compatible, file_stats
from pipeline.io.storage import filesystem, join

log = logging.getLogger(__name__)

_DROPPED = {S.IMAGE, S.PIXELS}
_BASE = {f.name: f for f in S.output_schema()}
# Staging keeps the per-shard row count for the completeness check; the committed files do not.
_STAGING_ONLY = pa.field(S.SHARD_ROWS, pa.int64())


class CommitError(RuntimeError):
    """A unit's rows do not add up; it stays uncommitted and a rerun redoes it."""


def _column(values: Any, field: pa.Field) -> pa.Array:
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        return values.cast(field.type) if values.type != field.type else values
    array = np.asarray(values)
    if pa.types.is_integer(field.type):
        if array.dtype.kind == "f":
            mask = ~np.isfinite(array)
            return pa.array(np.where(mask, 0, array).astype(np.int64), mask=mask).cast(field.type)
        if array.dtype.kind == "O":
            return pa.array([None if v is None or (isinstance(v, float) and math.isnan(v)) else int(v)
                             for v in array], type=field.type)
        return pa.array(array, type=field.type)
    if pa.types.is_string(field.type):
        if array.dtype.kind in "US":
            return pa.array(array.astype(str), type=field.type)
        return pa.array([None if v is None else (v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v))
                         for v in array], type=field.type)
    if pa.types.is_fixed_size_list(field.type):
        flat = np.ascontiguousarray(array, dtype=np.float16).reshape(-1)
        return pa.FixedSizeListArray.from_arrays(pa.array(flat, type=pa.float16()), field.type.list_size)
    return pa.array(array, type=field.type)


def _extra_field(name: str, values: Any) -> pa.Field:
    """The type of a column the output schema does not name (other heads, prompt scores, quality metrics,
    a stage's new column), from its values: numbers as float32, text as string, integers and flags as such."""
    array = np.asarray(values)
    if array.dtype.kind in "fc":
        return pa.field(name, pa.float32())
    if array.dtype.kind in "iu":
        return pa.field(name, pa.int64())
    if array.dtype.kind == "b":
        return pa.field(name, pa.bool_())
    if array.dtype.kind in "USO" and any(isinstance(v, (str, bytes)) for v in array.ravel()):
        return pa.field(name, pa.string())
    return pa.field(name, pa.float32())  # all None: a score column no row got


def to_output_table(batch: Mapping[str, Any], keep_shard_rows: bool = False) -> pa.Table:
    """A batch (numpy columns) as an Arrow table of the output schema; a column the schema does not name
    keeps its name, typed from its values (:func:`_extra_field`)."""
    batch = S.restore_null_text(dict(batch))
    fields = []
    for name, values in batch.items():
        if name in _DROPPED or (name == S.SHARD_ROWS and not keep_shard_rows):
            continue
        if name in _BASE:
            fields.append(_BASE[name])
        elif name == S.SHARD_ROWS:
            fields.append(_STAGING_ONLY)
        elif name == S.EMBEDDING:
            fields.append(pa.field(S.EMBEDDING, pa.list_(pa.float16(), int(np.asarray(values).shape[1]))))
        else:
            fields.append(_extra_field(name, values))
    order = {name: i for i, name in enumerate(_BASE)}
    # Known columns in schema order, extra scores after them by name, the wide embedding last.
    fields.sort(key=lambda f: (f.name == S.EMBEDDING, order.get(f.name, len(order)), f.name))
    return pa.table([_column(batch[f.name], f) for f in fields], schema=pa.schema(fields))


class WriteStaging:
    """Ray Data UDF: write each batch's rows into their units' staging folders; return one
    small stats row per (unit, shard) so the driver can tell when a unit is complete."""

    def __init__(self, output: str, run_id: str, storage_options: Mapping[str, Any] | None = None):
        self.output = output
        self.run_id = run_id
        self.storage_options = dict(storage_options or {})

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        table = to_output_table(batch, keep_shard_rows=True)
        fs, root = filesystem(self.output, self.storage_options)
        units = np.asarray(batch[S.UNIT]).astype(str)
        shards = np.asarray(batch[S.SHARD]).astype(str)
        shard_rows = np.asarray(batch[S.SHARD_ROWS]).astype(np.int64)
        stats: dict[str, list] = {S.UNIT: [], S.SHARD: [], "rows": [], S.SHARD_ROWS: []}
        for unit in np.unique(units):
            mask = units == unit
            folder = layout.staging_dir(root, self.run_id, str(unit))
            fs.makedirs(folder, exist_ok=True)
            pq.write_table(table.filter(pa.array(mask)), join(folder, f"{uuid.uuid4().hex}.parquet"), filesystem=fs)
            for shard in np.unique(shards[mask]):
                in_shard = mask & (shards == shard)
                stats[S.UNIT].append(str(unit))
                stats[S.SHARD].append(str(shard))
                stats["rows"].append(int(in_shard.sum()))
                stats[S.SHARD_ROWS].append(int(shard_rows[in_shard][0]))
        return {k: np.asarray(v) for k, v in stats.items()}


def score_summary(scores: np.ndarray) -> dict[str, Any]:
    """Counts at the LAION thresholds and a fixed histogram: all the cutoff table needs."""
    finite = scores[np.isfinite(scores)]
    edges = np.linspace(S.HIST_LOW, S.HIST_HIGH, S.HIST_BINS + 1)
    in_range = finite[(finite >= S.HIST_LOW) & (finite < S.HIST_HIGH)]
    counts, _ = np.histogram(in_range, bins=edges)
    return {
        "scored": int(finite.size),
        "counts_ge": {str(t): int((finite >= t).sum()) for t in S.LAION_THRESHOLDS},
        "histogram": {"low": S.HIST_LOW, "high": S.HIST_HIGH, "step": S.HIST_STEP,
                      "underflow": int((finite < S.HIST_LOW).sum()), "overflow": int((finite >= S.HIST_HIGH).sum()),
                      "counts": [int(c) for c in counts]},
        "min": float(finite.min()) if finite.size else None,
        "max": float(finite.max()) if finite.size else None,
        "mean": float(finite.mean()) if finite.size else None,
    }


def similarity_summary(values: np.ndarray) -> dict[str, Any]:
    """clip_similarity's distribution in a unit: rows with one, counts at LAION's cut-offs, a fixed histogram."""
    finite = values[np.isfinite(values)]
    bins = int(round((S.SIMILARITY_HIGH - S.SIMILARITY_LOW) / S.SIMILARITY_STEP))
    counts, _ = np.histogram(np.clip(finite, S.SIMILARITY_LOW, S.SIMILARITY_HIGH - 1e-9),
                             bins=np.linspace(S.SIMILARITY_LOW, S.SIMILARITY_HIGH, bins + 1))
    return {"count": int(finite.size), "counts_ge": {str(t): int((finite >= t).sum()) for t in S.SIMILARITY_THRESHOLDS},
            "histogram": {"low": S.SIMILARITY_LOW, "high": S.SIMILARITY_HIGH, "step": S.SIMILARITY_STEP,
                          "counts": [int(c) for c in counts]},
            "mean": float(finite.mean()) if finite.size else None}


def commit_unit(committer: UnitCommitter, run_id: str, unit_id: str, shard_versions: list[dict[str, Any]],
                identity: Mapping[str, Any], timings: Mapping[str, float]) -> dict[str, Any]:
    """Turn a unit's staging parts into committed files and its unit record. Returns the record."""
    started = time.time()
    fs, root = filesystem(committer.output, committer.storage_options)
    staging = layout.staging_dir(root, run_id, unit_id)
    parts = sorted(p for p in fs.find(staging) if p.endswith(".parquet")) if fs.exists(staging) else []
    if not parts:
        raise CommitError(f"unit {unit_id}: no staged rows")
    table = pa.concat_tables([pq.read_table(p, filesystem=fs) for p in parts], promote_options="permissive")

    # Dedupe on (shard, key): a retried batch may have staged its rows twice.
    pairs = [f"{s}\x00{k}" for s, k in zip(table[S.SHARD].to_pylist(), table[S.KEY].to_pylist())]
    _, first = np.unique(np.asarray(pairs, dtype=object), return_index=True)
    duplicates = table.num_rows - len(first)
    table = table.take(pa.array(np.sort(first)))

    rows_by_shard = Counter(table[S.SHARD].to_pylist())
    expected = dict(zip(table[S.SHARD].to_pylist(), table[S.SHARD_ROWS].to_pylist()))
    shard_names = [v["name"] for v in shard_versions]
    problems = [f"{name}: {rows_by_shard.get(name, 0)} rows, read stage emitted {expected.get(name)}"
                for name in shard_names if expected.get(name) is None or rows_by_shard.get(name) != expected[name]]
    if problems:
        raise CommitError(f"unit {unit_id} does not balance: " + "; ".join(problems))
    storage_errors = pc.sum(pc.equal(table[S.STATUS], S.Status.STORAGE_ERROR.value)).as_py() or 0
    if storage_errors:
        raise CommitError(f"unit {unit_id}: {storage_errors} shard(s) unreadable from storage; left for the next run")
    table = delta_compatible(table.drop_columns([S.SHARD_ROWS]))

    scores = table[S.AESTHETIC_SCORE].to_numpy(zero_copy_only=False).astype(np.float64)
    order = np.argsort(np.where(np.isfinite(scores), -scores, np.inf), kind="stable")
    table, scores = table.take(pa.array(order)), scores[order]
    labels = bands.bands_of(scores)

    version = committer.next_version(unit_id)
    files = []
    for band in bands.ALL:
        rows = np.flatnonzero(labels == band)
        if rows.size == 0:
            continue
        name = data_file_name(unit_id, version, band)
        path = join(root, name)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        part = table.take(pa.array(rows))
        pq.write_table(part, path, filesystem=fs, row_group_size=8192, compression="zstd")
        files.append(DataFile(name, band, int(rows.size), int(fs.size(path)), file_stats(part)))

    statuses = table[S.STATUS].to_pylist()
    shards = []
    for version_info in shard_versions:
        mask = pc.equal(table[S.SHARD], version_info["name"])
        shard_statuses = Counter(pc.filter(table[S.STATUS], mask).to_pylist())
        failed = pc.and_(mask, pc.is_in(table[S.STATUS], pa.array([S.Status.SHARD_ERROR.value])))
        errors = sorted({e for e in pc.filter(table[S.ERROR], failed).to_pylist() if e})[:5]
        shards.append({**version_info, "rows": rows_by_shard[version_info["name"]],
                       "counts_by_status": dict(shard_statuses), **({"shard_errors": errors} if errors else {})})
    record = {
        "unit": unit_id,
        "run_id": run_id,
        "committed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "shards": shards,
        "rows": table.num_rows,
        "counts_by_status": dict(Counter(statuses)),
        "duplicate_rows_dropped": int(duplicates),
        "score": score_summary(scores),
        **({"clip_similarity": similarity_summary(table[S.CLIP_SIMILARITY].to_numpy(zero_copy_only=False)
                                                  .astype(np.float64))}
           if S.CLIP_SIMILARITY in table.column_names else {}),
        "files": [{"path": f.path, "band": f.band, "rows": f.rows} for f in files],
        "model": sorted({m for m in table[S.MODEL].to_pylist() if m}),
        "head": sorted({h for h in table[S.HEAD].to_pylist() if h}),
        **identity,
    }
    record["timings"] = {**timings, "commit_s": round(time.time() - started, 3)}
    committer.commit(unit_id, version, files, table.schema, record)
    fs.rm(staging, recursive=True)
    return record
