import json

import numpy as np
import pyarrow as pa
import pytest

from pipeline import schema as S
from pipeline.cutoffs import build_tables
from pipeline.io import layout
from pipeline.io.commits import UnitCommitter
from pipeline.io.delta import committed_files, open_table
from pipeline.io.units import read_units
from pipeline.io.writer import CommitError, WriteStaging, commit_unit, score_summary, similarity_summary

IDENTITY = {"model_key": "tiny-random/seed=0|v2@abc", "tiny_random": True}


def _batch(keys, scores, shard="s0.tar", unit="u1", shard_rows=None, statuses=None):
    n = len(keys)
    return {
        S.KEY: np.array(keys, dtype=object), S.SHARD: np.array([shard] * n, dtype=object),
        S.UNIT: np.array([unit] * n, dtype=object),
        S.OFFSET: np.arange(n, dtype=np.float64) * 512, S.SIZE: np.full(n, 100.0),
        S.CAPTION: np.array([f"c{k}" for k in keys], dtype=object),
        S.STATUS: np.array(statuses or ["ok"] * n, dtype=object), S.ERROR: np.array([None] * n, dtype=object),
        S.AESTHETIC_SCORE: np.array(scores, dtype=np.float32),
        "score_other": np.array(scores, dtype=np.float32) - 1,
        S.MODEL: np.array(["m"] * n, dtype=object), S.HEAD: np.array(["h"] * n, dtype=object),
        S.SHARD_ROWS: np.full(n, shard_rows or n), S.EMBEDDING: np.ones((n, 4), dtype=np.float16),
    }


def _commit(out, run_id, shards):
    return commit_unit(UnitCommitter(out), run_id, "u1", shards, IDENTITY, {})


def _committed(out):
    return open_table(out).to_pyarrow_table()


def test_staging_then_commit_writes_one_file_per_band_in_one_table_version(tmp_path):
    out = str(tmp_path / "out")
    stage = WriteStaging(out, "run1")
    stats = stage(_batch(["a", "b"], [4.0, 6.7], shard_rows=4))
    assert stats["rows"].tolist() == [2]
    stage(_batch(["c", "d"], [5.5, np.nan], shard_rows=4, statuses=["ok", "decode_error"]))
    record = _commit(out, "run1", [{"name": "s0.tar", "size": 1, "etag": "e"}])
    bands = {f["band"]: f["rows"] for f in record["files"]}
    assert bands == {"lt4.5": 1, "5-6": 1, "ge6.5": 1, "unscored": 1}
    assert record["counts_by_status"] == {"ok": 3, "decode_error": 1}
    assert record["score"]["counts_ge"]["5.0"] == 2
    assert read_units(out)["u1"]["rows"] == 4
    assert open_table(out).version() == 0 and len(committed_files(out)) == 4
    table = _committed(out)
    assert sorted(table[S.KEY].to_pylist()) == ["a", "b", "c", "d"]
    assert table[S.EMBEDDING].to_pylist()[0] == [1.0] * 4  # float16 values, stored as a float list
    assert S.SHARD_ROWS not in table.column_names
    assert not (tmp_path / "out" / layout.STAGING / "run1" / "u1").exists()


def test_a_retried_batch_is_counted_once(tmp_path):
    out = str(tmp_path / "out")
    stage = WriteStaging(out, "r")
    stage(_batch(["a", "b"], [5.0, 5.1]))
    stage(_batch(["a", "b"], [5.0, 5.1]))
    record = _commit(out, "r", [{"name": "s0.tar"}])
    assert record["rows"] == 2 and record["duplicate_rows_dropped"] == 2


def test_a_unit_whose_rows_do_not_add_up_is_not_committed(tmp_path):
    out = str(tmp_path / "out")
    WriteStaging(out, "r")(_batch(["a"], [5.0], shard_rows=3))
    with pytest.raises(CommitError, match="does not balance"):
        _commit(out, "r", [{"name": "s0.tar"}])
    assert read_units(out) == {}


