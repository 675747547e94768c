"""The output prefix as Delta Lake tables, through delta-rs: how to reach them and keep their schema.

An output prefix holds two tables: the scored rows at the prefix itself (Hive-partitioned by score band),
and the unit table at ``<prefix>/_units`` (:mod:`pipeline.io.units`). A Delta table's log, not a listing of
its folder, says which Parquet files are committed: every engine with a Delta reader (Polars, pandas and
pyarrow through ``deltalake``, DuckDB, Ray Data, Spark, Trino) sees the committed rows and nothing else.

Delta has no half-precision float and no fixed-size list, so the optional fp16 embedding column is stored
as ``binary``: each value is the embedding's little-endian float16 bytes (``numpy.frombuffer(v, "<f2")``).
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np
import pyarrow as pa

from pipeline import schema as S
from pipeline.io.storage import s3_options

EMBEDDING_DTYPE = np.dtype("<f2")


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

    location = table_uri(uri)
    options = storage_options_for(uri, storage_options)
    if not DeltaTable.is_deltatable(location, storage_options=options):
        return None
    return DeltaTable(location, storage_options=options)


def delta_compatible(table: pa.Table) -> pa.Table:
    """``table`` with the embedding column as float16 bytes (Delta has no float16 and no fixed-size list)."""
    if S.EMBEDDING not in table.column_names:
        return table
    column = table[S.EMBEDDING]
    if pa.types.is_binary(column.type):
        return table
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    width = array.type.list_size
    values = array.flatten().to_numpy(zero_copy_only=False).astype(EMBEDDING_DTYPE).reshape(-1, width)
    data = pa.array([row.tobytes() for row in values], type=pa.binary())
    if array.null_count:
        data = pa.array([None if missing else value for missing, value in
                         zip(array.is_null().to_pylist(), data.to_pylist())], type=pa.binary())
    return table.set_column(table.column_names.index(S.EMBEDDING), S.EMBEDDING, data)


def embeddings_of(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """(N, D) float32 from an embedding column, stored (float16 bytes) or as written (fixed-size list)."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_binary(array.type) or pa.types.is_large_binary(array.type):
        if len(array) == 0:
            return np.zeros((0, 0), dtype=np.float32)
        return np.stack([np.frombuffer(v, dtype=EMBEDDING_DTYPE) for v in array.to_pylist()]).astype(np.float32)
    width = array.type.list_size
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
