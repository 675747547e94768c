"""img2dataset shards through the seam: the same items, rows and ranged reads as the shard code gives."""

from __future__ import annotations

import json

import numpy as np

from pipeline import schema as S
from pipeline.analysis.reading import fetch_image
from pipeline.config import InputConfig
from pipeline.io.shards import list_shards
from pipeline.sources import get_source
from pipeline.sources.base import Listing, list_entries
from pipeline.stages.read import ReadItems, read_shard_rows
from tests.hostile_images import encode, photo
from tests.tarfiles import make_sidecar, make_tar, sidecar_row

SOURCE = get_source("webdataset")


def _shards(tmp_path):
    images = {f"{i:04d}": encode(photo(40, 30, seed=i), "JPEG", quality=90) for i in range(3)}
    (tmp_path / "00000.tar").write_bytes(make_tar([(f"{k}.jpg", v) for k, v in images.items()]))
    rows = [sidecar_row(k, caption=f"caption {k}") for k in images] + [sidecar_row("0009", status="failed_to_download")]
    (tmp_path / "00000.parquet").write_bytes(make_sidecar(rows))
    return images


def test_shards_list_and_read_as_they_do_without_the_seam(tmp_path):
    images = _shards(tmp_path)
    items = SOURCE.list_items(Listing.of(list_entries([str(tmp_path)])), InputConfig("webdataset").options)
    assert items == list_shards([str(tmp_path)])
    (table,) = ReadItems("webdataset", InputConfig("webdataset").options)(
        {"unit": np.array(["u"]), "items": np.array([json.dumps([items[0].task()])])})
    expected = read_shard_rows(items[0].tar, items[0].sidecar)
    assert table.column(S.KEY).to_pylist() == [r[S.KEY] for r in expected]
    assert table.column(S.STATUS).to_pylist() == [r[S.STATUS] for r in expected] == ["ok"] * 3 + ["download_failed"]
    assert set(table.column(S.SHARD).to_pylist()) == {str(tmp_path / "00000.tar")}
    row = table.to_pylist()[1]
    assert SOURCE.owns_row(row[S.SHARD], row[S.MEMBER])
    assert fetch_image(row) == images[row[S.KEY]]
    assert fetch_image((row[S.SHARD], row[S.OFFSET], row[S.SIZE])) == images[row[S.KEY]]
