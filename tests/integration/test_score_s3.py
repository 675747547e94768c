"""Scoring end to end: img2dataset shards in a local S3 server, scored on a local Ray."""

from __future__ import annotations

import shutil
import tarfile
from collections import Counter

import numpy as np
import pyarrow.dataset as pads
import pytest

from pipeline import bands
from pipeline import schema as S
from pipeline.cutoffs import LAION_PUBLISHED_COUNTS
from pipeline.io import layout
from pipeline.io.commits import UNIT_KEY
from pipeline.io.delta import committed_files, open_table
from pipeline.io.storage import filesystem, read_json
from pipeline.io.units import read_units
from pipeline.runner import run_score
from tests.integration.conftest import rewrite_tar

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def scored(sample_dataset, s3_server, ray_local, scoring, tmp_path_factory):
    """Shards with one image replaced by garbage, uploaded to S3, scored once for the module, the table
    compacted after every commit (so every check below also holds of rows in files units share)."""
    local = tmp_path_factory.mktemp("shards")
    shutil.copytree(sample_dataset.shards_dir, local, dirs_exist_ok=True)
    first_tar = sorted(local.glob("*.tar"))[0]
    with tarfile.open(first_tar) as archive:
        corrupt_member = next(m.name for m in archive.getmembers() if m.name.endswith(".jpg"))
    rewrite_tar(first_tar, local / "tmp.tar", replace={corrupt_member: b"\xff\xd8\xff garbage, not a jpeg"})
    (local / "tmp.tar").replace(first_tar)

    s3_server.client().create_bucket(Bucket="score-e2e")
    from pipeline.sample_data import upload_directory

    upload_directory(str(local), "s3://score-e2e/shards", s3_server.storage_options)
    output = "s3://score-e2e/scores"
    summary = run_score(scoring.config("s3://score-e2e/shards/", output, shards_per_unit=1, compact_at=1))
    table = pads.dataset(committed_files(output), filesystem=s3_server.filesystem(), format="parquet",
                         partitioning="hive").to_table()
    return {"summary": summary, "table": table, "output": output, "corrupt_key": corrupt_member.split(".")[0],
            "records": read_units(output)}


def test_every_key_from_the_tars_and_sidecars_appears_exactly_once(scored, sample_dataset):
    keys = scored["table"][S.KEY].to_pylist()
    assert len(keys) == len(set(keys))
    assert sorted(keys) == sample_dataset.all_keys
    assert scored["summary"].ok and scored["summary"].units_failed == {}


def test_captions_are_joined_from_the_sidecar(scored, sample_dataset):
    rows = scored["table"].to_pylist()
    assert all(row[S.CAPTION] == sample_dataset.caption_by_key[row[S.KEY]] for row in rows)
    assert all(row[S.URL] and row[S.URL].startswith("http://127.0.0.1:") for row in rows)


def test_a_corrupt_image_and_failed_downloads_get_their_statuses(scored, sample_dataset):
    by_key = {row[S.KEY]: row for row in scored["table"].to_pylist()}
    corrupt = by_key[scored["corrupt_key"]]
    assert corrupt[S.STATUS] == S.Status.DECODE_ERROR.value and corrupt[S.ERROR]
    assert np.isnan(corrupt[S.AESTHETIC_SCORE]) or corrupt[S.AESTHETIC_SCORE] is None
    for key in sample_dataset.failed_keys:
        assert by_key[key][S.STATUS] == S.Status.DOWNLOAD_FAILED.value
        assert by_key[key][S.DOWNLOAD_STATUS] in ("failed_to_download", "failed_to_resize")
    ok = [row for row in by_key.values() if row[S.STATUS] == "ok"]
    assert len(ok) == len(sample_dataset.expected_keys) - 1
    assert all(np.isfinite(row[S.AESTHETIC_SCORE]) for row in ok)
    assert all(row[S.MODEL] == "tiny-random(seed=0)" for row in ok)


def test_tar_offsets_fetch_the_image_with_one_ranged_read(scored, s3_server):
    fs = s3_server.filesystem()
    row = next(r for r in scored["table"].to_pylist() if r[S.STATUS] == "ok")
    data = fs.cat_file(row[S.SHARD], start=row[S.OFFSET], end=row[S.OFFSET] + row[S.SIZE])
    assert data[:3] == b"\xff\xd8\xff" and len(data) == row[S.SIZE]


def test_unit_record_counts_equal_parquet_counts(scored):
    table = scored["table"]
    records = scored["records"]
    assert sum(m["rows"] for m in records.values()) == table.num_rows
    from_records = Counter()
    for record in records.values():
        from_records.update(record["counts_by_status"])
        for entry in record["files"]:
            unit_rows = table.filter((pads.field(S.UNIT) == record["unit"]) & (pads.field(S.SCORE_BAND) == entry["band"]))
            assert unit_rows.num_rows == entry["rows"]
    assert from_records == Counter(table[S.STATUS].to_pylist())


def test_cutoff_table_equals_counts_recomputed_from_parquet(scored, s3_server):
    scores = scored["table"][S.AESTHETIC_SCORE].to_numpy(zero_copy_only=False)
    scores = scores[np.isfinite(scores)]
    (table,) = scored["summary"].cutoffs
    for row in table.rows_by_threshold:
        assert row.count == int((scores >= row.threshold).sum())
        assert row.laion_count == LAION_PUBLISHED_COUNTS[row.threshold]
    fs, root = filesystem(scored["output"])
    written = read_json(fs, root + "/" + layout.CUTOFFS_JSON)
    assert [t["count"] for t in written["tables"][0]["thresholds"]] == [r.count for r in table.rows_by_threshold]
    assert fs.exists(root + "/" + layout.CUTOFFS_MD)


def test_bands_partition_the_rows_by_score(scored):
    for row in scored["table"].to_pylist():
        score = row[S.AESTHETIC_SCORE]
        assert row[S.SCORE_BAND] == bands.band_of(None if score is None else float(score))


def test_the_run_compacted_the_table_while_it_committed(scored):
    history = open_table(scored["output"]).history()
    optimized = [entry["version"] for entry in history if entry.get("operation") == "OPTIMIZE"]
    committed = [entry["version"] for entry in history if UNIT_KEY in entry]
    assert len(committed) == len(scored["records"]) >= 2
    assert optimized and min(optimized) < max(committed), history
    assert scored["summary"].compacted
