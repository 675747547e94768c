"""The output prefix as Delta Lake tables, through delta-rs: how to reach them and keep their schema.

An output prefix holds two tables: the scored rows at the prefix itself (Hive-partitioned by score band),
and the unit table at ``<prefix>/_units`` (:mod:`pipeline.io.units`). A Delta table's log, not a listing of
its folder, says which Parquet files are committed: every engine with a Delta reader (Polars, pandas and
pyarrow through ``deltalake``, DuckDB, Ray Data, Spark, Trino) sees the committed rows and nothing else.

Delta has no half-precision float and no fixed-size list, so the optional embedding column is stored as
``list<float>``: float32 values that are exactly the float16 embedding (zstd takes most of the difference
back: the low mantissa bits are all zero). Every engine reads it as a float array.
"""

from __future__ import annotations

import bisect
import math
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import bands
from pipeline import schema as S
from pipeline.io.storage import s3_options

EMBEDDING_TYPE = pa.list_(pa.float32())


def table_uri(uri: str) -> str:
    """``uri`` as delta-rs takes it: an absolute local path, or an object-store URI (s3a:// as s3://)."""
    if "://" not in uri:
        return os.path.abspath(os.path.expanduser(uri))
    if uri.startswith("file://"):
        return os.path.abspath(uri[len("file://"):])
    return "s3://" + uri[len("s3a://"):] if uri.startswith("s3a://") else uri


