"""Data files carry full column statistics, so every engine's filters skip files without losing rows."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline.io.commits import DataFile, UnitCommitter, data_file_name
from pipeline.io.delta import STATS_STRING_PREFIX, file_stats, open_table

LONG = "a caption longer than the statistics keep " * 4


def _rows(unit: str, low: float = 5.1) -> pa.Table:
    return pa.table({
        "key": [f"{unit}-0", f"{unit}-1", f"{unit}-2"],
        "unit": [unit] * 3,
        "caption": [LONG + unit, None, "short"],
        "width": pa.array([640, 480, None], pa.int32()),
        "aesthetic_score": pa.array([low, low + 0.1, None], pa.float32()),
        "error": pa.array([None, None, None], pa.string()),
        "embedding": pa.array([[0.5, 0.5]] * 3, pa.list_(pa.float32())),
    })


@pytest.fixture()
def output(tmp_path):
    committer = UnitCommitter(str(tmp_path))
    for unit, low in (("u1", 5.1), ("u2", 5.5), ("u3", 5.8)):
        table = _rows(unit, low)
        path = data_file_name(unit, 1, "5-6")
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, tmp_path / path)
        committer.commit(unit, 1, [DataFile(path, "5-6", 3, os.path.getsize(tmp_path / path), file_stats(table))],
                         table.schema, {"unit": unit, "rows": 3, "shards": []})
    return tmp_path


def test_long_strings_keep_a_prefix_and_a_maximum_that_still_sorts_last():
    stats = file_stats(_rows("u1"))
    low, high = stats["minValues"]["caption"], stats["maxValues"]["caption"]
    assert len(low) <= STATS_STRING_PREFIX and len(high) <= STATS_STRING_PREFIX
    assert low <= "short" and high >= LONG + "u1"
    assert stats["nullCount"] == {"key": 0, "unit": 0, "caption": 1, "width": 1, "aesthetic_score": 1, "error": 3,
                                  "embedding": 0}
    assert "error" not in stats["minValues"], "an all-null column has no bounds, which readers take as all null"


@pytest.mark.parametrize("column, value", [
    ("unit", "u2"), ("key", "u3-1"), ("caption", LONG + "u2"), ("caption", "short"), ("width", 480),
])
def test_every_engine_filters_on_any_column_without_losing_rows(output, column, value):
    import duckdb
    import polars as pl

    everything = open_table(str(output)).to_pyarrow_table()
    expected = pc.sum(pc.equal(everything[column], value)).as_py()
    assert expected >= 1
    dataset = open_table(str(output)).to_pyarrow_dataset()
    assert dataset.to_table(filter=pc.field(column) == value).num_rows == expected
    assert pl.scan_delta(str(output)).filter(pl.col(column) == value).collect().height == expected
    assert duckdb.sql(f"SELECT count(*) FROM dataset WHERE {column} = ?", params=[value]).fetchall() == [(expected,)]


def test_a_filter_on_the_unit_reads_only_that_units_file(output):
    dataset = open_table(str(output)).to_pyarrow_dataset()
    assert len(list(dataset.get_fragments(filter=pc.field("unit") == "u2"))) == 1
    assert len(list(dataset.get_fragments(filter=pc.field("aesthetic_score") > 5.4))) == 2
