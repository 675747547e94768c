"""The unit table: one row per unit commit, the facts every command reads instead of the data.

A Delta table at ``<output>/_units``, appended once per unit commit. A unit scored again (new shards, or
rescored with another model) gets a new row with a higher ``unit_version``; the unit's current facts are
its row with the highest one. Scalar facts are columns any engine can query (rows, scored, counts,
model key, precision, timings); ``record`` holds the whole record as JSON, the shape our commands read:
shards with sizes and ETags, counts by status, the score histogram and threshold counts, the unit's
files, model and head identity.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import InputError
from pipeline.io.delta import open_table, storage_options_for, table_uri
from pipeline.io.storage import filesystem, join

FOLDER = "_units"
EARLIER_MANIFESTS = "_manifests"  # the layout before the Delta tables: one JSON manifest per unit


class EarlierLayout(InputError):
    """An output written before its units lived in Delta tables."""


def refuse_earlier_layout(output: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Raise :class:`EarlierLayout` for an output in the manifest layout, which no reader here understands."""
    fs, root = filesystem(output, storage_options)
    if fs.exists(join(root, EARLIER_MANIFESTS)) and not fs.exists(join(root, "_delta_log")):
        raise EarlierLayout(f"{output} holds scores in the earlier layout (one JSON manifest per unit under "
                            f"{EARLIER_MANIFESTS}/), not Delta tables; convert it once with `aesthetics migrate "
                            f"{output}`")

SCHEMA = pa.schema([
    pa.field("unit", pa.string(), nullable=False),
    pa.field("unit_version", pa.int64(), nullable=False),
    pa.field("data_version", pa.int64(), nullable=False),  # the data table's version that holds this commit
    pa.field("run_id", pa.string()),
    pa.field("committed_at", pa.timestamp("us", tz="UTC")),
    pa.field("model_key", pa.string()),
    pa.field("tiny_random", pa.bool_()),
    pa.field("precision", pa.string()),
    pa.field("shards_per_unit", pa.int64()),
    pa.field("shards", pa.int64()),
    pa.field("rows", pa.int64()),
    pa.field("scored", pa.int64()),
    pa.field("counts_by_status", pa.map_(pa.string(), pa.int64())),
    pa.field("counts_ge", pa.map_(pa.string(), pa.int64())),
    # What planning compares with a fresh listing: each shard's name, size and ETag.
    pa.field("shard_versions", pa.list_(pa.struct([("name", pa.string()), ("size", pa.int64()),
                                                   ("etag", pa.string())]))),
    pa.field("record", pa.string(), nullable=False),
])

# The columns planning and status read (Committed), and those read_facts gives: never the JSON record.
PLANNING = ["unit", "model_key", "shards_per_unit", "rows", "shard_versions"]
FACTS = ["unit", "model_key", "tiny_random", "shards_per_unit", "rows", "scored", "counts_by_status", "counts_ge",
         "shard_versions"]


def units_uri(output: str) -> str:
    return join(output, FOLDER)


def to_row(record: Mapping[str, Any], unit_version: int, data_version: int) -> dict[str, Any]:
    """A unit record as a row of :data:`SCHEMA`."""
    committed = record.get("committed_at")
    return {
        "unit": record["unit"], "unit_version": unit_version, "data_version": data_version,
        "run_id": record.get("run_id"),
        "committed_at": _utc(committed) if committed else None,
        "model_key": record.get("model_key"), "tiny_random": bool(record.get("tiny_random")),
        "precision": record.get("precision"), "shards_per_unit": record.get("shards_per_unit"),
        "shards": len(record.get("shards", [])), "rows": record.get("rows"),
        "scored": record.get("score", {}).get("scored"),
        "counts_by_status": list(record.get("counts_by_status", {}).items()),
        "counts_ge": list(record.get("score", {}).get("counts_ge", {}).items()),
        "shard_versions": [{"name": v.get("name"), "size": v.get("size"),
                            "etag": None if v.get("etag") is None else str(v.get("etag"))}
                           for v in record.get("shards", [])],
        "record": json.dumps(record, sort_keys=True, default=str),
    }


def _utc(text: str) -> datetime.datetime:
    return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)


def append(output: str, rows: Iterable[Mapping[str, Any]], storage_options: Mapping[str, Any] | None = None,
           app_transactions: Iterable[tuple[str, int]] = ()) -> None:
    """Append unit rows in one commit, carrying an app transaction (unit, version) for each."""
    from deltalake import CommitProperties, Transaction, write_deltalake

    table = pa.Table.from_pylist(list(rows), schema=SCHEMA)
    uri = units_uri(output)
    write_deltalake(table_uri(uri), table, mode="append", storage_options=storage_options_for(uri, storage_options),
                    commit_properties=CommitProperties(
                        app_transactions=[Transaction(app_id, version) for app_id, version in app_transactions]))


