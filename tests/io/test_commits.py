"""Unit commits into the output's Delta tables: visible at once to every reader, exactly once, and a crash
between the data commit and the unit-table commit is rolled forward."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import bands
from pipeline.io import units
from pipeline.io.commits import DataFile, UnitCommitter, data_file_name
from pipeline.io.delta import file_stats, open_table

SCHEMA = pa.schema([("key", pa.string()), ("unit", pa.string()), ("aesthetic_score", pa.float32())])


def _write(root: Path, unit: str, version: int, scores: list[float], schema: pa.Schema = SCHEMA) -> list[DataFile]:
    """The unit's rows as one file per band, as the writer lays them out."""
    files = []
    for band in bands.ALL:
        chosen = [s for s in scores if bands.band_of(s) == band]
        if not chosen:
            continue
        columns = {"key": [f"{unit}-{s}" for s in chosen], "unit": [unit] * len(chosen),
                   "aesthetic_score": pa.array(chosen, pa.float32())}
        for extra in schema.names[3:]:
            columns[extra] = pa.array([1.0] * len(chosen), pa.float32())
        path = data_file_name(unit, version, band)
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        table = pa.table(columns, schema=schema)
        pq.write_table(table, root / path)
        files.append(DataFile(path, band, len(chosen), os.path.getsize(root / path), file_stats(table)))
    return files


def _record(unit: str, scores: list[float]) -> dict:
    return {"unit": unit, "run_id": "r", "committed_at": "2026-12-01T00:00:00Z", "model_key": "m", "rows": len(scores),
            "counts_by_status": {"ok": len(scores)}, "score": {"scored": len(scores), "counts_ge": {}},
            "shards": [{"name": f"{unit}.tar"}]}


def _keys(output: Path) -> list[str]:
    return sorted(open_table(str(output)).to_pyarrow_table(columns=["key"])["key"].to_pylist())


def _commit(committer: UnitCommitter, root: Path, unit: str, scores: list[float], schema: pa.Schema = SCHEMA) -> int:
    version = committer.next_version(unit)
    return committer.commit(unit, version, _write(root, unit, version, scores, schema), schema, _record(unit, scores))


def test_a_committed_unit_is_what_every_engine_reads(tmp_path):
    import duckdb
    import polars as pl

    committer = UnitCommitter(str(tmp_path))
    _commit(committer, tmp_path, "u1", [4.0, 5.5, 6.7])
    expected = ["u1-4.0", "u1-5.5", "u1-6.7"]
    assert _keys(tmp_path) == expected
    assert sorted(pl.read_delta(str(tmp_path))["key"].to_list()) == expected
    dataset = open_table(str(tmp_path)).to_pyarrow_dataset()  # noqa: F841 - DuckDB reads it by name
    assert sorted(k for (k,) in duckdb.sql("SELECT key FROM dataset").fetchall()) == expected
    assert sorted(pl.read_delta(str(tmp_path)).filter(pl.col(bands.COLUMN) == "ge6.5")["key"]) == ["u1-6.7"]
    assert units.read_units(str(tmp_path))["u1"]["rows"] == 3


def test_a_new_version_replaces_the_units_rows_and_leaves_the_others(tmp_path):
    committer = UnitCommitter(str(tmp_path))
    _commit(committer, tmp_path, "u1", [4.0, 5.5])
    _commit(committer, tmp_path, "u2", [5.0])
    _commit(committer, tmp_path, "u1", [6.1])
    assert _keys(tmp_path) == ["u1-6.1", "u2-5.0"]
    assert units.versions(str(tmp_path)) == {"u1": (2, 2), "u2": (1, 1)}
    assert (tmp_path / data_file_name("u1", 1, "lt4.5")).exists(), "removed files stay for time travel and vacuum"
    old = open_table(str(tmp_path))
    old.load_as_version(1)
    assert sorted(old.to_pyarrow_table(columns=["key"])["key"].to_pylist()) == ["u1-4.0", "u1-5.5", "u2-5.0"]


