"""The sample dataset builder and the local-server fixtures.

The integration tests here also pin down what img2dataset (1.47) writes, which the shard reader
relies on: tar member naming, sidecar columns and dtypes, status strings and the key format.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import sample_data
from pipeline.sample_data import (
    DEGRADATIONS,
    NON_IMAGE_NAME,
    build_shards,
    make_photos,
    serve_directory,
    write_url_list,
)

from .conftest import SAMPLE_BROKEN_URLS, SAMPLE_IMAGES, SAMPLE_IMAGES_PER_SHARD

# What img2dataset 1.47 writes into each NNNNN.parquet, in order, after the url list's extra columns.
IMG2DATASET_SIDECAR_SCHEMA = pa.schema([
    ("subject", pa.string()),  # saved additional columns come first ...
    ("variant", pa.string()),
    ("caption", pa.string()),  # ... then caption and url ...
    ("url", pa.string()),
    ("key", pa.string()),  # ... then img2dataset's own
    ("status", pa.string()),
    ("error_message", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("original_width", pa.int32()),
    ("original_height", pa.int32()),
    ("exif", pa.string()),
    ("sha256", pa.string()),
])


def _no_proxy_get(url: str) -> bytes:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=5) as response:
        return response.read()


# Unit: photos, server, url list (no img2dataset) -------------------------------------------------


def test_make_photos_is_deterministic_and_mixes_variants_and_formats(tmp_path):
    first = make_photos(tmp_path / "a", n_images=8)
    again = make_photos(tmp_path / "b", n_images=8)
    assert [p.path.read_bytes() for p in first] == [p.path.read_bytes() for p in again]

    # Any prefix already mixes every variant, several subjects and all three file formats.
    assert {p.variant for p in first} == {"original", *DEGRADATIONS}
    assert len({p.subject for p in first}) >= 8
    assert {p.image_format for p in first} == {"jpg", "png", "webp"}
    for photo in first:
        with Image.open(photo.path) as image:
            assert image.size == (photo.width, photo.height)
            assert image.format == {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[photo.image_format]
        assert photo.caption.startswith("a photo of ")
    tiny = next(p for p in first if p.variant == "tiny")
    assert max(tiny.width, tiny.height) == 32
    assert (tmp_path / "a" / NON_IMAGE_NAME).read_text().startswith("This is a text file")


def test_make_photos_default_is_every_subject_variant_pair_once(tmp_path):
    photos = make_photos(tmp_path, n_variants=2, subjects=["chelsea", "coins"])
    assert sorted((p.subject, p.variant) for p in photos) == sorted(
        (s, v) for s in ("chelsea", "coins") for v in ("original", *DEGRADATIONS[:2])
    )
    assert not any(p.jittered for p in photos)
    # Grayscale sources stay grayscale (WebP has no grayscale mode): LAION has such JPEGs.
    for coins in [p for p in photos if p.subject == "coins" and p.image_format != "webp"]:
        with Image.open(coins.path) as image:
            assert image.mode == "L"


def test_make_photos_past_the_distinct_pairs_are_distinct_crops(tmp_path):
    photos = make_photos(tmp_path, n_variants=1, subjects=["chelsea"], n_images=12)
    assert sum(p.jittered for p in photos) == 10
    assert all(p.caption.endswith(", cropped") for p in photos if p.jittered)
    digests = {hashlib.sha256(p.path.read_bytes()).hexdigest() for p in photos}
    assert len(digests) == len(photos)


def test_make_photos_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="n_variants"):
        make_photos(tmp_path, n_variants=len(DEGRADATIONS) + 1)
    with pytest.raises(ValueError, match="unknown subjects"):
        make_photos(tmp_path, subjects=["lena"])


def test_serve_directory_serves_on_localhost_and_stops(tmp_path):
    (tmp_path / "hello.txt").write_text("hi")
    with serve_directory(tmp_path) as base_url:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", base_url)
        assert _no_proxy_get(f"{base_url}/hello.txt") == b"hi"
        with pytest.raises(urllib.error.HTTPError) as missing:
            _no_proxy_get(f"{base_url}/missing.jpg")
        assert missing.value.code == 404
    with pytest.raises(urllib.error.URLError):
        _no_proxy_get(f"{base_url}/hello.txt")


def test_write_url_list_spreads_broken_urls(tmp_path):
    photos = make_photos(tmp_path / "photos", n_variants=0, subjects=["chelsea", "coffee", "rocket"])
    path = write_url_list(photos * 4, "http://127.0.0.1:1/", tmp_path / "urls.parquet", extra_broken=3)
    table = pq.read_table(path)
    assert table.column_names == ["url", "caption", "subject", "variant"]
    assert table.num_rows == 12 + 3 + 1
    subjects = table.column("subject").to_pylist()
    broken_rows = [i for i, s in enumerate(subjects) if s in (sample_data.MISSING_SUBJECT, sample_data.NON_IMAGE_SUBJECT)]
    assert broken_rows == [2, 6, 10, 14]  # one per 4 rows: each shard of a few rows gets its failure
    assert table.column("url").to_pylist()[0] == f"http://127.0.0.1:1/{photos[0].path.name}"
    assert table.column("url").to_pylist()[14].endswith("/" + NON_IMAGE_NAME)


# Integration: the shards img2dataset wrote -------------------------------------------------------


def _members(tar_path: str) -> list[tarfile.TarInfo]:
    with tarfile.open(tar_path) as tar:
        return tar.getmembers()


def test_sample_dataset_has_three_shards_with_sidecars_and_stats(sample_dataset):
    names = sorted(p.rsplit("/", 1)[-1] for p in sample_dataset.tar_paths)
    assert names == ["00000.tar", "00001.tar", "00002.tar"]
    for path in sample_dataset.tar_paths + sample_dataset.sidecar_paths + sample_dataset.stats_paths:
        assert Path(path).is_file(), path
    assert len(sample_dataset.expected_keys) == SAMPLE_IMAGES
    assert sample_dataset.n_failed == SAMPLE_BROKEN_URLS + 1
    assert {k: len(v) for k, v in sample_dataset.keys_by_status.items()} == {
        "success": SAMPLE_IMAGES, "failed_to_download": SAMPLE_BROKEN_URLS, "failed_to_resize": 1,
    }


def test_shards_are_tars_of_webdataset_samples(sample_dataset):
    seen_keys = []
    for tar_path in sample_dataset.tar_paths:
        members = _members(tar_path)
        assert all(m.isfile() for m in members)
        names = [m.name for m in members]
        # key.jpg, key.txt, key.json for each sample, adjacent (WebDataset groups consecutive members).
        assert len(names) % 3 == 0
        for start in range(0, len(names), 3):
            group = names[start:start + 3]
            key = group[0].split(".", 1)[0]
            assert sorted(group) == [f"{key}.jpg", f"{key}.json", f"{key}.txt"], group
            seen_keys.append(key)
        with tarfile.open(tar_path) as tar:
            for key in seen_keys[-len(names) // 3:]:
                image = Image.open(io.BytesIO(tar.extractfile(f"{key}.jpg").read()))
                assert image.format == "JPEG"
                image.load()
                caption = tar.extractfile(f"{key}.txt").read().decode()
                meta = json.loads(tar.extractfile(f"{key}.json").read())
                row = sample_dataset.sidecar_rows[key]
                assert caption == row["caption"] == meta["caption"]
                assert meta["key"] == key and meta["status"] == "success"
                assert (image.width, image.height) == (meta["width"], meta["height"])
                assert image.mode in ("RGB", "L")
    # Only successes have members; failures live in the sidecar alone.
    assert sorted(seen_keys) == sample_dataset.expected_keys


def test_webdataset_reads_the_shards(sample_dataset):
    import webdataset as wds

    samples = list(wds.WebDataset(sample_dataset.tar_paths, shardshuffle=False))
    assert sorted(s["__key__"] for s in samples) == sample_dataset.expected_keys
    assert all({"jpg", "txt", "json"} <= set(s) for s in samples)


def test_sidecars_have_one_row_per_url_with_img2dataset_status(sample_dataset):
    urls = pq.read_table(sample_dataset.url_list).column("url").to_pylist()
    rows = []
    for tar_path, sidecar in zip(sample_dataset.tar_paths, sample_dataset.sidecar_paths):
        table = pq.read_table(sidecar)
        assert table.schema.remove_metadata() == IMG2DATASET_SIDECAR_SCHEMA
        shard_id = int(tar_path.rsplit("/", 1)[-1].split(".")[0])
        for row in table.to_pylist():
            # key = shard id * 10**ceil(log10(per shard)) + row in shard, 1 + 5 digits for 10 per shard.
            assert re.fullmatch(r"\d{6}", row["key"])
            assert int(row["key"]) // SAMPLE_IMAGES_PER_SHARD == shard_id
            assert urls[int(row["key"])] == row["url"]  # the row's position in the url list
            rows.append(row)
    assert sorted(r["url"] for r in rows) == sorted(urls)

    by_status = Counter(r["status"] for r in rows)
    assert by_status == {"success": SAMPLE_IMAGES, "failed_to_download": SAMPLE_BROKEN_URLS, "failed_to_resize": 1}
    for row in rows:
        if row["status"] == "success":
            assert row["error_message"] is None
            assert row["width"] and row["original_width"] and row["sha256"]
            # keep_ratio, never upscale: the short side is 256 unless the photo was smaller.
            photo = sample_dataset.photo_by_key[row["key"]]
            assert (row["original_width"], row["original_height"]) == (photo.width, photo.height)
            assert min(row["width"], row["height"]) == min(256, photo.width, photo.height)
        else:
            assert row["width"] is None and row["original_width"] is None and row["sha256"] is None
        if row["status"] == "failed_to_download":
            assert row["subject"] == sample_data.MISSING_SUBJECT
            assert row["error_message"] == "HTTP Error 404: File not found"
        if row["status"] == "failed_to_resize":
            assert row["subject"] == sample_data.NON_IMAGE_SUBJECT
            assert row["error_message"] == "Image decoding error"


def test_stats_files_count_each_shard(sample_dataset):
    total = Counter()
    for stats_path, keys in zip(sample_dataset.stats_paths, sample_dataset.keys_by_shard.values()):
        stats = json.loads(Path(stats_path).read_text())
        assert stats["count"] == len(keys)
        total.update({k: stats[k] for k in ("successes", "failed_to_download", "failed_to_resize")})
    assert total == {"successes": SAMPLE_IMAGES, "failed_to_download": SAMPLE_BROKEN_URLS, "failed_to_resize": 1}


def test_build_shards_refuses_a_folder_with_shards_in_it(sample_dataset):
    with pytest.raises(FileExistsError):
        build_shards(sample_dataset.url_list, sample_dataset.shards_dir)


# Integration: local S3 ---------------------------------------------------------------------------


def test_s3fs_honours_aws_endpoint_url(s3_server, s3_bucket):
    import s3fs

    # No endpoint argument: it must come from AWS_ENDPOINT_URL, which the fixture set.
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.pipe(f"{s3_bucket}/hello.txt", b"hello")
    assert fs.cat(f"{s3_bucket}/hello.txt") == b"hello"
    body = s3_server.client().get_object(Bucket=s3_bucket, Key="hello.txt")["Body"].read()
    assert body == b"hello"


def test_pyarrow_s3_filesystem_round_trips(s3_server, s3_bucket):
    filesystem = s3_server.pyarrow_filesystem()
    with filesystem.open_output_stream(f"{s3_bucket}/table.parquet") as out:
        pq.write_table(pa.table({"x": [1, 2, 3]}), out)
    assert pq.read_table(f"{s3_bucket}/table.parquet", filesystem=filesystem).column("x").to_pylist() == [1, 2, 3]
    assert s3_server.filesystem().exists(f"{s3_bucket}/table.parquet")  # s3fs sees what pyarrow wrote


def test_upload_dir_keeps_relative_paths(s3_server, s3_bucket, upload_dir, tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "sub" / "b.txt").write_text("b")
    written = upload_dir(tmp_path, f"s3://{s3_bucket}/prefix")
    assert written == [f"s3://{s3_bucket}/prefix/a.txt", f"s3://{s3_bucket}/prefix/sub/b.txt"]
    assert s3_server.filesystem().cat(f"{s3_bucket}/prefix/sub/b.txt") == b"b"


def test_sample_shards_on_s3_match_local(sample_dataset, sample_shards_s3, s3_server):
    fs = s3_server.filesystem()
    for tar_path in sample_dataset.tar_paths:
        name = tar_path.rsplit("/", 1)[-1]
        assert fs.cat(f"{sample_shards_s3}/{name}") == Path(tar_path).read_bytes()


def test_img2dataset_writes_straight_to_s3(s3_server, s3_bucket, tmp_path):
    """img2dataset's own fsspec writes reach the server through the environment alone."""
    photos = make_photos(tmp_path / "photos", n_variants=0, subjects=["chelsea", "coffee", "rocket"])
    with serve_directory(tmp_path / "photos") as base_url:
        url_list = write_url_list(photos, base_url, tmp_path / "urls.parquet", extra_broken=1, non_image=False)
        tars = build_shards(url_list, f"s3://{s3_bucket}/shards", number_sample_per_shard=2)
    assert tars == [f"s3://{s3_bucket}/shards/00000.tar", f"s3://{s3_bucket}/shards/00001.tar"]
    fs = s3_server.filesystem()
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{s3_bucket}/shards")) == [
        "00000.parquet", "00000.tar", "00000_stats.json", "00001.parquet", "00001.tar", "00001_stats.json",
    ]
    with fs.open(f"{s3_bucket}/shards/00000.parquet", "rb") as handle:
        assert pq.read_table(handle).num_rows == 2