def read_table(output: str, storage_options: Mapping[str, Any] | None = None,
               columns: list[str] | None = None) -> pa.Table:
    """Every unit's current row (the highest ``unit_version``), as an Arrow table."""
    table = open_table(units_uri(output), storage_options)
    if table is None:
        refuse_earlier_layout(output, storage_options)  # only an output without a unit table can be one
        return SCHEMA.empty_table() if columns is None else SCHEMA.empty_table().select(columns)
    wanted = None if columns is None else sorted(set(columns) | {"unit", "unit_version"})
    rows = table.to_pyarrow_table(columns=wanted)
    if rows.num_rows == 0:
        return rows
    order = pc.sort_indices(rows, sort_keys=[("unit", "ascending"), ("unit_version", "descending")])
    rows = rows.take(order)
    names = rows["unit"].to_numpy(zero_copy_only=False)
    first = np.ones(len(names), dtype=bool)
    first[1:] = names[1:] != names[:-1]  # each unit's highest version comes first
    current = rows.filter(pa.array(first))
    return current if columns is None else current.select(columns)


def read_units(output: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Every committed unit's current record, by unit id."""
    table = read_table(output, storage_options, columns=["unit", "record"])
    return {unit: json.loads(text) for unit, text in zip(table["unit"].to_pylist(), table["record"].to_pylist())}


def read_facts(output: str, storage_options: Mapping[str, Any] | None = None,
               shards: bool = True) -> dict[str, dict[str, Any]]:
    """Every committed unit's facts, by unit id, in the record's shape but without reading the JSON record:
    model_key, tiny_random, shards_per_unit, rows, counts_by_status, score (scored, counts_ge), and with
    ``shards`` the unit's work items (what planning compares; the cutoff table does without them)."""
    names = FACTS if shards else [name for name in FACTS if name != "shard_versions"]
    table = read_table(output, storage_options, columns=names)
    columns = {name: table[name].to_pylist() for name in names}
    facts = {}
    for i, unit in enumerate(columns["unit"]):
        facts[unit] = {
            "unit": unit, "model_key": columns["model_key"][i], "tiny_random": columns["tiny_random"][i],
            "shards_per_unit": columns["shards_per_unit"][i], "rows": columns["rows"][i],
            "counts_by_status": dict(columns["counts_by_status"][i] or []),
            "score": {"scored": columns["scored"][i], "counts_ge": dict(columns["counts_ge"][i] or [])},
        }
        if shards:
            facts[unit]["shards"] = columns["shard_versions"][i] or []
    return facts


@dataclass(frozen=True)
class Committed:
    """Every committed unit's current facts that planning reads, as Arrow: ``unit``, ``model_key``,
    ``shards_per_unit``, ``rows`` and ``shard_versions`` (each work item's name, size and ETag). LAION is 58,000
    units of 4 shards: planning compares these columns with the listing's instead of making a record per unit."""

    table: pa.Table

    @classmethod
    def read(cls, output: str, storage_options: Mapping[str, Any] | None = None) -> Committed:
        return cls(read_table(output, storage_options, columns=PLANNING))

    @classmethod
    def of_records(cls, records: Mapping[str, Mapping[str, Any]]) -> Committed:
        """Unit records by unit id, as the unit table would hold them."""
        rows = [to_row({**record, "unit": unit}, 1, 0) for unit, record in records.items()]
        return cls(pa.Table.from_pylist(rows, schema=SCHEMA).select(PLANNING))

    def items(self) -> pa.Table:
        """One row per committed work item: ``unit``, ``name``, ``size``, ``etag``."""
        versions = self.table["shard_versions"].combine_chunks()
        flat = pc.list_flatten(versions)
        return pa.table({"unit": self.table["unit"].combine_chunks().take(pc.list_parent_indices(versions)),
                         "name": flat.field("name"), "size": flat.field("size"), "etag": flat.field("etag")})

    def unit_of_item(self) -> dict[str, str]:
        """Committed work item name -> its unit."""
        items = self.items()
        return dict(zip(items["name"].to_pylist(), items["unit"].to_pylist()))

    def shards_per_unit(self) -> int | None:
        """The unit size the output was first scored with (it fixes unit membership for good); None: no unit."""
        sizes = pc.unique(self.table["shards_per_unit"].drop_null()).to_pylist()
        if len(sizes) > 1:
            raise RuntimeError(f"unit records disagree on shards_per_unit ({sorted(sizes)}): the output is "
                               f"inconsistent")
        return sizes[0] if sizes else None


def versions(output: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, tuple[int, int]]:
    """unit -> (unit_version, data_version) of its current row."""
    table = read_table(output, storage_options, columns=["unit", "unit_version", "data_version"])
    return {u: (int(v), int(d)) for u, v, d in zip(table["unit"].to_pylist(), table["unit_version"].to_pylist(),
                                                   table["data_version"].to_pylist())}


def last_data_version(output: str, storage_options: Mapping[str, Any] | None = None) -> int:
    """The highest data-table version any unit row records (-1: none)."""
    table = open_table(units_uri(output), storage_options)
    if table is None:
        return -1
    column = table.to_pyarrow_table(columns=["data_version"])["data_version"]
    return int(pc.max(column).as_py()) if len(column) else -1


def compact(output: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Rewrite the unit table's small files (a run appends one per unit) into few, so readers open few."""
    table = open_table(units_uri(output), storage_options)
    if table is not None:
        table.optimize.compact()
