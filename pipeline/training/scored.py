"""Read what a scoring job wrote, and line it up with labels.

``source`` is an output prefix of the scoring job (only committed units are read: the Delta table lists their
files), or any Parquet file or folder with the same columns (a folder is read with Hive partitioning, skipping
``_``-prefixed names). Only the columns asked for are read; only rows with status ``ok`` are kept.
"""

from __future__ import annotations

import logging
import pathlib
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from pipeline import schema
from pipeline.config import ConfigError
from pipeline.io.delta import committed_files, embeddings_of
from pipeline.io.storage import filesystem
from pipeline.training.labels import LabelTable

log = logging.getLogger(__name__)

JOIN_KEY = "key"
JOIN_URL_STEM = "url_stem"  # the url's file name without extension: AVA images are named <image_id>.jpg


class ScoredDataError(ConfigError):
    """The scored data lacks what was asked for (no rows, no embeddings, a missing column)."""


def data_files(source: str, storage_options: Mapping[str, Any] | None) -> tuple[Any, list[str]]:
    """The source's filesystem and its Parquet files' paths in it: a file, the committed units' files (from the
    Delta table), or every Parquet file under a folder."""
    fs, root = filesystem(source, storage_options)
    if fs.isfile(root):
        return fs, [root]
    files = committed_files(source, storage_options)
    if files:
        return fs, [filesystem(uri, storage_options)[1] for uri in files]
    dataset = ds.dataset(root, filesystem=fs, format="parquet", partitioning="hive")
    return fs, list(dataset.files)


def column_names(source: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Every column in the source's files (schemas only, no data), in first-seen order."""
    fs, files = data_files(source, storage_options)
    names: dict[str, None] = {}
    for path in files:
        names.update(dict.fromkeys(pq.read_schema(path, filesystem=fs).names))
    return list(names)


def read_scored(source: str, columns: Sequence[str], storage_options: Mapping[str, Any] | None = None,
                optional: Sequence[str] = ()) -> pa.Table:
    """The ``ok`` rows of ``source`` with ``columns`` (key and status are always read), and ``optional`` columns
    where they exist. Files whose schemas differ (units scored with other heads) are concatenated with missing
    columns as nulls."""
    wanted = list(dict.fromkeys([schema.KEY, schema.STATUS, *columns, *optional]))
    fs, files = data_files(source, storage_options)
    if not files:
        raise ScoredDataError(f"{source}: no Parquet files (no committed units, and no .parquet under it)")
    tables = []
    for path in files:
        present = set(pq.read_schema(path, filesystem=fs).names)
        table = pq.read_table(path, columns=[c for c in wanted if c in present], filesystem=fs)
        if schema.STATUS in present:
            table = table.filter(pc.equal(table[schema.STATUS], schema.Status.OK.value))
        tables.append(table)
    table = pa.concat_tables(tables, promote_options="default")
    missing = [c for c in wanted if c not in table.column_names and c != schema.STATUS and c not in optional]
    if missing:
        raise ScoredDataError(f"{source}: no column(s) {missing}; it has {table.column_names}"
                              + ("; score with --write-embeddings to keep embeddings" if schema.EMBEDDING in missing
                                 else ""))
    return table


def embedding_matrix(table: pa.Table) -> np.ndarray:
    """The ``embedding`` column (as stored, ``list<float>``, or staged, fixed-size float16) as (N, D) float32."""
    column = table[schema.EMBEDDING].combine_chunks()
    if column.null_count:
        raise ScoredDataError(f"{column.null_count} rows have no embedding")
    if not is_embedding_type(column.type):
        raise ScoredDataError(f"embedding column has type {column.type}, expected a list of floats")
    return embeddings_of(column)


def embedding_width(fs: Any, files: Sequence[str]) -> int:
    """The embedding width, from the first row of the first file that has one."""
    for path in files:
        column = pq.read_table(path, filesystem=fs, columns=[schema.EMBEDDING])[schema.EMBEDDING]
        if len(column):
            return embeddings_of(column.slice(0, 1)).shape[1]
    raise ScoredDataError("no row has an embedding")


def is_embedding_type(kind: pa.DataType) -> bool:
    return (pa.types.is_fixed_size_list(kind) or pa.types.is_list(kind)) and pa.types.is_floating(kind.value_type)


def url_stem(url: str | None) -> str | None:
    if not url:
        return None
    return pathlib.PurePosixPath(url.split("?", 1)[0].split("#", 1)[0]).stem


def join_keys(table: pa.Table, join_on: str) -> np.ndarray:
    """The value each scored row is matched to labels by: the key, the url's file stem, or any column."""
    if join_on == JOIN_URL_STEM:
        if schema.URL not in table.column_names:
            raise ScoredDataError("joining on url_stem needs the url column")
        return np.asarray([url_stem(u) for u in table[schema.URL].to_pylist()], dtype=object)
    if join_on not in table.column_names:
        raise ScoredDataError(f"no column {join_on!r} to join labels on; have {table.column_names}")
    return np.asarray([None if v is None else str(v) for v in table[join_on].to_pylist()], dtype=object)


def join_columns(join_on: str) -> list[str]:
    """Scored columns needed to compute :func:`join_keys`."""
    return [schema.URL] if join_on == JOIN_URL_STEM else [join_on]


@dataclass(frozen=True, eq=False)
class Aligned:
    """Scored rows matched to labels: ``rows`` index the scored table, ``labels`` index the label table."""

    rows: np.ndarray
    labels: np.ndarray
    unlabelled_rows: np.ndarray  # scored rows without a label (candidates for labelling)
    unmatched_labels: int  # labels whose image is not among the scored ok rows


def align(scored_keys: np.ndarray, labels: LabelTable) -> Aligned:
    """Match scored rows to labels by key (a key scored twice, e.g. in two shards, keeps its first row)."""
    label_index = pd.Index(labels.keys)
    positions = label_index.get_indexer(pd.Index(scored_keys))
    first_seen = ~pd.Series(scored_keys).duplicated().to_numpy()
    matched = (positions >= 0) & first_seen
    rows = np.flatnonzero(matched)
    unlabelled = np.flatnonzero((positions < 0) & first_seen & pd.notna(scored_keys))
    unmatched = len(labels) - len(rows)
    if unmatched:
        log.info("%d of %d labels have no scored ok row", unmatched, len(labels))
    return Aligned(rows, positions[rows], unlabelled, unmatched)