def test_a_rerun_replaces_the_units_files_instead_of_adding(tmp_path):
    out = str(tmp_path / "out")
    WriteStaging(out, "r1")(_batch(["a", "b"], [6.8, 3.0]))
    _commit(out, "r1", [{"name": "s0.tar"}])
    WriteStaging(out, "r2")(_batch(["a", "b"], [5.2, 3.0]))
    record = _commit(out, "r2", [{"name": "s0.tar"}])
    assert not any("score_band=ge6.5" in uri for uri in committed_files(out))
    assert _committed(out).num_rows == 2
    assert record["run_id"] == "r2" and read_units(out)["u1"]["run_id"] == "r2"


def test_storage_errors_keep_the_unit_pending(tmp_path):
    out = str(tmp_path / "out")
    WriteStaging(out, "r")(_batch([""], [np.nan], statuses=[S.Status.STORAGE_ERROR.value]))
    with pytest.raises(CommitError, match="storage"):
        _commit(out, "r", [{"name": "s0.tar"}])


def test_score_summary_histogram_and_threshold_counts_agree():
    scores = np.array([4.49, 4.5, 4.75, 5.0, 6.0, 6.25, 6.5, 11.0, -1.0, np.nan])
    summary = score_summary(scores)
    assert summary["scored"] == 9
    assert summary["counts_ge"] == {"4.5": 7, "4.75": 6, "5.0": 5, "6.0": 4, "6.25": 3, "6.5": 2}
    hist = summary["histogram"]
    assert sum(hist["counts"]) + hist["underflow"] + hist["overflow"] == 9
    edges = np.arange(hist["low"], hist["high"], hist["step"])
    at_6 = sum(c for e, c in zip(edges, hist["counts"]) if e >= 6.0) + hist["overflow"]
    assert at_6 == summary["counts_ge"]["6.0"]


def test_cutoff_table_sums_manifests_beside_laion():
    records = [{"model_key": "k", "rows": 10, "counts_by_status": {"ok": 8, "decode_error": 2},
                  "score": score_summary(np.array([4.0, 5.0, 6.6, 4.6]))},
                 {"model_key": "k", "rows": 4, "counts_by_status": {"ok": 4},
                  "score": score_summary(np.array([6.3, 7.0]))}]
    (table,) = build_tables(records)
    by_threshold = {r.threshold: r for r in table.rows_by_threshold}
    assert by_threshold[6.0].count == 3 and by_threshold[6.0].fraction == pytest.approx(3 / 6)
    assert by_threshold[6.5].laion_count == 625_000
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in table.to_markdown().splitlines()
             if line.startswith("|")]
    (row,) = [c for c in cells if c[0] == "6.5"]  # the Markdown table's 6.5 row
    assert row[1] == f"{by_threshold[6.5].count:,}" and row[3] == "625,000"
    json.dumps(table.to_json())


def test_similarity_summary_counts_rows_with_a_similarity_at_laions_cutoffs():
    values = np.array([0.1, 0.28, 0.29, 0.31, np.nan, -1.0, 1.0])
    summary = similarity_summary(values)
    assert summary["count"] == 6 and summary["counts_ge"] == {"0.28": 4, "0.3": 2}
    counts = summary["histogram"]["counts"]
    assert len(counts) == 100 and sum(counts) == 6 and counts[0] == 1 and counts[-1] == 1


def test_a_column_the_schema_does_not_name_is_typed_from_its_values():
    from pipeline.io.writer import to_output_table

    batch = {S.KEY: np.array(["a", "b"], dtype=object), "score_extra": np.array([0.5, np.nan], dtype=np.float32),
             "note": np.array(["x", None], dtype=object), "count": np.array([1, 2]), "flag": np.array([True, False])}
    table = to_output_table(batch)
    assert {f.name: f.type for f in table.schema if f.name != S.KEY} == {
        "score_extra": pa.float32(), "note": pa.string(), "count": pa.int64(), "flag": pa.bool_()}
    assert table["note"].to_pylist() == ["x", None]