def test_committing_the_same_version_again_changes_nothing(tmp_path):
    committer = UnitCommitter(str(tmp_path))
    version = committer.next_version("u1")
    files = _write(tmp_path, "u1", version, [5.5])
    first = committer.commit("u1", version, files, SCHEMA, _record("u1", [5.5]))
    again = UnitCommitter(str(tmp_path)).commit("u1", version, files, SCHEMA, _record("u1", [5.5]))
    assert again == first and _keys(tmp_path) == ["u1-5.5"]


def test_a_crash_between_the_data_and_the_unit_commit_is_rolled_forward(tmp_path, monkeypatch):
    committer = UnitCommitter(str(tmp_path))
    _commit(committer, tmp_path, "u1", [5.5])

    def crash(*args, **kwargs):
        raise SystemExit("driver killed after the data commit")

    monkeypatch.setattr(units, "append", crash)
    with pytest.raises(SystemExit):
        _commit(committer, tmp_path, "u2", [6.6])
    monkeypatch.undo()
    assert _keys(tmp_path) == ["u1-5.5", "u2-6.6"] and set(units.read_units(str(tmp_path))) == {"u1"}

    UnitCommitter(str(tmp_path))  # the next run's committer
    records = units.read_units(str(tmp_path))
    assert set(records) == {"u1", "u2"} and records["u2"]["rows"] == 1
    assert units.versions(str(tmp_path))["u2"] == (1, 1)  # unit version 1, in data version 1


def test_a_unit_with_more_columns_widens_the_table(tmp_path):
    committer = UnitCommitter(str(tmp_path))
    _commit(committer, tmp_path, "u1", [5.5])
    wider = SCHEMA.append(pa.field("score_other", pa.float32()))
    _commit(committer, tmp_path, "u2", [5.0], wider)
    table = open_table(str(tmp_path)).to_pyarrow_table()
    by_key = dict(zip(table["key"].to_pylist(), table["score_other"].to_pylist()))
    assert by_key == {"u1-5.5": None, "u2-5.0": 1.0}


def test_the_unit_table_holds_its_facts_as_columns_too(tmp_path):
    committer = UnitCommitter(str(tmp_path))
    _commit(committer, tmp_path, "u1", [5.5, 6.0])
    row = units.read_table(str(tmp_path)).to_pylist()[0]
    assert (row["unit"], row["rows"], row["model_key"], dict(row["counts_by_status"])) == ("u1", 2, "m", {"ok": 2})
    assert json.loads(row["record"])["shards"] == [{"name": "u1.tar"}]
    facts = units.read_facts(str(tmp_path))["u1"]  # what planning, status and cutoffs read: no JSON
    assert (facts["model_key"], facts["rows"], facts["counts_by_status"]) == ("m", 2, {"ok": 2})
    assert facts["shards"] == [{"name": "u1.tar", "size": None, "etag": None}]


def test_commits_on_an_s3_compatible_store(s3_server, s3_bucket):
    import polars as pl

    from pipeline.io.delta import storage_options_for

    output = f"s3://{s3_bucket}/scores"
    fs = s3_server.filesystem()
    committer = UnitCommitter(output, s3_server.storage_options)
    version = committer.next_version("u1")
    path = data_file_name("u1", version, "5-6")
    table = pa.table({"key": ["a", "b"], "unit": ["u1", "u1"], "aesthetic_score": pa.array([5.2, 5.9], pa.float32())})
    pq.write_table(table, f"{s3_bucket}/scores/{path}", filesystem=fs)
    size = fs.size(f"{s3_bucket}/scores/{path}")
    committer.commit("u1", version, [DataFile(path, "5-6", 2, size, {"numRecords": 2})], SCHEMA,
                     _record("u1", [5.2, 5.9]))

    read = pl.read_delta(output, storage_options=storage_options_for(output, s3_server.storage_options))
    assert sorted(read["key"].to_list()) == ["a", "b"]
    assert units.read_units(output, s3_server.storage_options)["u1"]["rows"] == 2