def test_build_shards_with_storage_options_uploads(s3_server, s3_bucket, tmp_path, monkeypatch):
    """Given storage options (no endpoint in the environment), shards are built locally, then put."""
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    photos = make_photos(tmp_path / "photos", n_variants=0, subjects=["chelsea"])
    with serve_directory(tmp_path / "photos") as base_url:
        url_list = write_url_list(photos, base_url, tmp_path / "urls.parquet", extra_broken=0, non_image=False)
        tars = build_shards(url_list, f"s3://{s3_bucket}/up", storage_options=s3_server.storage_options)
    assert tars == [f"s3://{s3_bucket}/up/00000.tar"]
    assert s3_server.filesystem().exists(f"{s3_bucket}/up/00000.parquet")



# Integration, slow: the production entry point -----------------------------------------------------


def _shard_contents(folder) -> dict[str, object]:
    """Everything in a shard folder that does not depend on timing: members and sidecar rows by key."""
    contents = {}
    for tar_path in sorted(folder.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                data = tar.extractfile(member).read()
                contents[member.name] = json.loads(data) if member.name.endswith(".json") else data
        for row in pq.read_table(tar_path.with_suffix(".parquet")).to_pylist():
            contents[f"sidecar:{row['key']}"] = row
    return contents


@pytest.mark.integration  # runs img2dataset twice, once with its own worker processes
def test_in_process_build_matches_img2dataset_download(tmp_path):
    """in_process=True runs the same img2dataset code as download() minus its process pool."""
    photos = make_photos(tmp_path / "photos", n_variants=2, subjects=["chelsea", "coins", "rocket"])
    with serve_directory(tmp_path / "photos") as base_url:
        url_list = write_url_list(photos, base_url, tmp_path / "urls.parquet", extra_broken=1)
        build_shards(url_list, str(tmp_path / "in_process"), number_sample_per_shard=5)
        build_shards(url_list, str(tmp_path / "download"), number_sample_per_shard=5,
                     in_process=False, processes_count=1)
    in_process = _shard_contents(tmp_path / "in_process")
    download = _shard_contents(tmp_path / "download")
    assert in_process.keys() == download.keys()
    assert len([k for k in in_process if k.startswith("sidecar:")]) == len(photos) + 2
    assert in_process == download