def storage_options_for(uri: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The job's fsspec options (and AWS_* environment) as delta-rs's object-store options.

    Credentials still come from the environment or the node's role, which delta-rs reads itself."""
    if not uri.startswith(("s3://", "s3a://")):
        return {}
    options = s3_options(storage_options or {})
    client = options.get("client_kwargs") or {}
    out: dict[str, str] = {}
    endpoint = options.get("endpoint_url") or client.get("endpoint_url")
    if endpoint:
        out["AWS_ENDPOINT_URL"] = str(endpoint)
        if str(endpoint).startswith("http://"):
            out["AWS_ALLOW_HTTP"] = "true"
    region = client.get("region_name") or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        out["AWS_REGION"] = str(region)
    if options.get("anon"):
        out["AWS_SKIP_SIGNATURE"] = "true"
    for ours, theirs in (("key", "AWS_ACCESS_KEY_ID"), ("secret", "AWS_SECRET_ACCESS_KEY"),
                         ("token", "AWS_SESSION_TOKEN")):
        if options.get(ours):  # only tests pass these; a job's config refuses credentials
            out[theirs] = str(options[ours])
    return out


def open_table(uri: str, storage_options: Mapping[str, Any] | None = None):
    """The Delta table at ``uri``, or None when there is none yet."""
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    # Not DeltaTable.is_deltatable: it keeps the GIL while it waits on storage, stalling every other thread.
    try:
        return DeltaTable(table_uri(uri), storage_options=storage_options_for(uri, storage_options))
    except TableNotFoundError:
        return None


STATS_STRING_PREFIX = 64  # delta-rs's own cut: longer strings keep a prefix, a cut maximum is rounded up


def file_stats(table: pa.Table) -> dict[str, Any]:
    """The Delta statistics of a data file holding ``table``: its row count, and the null count and bounds of
    every column that has an order.

    Every such column, not a chosen few: delta-rs's pyarrow dataset reads a column missing from a file's
    bounds as all null, and drops the file from any filter on that column."""
    mins: dict[str, Any] = {}
    maxs: dict[str, Any] = {}
    nulls: dict[str, int] = {}
    for field in table.schema:
        column = table[field.name]
        nulls[field.name] = column.null_count
        if pa.types.is_nested(field.type):
            continue
        low, high = pc.min_max(column).values()
        low, high = low.as_py(), high.as_py()
        if low is None or (isinstance(low, float) and (math.isnan(low) or math.isnan(high))):
            continue  # all null: no bounds is what delta-rs reads as all null, and it is
        if isinstance(low, str):
            low, high = low[:STATS_STRING_PREFIX], _rounded_up_prefix(high)
        mins[field.name], maxs[field.name] = low, high
    return {"numRecords": table.num_rows, "minValues": mins, "maxValues": maxs, "nullCount": nulls}


def _rounded_up_prefix(text: str) -> str:
    """A string of at most STATS_STRING_PREFIX characters that sorts at or after ``text``."""
    if len(text) <= STATS_STRING_PREFIX:
        return text
    cut = STATS_STRING_PREFIX - 1
    for i in range(cut, -1, -1):  # the last character that can be raised; a raised one ends the bound
        code = ord(text[i]) + 1
        if 0xD800 <= code <= 0xDFFF:
            code = 0xE000
        if code <= 0x10FFFF:
            return text[:i] + chr(code)
    return text


@dataclass(frozen=True)
class SnapshotFile:
    """A data file of a snapshot, as its add action describes it."""

    path: str  # relative to the table's root
    band: str | None
    rows: int
    lowest_unit: str | None  # the range of units the file's statistics give (None: no statistics)
    highest_unit: str | None

    def may_hold(self, sorted_units: Sequence[str]) -> bool:
        """Whether rows of any of ``sorted_units`` can be in the file (a file without bounds may hold any)."""
        if self.lowest_unit is None or self.highest_unit is None:
            return bool(sorted_units)
        first = bisect.bisect_left(sorted_units, self.lowest_unit)
        return first < len(sorted_units) and sorted_units[first] <= self.highest_unit


def snapshot_files(table: Any) -> list[SnapshotFile]:
    """The data files of the Delta table's snapshot, read from its add actions alone (no file is opened)."""
    actions = pa.table(table.get_add_actions(flatten=True))
    count = actions.num_rows

    def column(name: str) -> list[Any]:
        return actions[name].to_pylist() if name in actions.column_names else [None] * count

    return [SnapshotFile(path, band, int(rows or 0), low, high) for path, band, rows, low, high in zip(
        column("path"), column(f"partition.{bands.COLUMN}"), column("num_records"),
        column(f"min.{S.UNIT}"), column(f"max.{S.UNIT}"))]


def committed_files(output: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """URIs of the data files in the output's current snapshot (none before the first commit)."""
    table = open_table(output, storage_options)
    return [] if table is None else sorted(table.file_uris())


def delta_compatible(table: pa.Table) -> pa.Table:
    """``table`` with the embedding column as ``list<float>`` (Delta has no float16 and no fixed-size list)."""
    if S.EMBEDDING not in table.column_names:
        return table
    index = table.column_names.index(S.EMBEDDING)
    column = table[S.EMBEDDING]
    if not pa.types.is_fixed_size_list(column.type):
        return table
    return table.set_column(index, pa.field(S.EMBEDDING, EMBEDDING_TYPE), column.cast(EMBEDDING_TYPE))


def embeddings_of(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """(N, D) float32 from an embedding column, as stored (``list<float>``) or as staged (fixed-size float16)."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if len(array) == 0:
        return np.zeros((0, 0), dtype=np.float32)
    width = array.type.list_size if pa.types.is_fixed_size_list(array.type) else len(array[0])
    return array.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, width)


def add_missing_columns(table: Any, schema: pa.Schema) -> None:
    """Widen the Delta table's schema by the columns of ``schema`` it lacks (another head, prompt scores,
    embeddings); a column it has with another type is refused, not cast."""
    from deltalake import Field, Schema

    have = {field.name: field for field in table.schema().fields}
    wanted = Schema.from_arrow(schema).fields
    conflicts = [f"{f.name}: table {have[f.name].type}, new {f.type}" for f in wanted
                 if f.name in have and str(have[f.name].type) != str(f.type)]
    if conflicts:
        raise ValueError(f"columns change type, which the table cannot take: {'; '.join(conflicts)}")
    missing = [Field(f.name, f.type, nullable=True) for f in wanted if f.name not in have]
    if missing:
        table.alter.add_columns(missing)
