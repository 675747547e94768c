"""An exclusion list over img2dataset shards: exactly the listed rows are excluded, by image hash and by URL,
keep their rows, and are counted by the cutoff table; image_sha256 and phash come out beside the scores."""

from __future__ import annotations

import hashlib
import math
import tarfile

import pyarrow.compute as pc
import pytest

from pipeline import schema as S
from pipeline.config import DecodeConfig
from pipeline.io.delta import open_table
from pipeline.runner import run_score

pytestmark = pytest.mark.integration


def _image_bytes(dataset) -> dict[str, bytes]:
    images = {}
    for path in dataset.tar_paths:
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".jpg"):
                    images[member.name.rsplit(".", 1)[0]] = tar.extractfile(member).read()
    return images


def test_listed_images_and_urls_are_excluded_counted_and_kept(sample_dataset, scoring, ray_local, tmp_path):
    images = _image_bytes(sample_dataset)
    keys = sorted(images)
    by_image, by_url = keys[0], keys[1]
    url = sample_dataset.sidecar_rows[by_url]["url"]
    failed = sample_dataset.failed_keys[0]  # a URL that never downloaded can be listed too
    listed = tmp_path / "re-laion.txt"
    listed.write_text(f"{hashlib.sha256(images[by_image]).hexdigest()}\n{hashlib.md5(url.encode()).hexdigest()}\n"
                      f"{hashlib.sha256(sample_dataset.sidecar_rows[failed]['url'].encode()).hexdigest()}\n")
    output = str(tmp_path / "scores")

    summary = run_score(scoring.config(sample_dataset.shards_dir, output, exclude_hashes=str(listed),
                                       decode=DecodeConfig(batch_size=16, phash=True)))

    table = open_table(output).to_pyarrow_table()
    rows = {key: row for key, row in zip(table[S.KEY].to_pylist(), table.to_pylist())}
    excluded = sorted(k for k, r in rows.items() if r[S.STATUS] == S.Status.EXCLUDED.value)
    assert excluded == sorted([by_image, by_url, failed])
    assert all(rows[k][S.AESTHETIC_SCORE] is None or math.isnan(rows[k][S.AESTHETIC_SCORE]) for k in excluded)
    assert rows[by_url][S.ERROR] == "on the exclusion list (url md5; was ok)"
    assert len(rows) == len(sample_dataset.expected_keys) + len(sample_dataset.failed_keys), "every key kept"
    assert summary.counts_by_status[S.Status.EXCLUDED.value] == 3
    (cutoffs,) = summary.cutoffs
    assert cutoffs.counts_by_status[S.Status.EXCLUDED.value] == 3
    assert cutoffs.model_key.endswith(f"|exclude@{hashlib.sha256(listed.read_bytes()).hexdigest()[:16]}")

    ok = [k for k, r in rows.items() if r[S.STATUS] == S.Status.OK.value]
    assert [k for k in ok if rows[k][S.IMAGE_SHA256] != hashlib.sha256(images[k]).hexdigest()] == []
    assert all(len(rows[k][S.PHASH]) == 16 for k in ok)
    assert pc.sum(pc.is_null(table[S.PHASH])).as_py() == len(rows) - len(ok)
