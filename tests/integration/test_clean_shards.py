"""Shards where nothing goes wrong: the columns that are None on every row keep their nulls."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from pipeline import schema as S
from pipeline.config import DecodeConfig
from pipeline.io.delta import committed_files
from pipeline.runner import run_score
from tests.hostile_images import encode, photo
from tests.tarfiles import make_sidecar, make_tar, sidecar_row

pytestmark = pytest.mark.integration


def test_text_columns_none_in_a_whole_batch_stay_null_through_every_stage(tmp_path, scoring, ray_local):
    """A text column that is None in every row of a block reaches the next numpy stage as float NaNs
    (Arrow's null type through Ray Data); no stage may pass that on as the string "nan" or a float."""
    shards = tmp_path / "shards"
    shards.mkdir()
    keys = [f"{i:04d}" for i in range(16)]
    members = [(f"{key}.jpg", encode(photo(64, 48, seed=i), "JPEG", quality=90)) for i, key in enumerate(keys)]
    (shards / "00000.tar").write_bytes(make_tar(members))  # no captions in the tar either
    rows = [sidecar_row(key) for key in keys]
    for row in rows:
        row["caption"] = None  # a sidecar column of nulls only
    (shards / "00000.parquet").write_bytes(make_sidecar(rows))
    output = tmp_path / "scores"

    summary = run_score(scoring.config(str(shards), str(output), decode=DecodeConfig(batch_size=8)))

    assert summary.ok and summary.scored == len(keys)
    table = pads.dataset(committed_files(str(output)), format="parquet", partitioning="hive").to_table()
    for name in (S.ERROR, S.CAPTION):
        assert table.schema.field(name).type == pa.string()
        assert table[name].null_count == len(keys), (name, table[name].to_pylist()[:3])
