"""Parquet files with an image-bytes column: rows, keys, bad files and columns, and reading a row back."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import schema as S
from pipeline.analysis.reading import fetch_images
from pipeline.config import ConfigError, InputConfig, ScoreConfig
from pipeline.sources import get_source, list_items
from pipeline.sources.base import Listing, list_entries
from pipeline.stages.read import ReadItems
from tests.hostile_images import encode, photo

SOURCE = get_source("parquet")


def _images(n):
    return [encode(photo(24, 16, seed=i), "JPEG" if i % 2 else "PNG") for i in range(n)]


def _read(path, **options):
    opts = InputConfig("parquet", options).options
    (item,) = SOURCE.list_items(Listing.of(list_entries([str(path)])), opts)
    read = ReadItems("parquet", opts)
    tables = list(read({"unit": np.array(["u"]), "items": np.array([json.dumps([item.task()])])}))
    return pa.concat_tables(tables).to_pylist()


def test_each_row_is_a_sample_keyed_by_its_column_and_read_back_from_its_row_group(tmp_path):
    images = _images(5)
    table = pa.table({"id": ["a", "b", "a", None, "e"], "jpg": images, "text": ["t0", None, "t2", "t3", "t4"],
                      "url": [f"http://x/{i}" for i in range(5)], "license": ["cc0"] * 5})
    pq.write_table(table, tmp_path / "train.parquet", row_group_size=2)

    rows = _read(tmp_path / "train.parquet", image_column="jpg", key_column="id", caption_column="text")

    assert [r[S.KEY] for r in rows] == ["a", "b", "a#2", "#3", "e"]
    assert [r[S.STATUS] for r in rows] == ["ok"] * 5
    assert rows[2][S.ERROR] == "warning: key 'a' repeats; row number appended"
    assert [r[S.IMAGE_FORMAT] for r in rows] == ["png", "jpg"] * 2 + ["png"]
    assert (rows[0][S.CAPTION], rows[1][S.CAPTION], rows[4][S.URL]) == ("t0", None, "http://x/4")
    assert json.loads(rows[0][S.METADATA_JSON]) == {"license": "cc0"}
    assert {r[S.SHARD] for r in rows} == {str(tmp_path / "train.parquet")}
    assert [(r[S.MEMBER], r[S.OFFSET], r[S.SIZE]) for r in rows] == [("jpg", i, len(d)) for i, d in enumerate(images)]
    assert fetch_images(rows) == images


def test_a_hugging_face_image_struct_works_and_rows_without_a_key_column_are_numbered(tmp_path):
    images = _images(3)
    structs = [{"bytes": images[0], "path": "0.png"}, None, {"bytes": images[2], "path": "2.png"}]
    pq.write_table(pa.table({"image": structs}), tmp_path / "data.parquet")

    rows = _read(tmp_path / "data.parquet")

    assert [(r[S.KEY], r[S.STATUS]) for r in rows] == [("000000", "ok"), ("000001", "no_image"), ("000002", "ok")]
    assert fetch_images([rows[0], rows[2]]) == [images[0], images[2]]


def test_a_missing_or_wrong_column_and_a_file_that_is_no_parquet_get_one_row_that_says_so(tmp_path):
    pq.write_table(pa.table({"jpg": _images(1), "caption": ["c"]}), tmp_path / "a.parquet")
    (row,) = _read(tmp_path / "a.parquet")
    assert row[S.STATUS] == "shard_error" and row[S.KEY] == S.SHARD_ROW_KEY
    assert row[S.ERROR] == ("no image column 'image' (columns: jpg, caption); name it with --input-option "
                            "image_column=")
    (row,) = _read(tmp_path / "a.parquet", image_column="caption")
    assert row[S.STATUS] == "shard_error" and "holds string, not image bytes" in row[S.ERROR]
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "b.parquet").write_bytes(b"not parquet at all")
    (row,) = _read(tmp_path / "b" / "b.parquet")
    assert row[S.STATUS] == "shard_error" and row[S.ERROR].startswith("not a readable Parquet file")


def test_parquet_files_are_found_by_auto_and_their_options_checked(tmp_path):
    pq.write_table(pa.table({"image": _images(1)}), tmp_path / "train-00000-of-00001.parquet")
    config = ScoreConfig(input=(str(tmp_path),), output=str(tmp_path / "out"))
    source, items = list_items(config)
    assert source.name == "parquet" and [i.name for i in items] == [str(tmp_path / "train-00000-of-00001.parquet")]
    with pytest.raises(ConfigError, match=r"input format parquet has no option\(s\) \['image'\]; it takes: "
                                          r"caption_column, image_column, key_column"):
        InputConfig("parquet", {"image": "jpg"})
    with pytest.raises(ConfigError, match="image_column must name a column"):
        InputConfig("parquet", {"image_column": ""})
