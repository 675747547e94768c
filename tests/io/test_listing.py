"""The input's kept listing (pipeline.io.listing): an incremental listing sees what a full one sees, as long as
new files sort after the kept ones; anything else waits for the next full listing, which notices it."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from pipeline.config import ListingConfig
from pipeline.errors import InputError
from pipeline.io import listing
from pipeline.sources.base import list_entries

DAY = 86400.0


def _same(entries) -> list[tuple]:
    return [(e.uri, e.size, e.etag) for e in entries]


def _write(folder: Path, *names: str, data: bytes = b"x") -> None:
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def _keep(listed: listing.InputListing, format: str = "webdataset") -> None:
    """What a run does once it holds the output: keep the listing, with the format it read the input as."""
    listed.format = format
    listed.save()


@pytest.fixture
def small_overlap(monkeypatch):
    """Two kept files listed again, so a handful of files shows what thousands would."""
    monkeypatch.setattr(listing, "OVERLAP", 2)


def test_a_folder_is_listed_in_full_first_then_from_where_its_kept_listing_ended(tmp_path, small_overlap) -> None:
    shards, output = tmp_path / "shards", str(tmp_path / "out")
    _write(shards, *(f"{n:05d}.{suffix}" for n in range(6) for suffix in ("tar", "parquet")))
    first = listing.list_input_entries([str(shards)], {}, output)
    assert [f.how for f in first.folders] == ["full"]
    assert _same(first.listing.entries) == _same(list_entries([str(shards)]))
    _keep(first)

    _write(shards, "00006.tar", "00006.parquet", "later/00000.tar")  # new numbers, and a new sub-folder
    second = listing.list_input_entries([str(shards)], {}, output)
    # 12 kept files, of which the last two (00005.*) are listed again with the 3 new ones.
    assert second.folders[0].how == "10 kept, 5 listed after 00004.tar"
    assert _same(second.listing.entries) == _same(list_entries([str(shards)]))


def test_a_late_sidecar_and_a_rewritten_recent_shard_are_seen_in_the_overlap(tmp_path, small_overlap) -> None:
    shards, output = tmp_path / "shards", str(tmp_path / "out")
    _write(shards, "00000.parquet", "00000.tar", "00001.tar")  # 00001's sidecar is not there yet
    _keep(listing.list_input_entries([str(shards)], {}, output))
    _write(shards, "00001.parquet")
    _write(shards, "00001.tar", data=b"rewritten")
    again = listing.list_input_entries([str(shards)], {}, output)
    assert "listed after 00000.parquet" in again.folders[0].how
    assert _same(again.listing.entries) == _same(list_entries([str(shards)]))


def test_on_a_local_disk_only_names_that_can_sort_after_the_kept_end_are_stat_ed(
        tmp_path, small_overlap, monkeypatch) -> None:
    shards, output = tmp_path / "shards", str(tmp_path / "out")
    _write(shards, "0-early/00000.tar", *(f"{n:05d}.tar" for n in range(6)))
    _keep(listing.list_input_entries([str(shards)], {}, output))
    # A folder named like the resume point's shard sorts after it ("00003/" > "00003.tar"), as does "later/".
    _write(shards, "00003/00000.tar", "00006.tar", "later/00000.tar")

    stat_ed: list[str] = []
    info = listing.local_file_info
    monkeypatch.setattr(listing, "local_file_info", lambda path, *args: stat_ed.append(path) or info(path, *args))
    again = listing.list_input_entries([str(shards)], {}, output)
    below = sorted(Path(p).relative_to(shards).as_posix() for p in stat_ed if Path(p) != shards)
    assert again.folders[0].how == "5 kept, 5 listed after 00003.tar"
    assert _same(again.listing.entries) == _same(list_entries([str(shards)]))
    assert below == [
        "00003", "00003.tar", "00003/00000.tar", "00004.tar", "00005.tar", "00006.tar", "later", "later/00000.tar"]


def test_a_linked_shard_has_the_same_etag_in_an_incremental_listing_as_in_a_full_one(tmp_path, small_overlap) -> None:
    shards, output = tmp_path / "shards", str(tmp_path / "out")
    _write(shards, *(f"{n:05d}.tar" for n in range(4)))
    _keep(listing.list_input_entries([str(shards)], {}, output))
    _write(tmp_path / "elsewhere", "00004.tar", data=b"target")
    (shards / "00004.tar").symlink_to(tmp_path / "elsewhere" / "00004.tar")
    os.utime(shards / "00004.tar", (1, 1), follow_symlinks=False)
    again = listing.list_input_entries([str(shards)], {}, output)
    assert "listed after" in again.folders[0].how
    assert _same(again.listing.entries) == _same(list_entries([str(shards)]))


def test_a_kept_folder_that_is_gone_is_named_in_one_line(tmp_path) -> None:
    shards, output = tmp_path / "shards", str(tmp_path / "out")
    _write(shards, "00000.tar", "00001.tar")
    _keep(listing.list_input_entries([str(shards)], {}, output))
    for path in shards.iterdir():
        path.unlink()
    shards.rmdir()
    with pytest.raises(InputError, match="does not exist"):
        listing.list_input_entries([str(shards)], {}, output)


def test_a_file_before_the_kept_end_waits_for_the_next_full_listing_which_stops_trusting_the_order(
        tmp_path, small_overlap) -> None:
    shards, output = tmp_path / "shards", str(tmp_path / "out")
    _write(shards, *(f"{n:05d}.tar" for n in (10, 11, 12, 13)))
    now = time.time()
    _keep(listing.list_input_entries([str(shards)], {}, output, now=now))
    _write(shards, "00005.tar")  # sorts before the kept listing's end: an incremental listing cannot see it

    incremental = listing.list_input_entries([str(shards)], {}, output, now=now + DAY)
    assert str(shards / "00005.tar") not in {e.uri for e in incremental.listing.entries}
    _keep(incremental)

    # A week after the last full listing, auto lists everything again, sees the file and notes the disorder.
    weekly = listing.list_input_entries([str(shards)], {}, output, now=now + 8 * DAY)
    assert weekly.folders[0].how == "full" and not weekly.folders[0].ordered
    assert _same(weekly.listing.entries) == _same(list_entries([str(shards)]))
    _keep(weekly)
    after = listing.list_input_entries([str(shards)], {}, output, now=now + 9 * DAY)
    assert after.folders[0].how == "full"  # this folder is always listed in full from now on

    # --listing full sees it at once, whatever the kept listing says.
    other = str(tmp_path / "other-out")
    _keep(listing.list_input_entries([str(shards)], {}, other, now=now))
    _write(shards, "00006.tar")
    full = listing.list_input_entries([str(shards)], {}, other, ListingConfig(mode="full"), now=now + DAY)
    assert str(shards / "00006.tar") in {e.uri for e in full.listing.entries}


def test_globs_single_files_and_no_output_are_listed_in_full_and_nothing_is_kept(tmp_path) -> None:
    shards = tmp_path / "shards"
    _write(shards, "00000.tar", "00000.parquet", "00001.tar")
    output = tmp_path / "out"
    for pattern in (str(shards / "0000[01].tar"), str(shards / "00001.tar")):
        listed = listing.list_input_entries([pattern], {}, str(output))
        assert listed.folders == [] and _same(listed.listing.entries) == _same(list_entries([pattern]))
        _keep(listed)
    assert not output.exists()
    assert listing.list_input_entries([str(shards)], {}, None).folders == []


def test_on_s3_the_incremental_listing_starts_after_the_kept_end_and_equals_a_full_one(
        s3_server, s3_bucket, small_overlap) -> None:
    fs = s3_server.filesystem()
    options = s3_server.storage_options
    inputs, output = f"s3://{s3_bucket}/shards", f"s3://{s3_bucket}/scores"
    fs.pipe({f"{s3_bucket}/shards/{n:05d}.{suffix}": b"x" for n in range(5) for suffix in ("tar", "parquet")})
    _keep(listing.list_input_entries([inputs], options, output))
    fs.pipe({f"{s3_bucket}/shards/{name}": b"y" for name in ("00005.tar", "00005.parquet", "day2/00000.tar")})
    fs.invalidate_cache()
    again = listing.list_input_entries([inputs], options, output)
    assert again.folders[0].how == "8 kept, 5 listed after 00003.tar"
    assert _same(again.listing.entries) == _same(list_entries([inputs], options))
    assert all(e.etag for e in again.listing.entries)  # S3's ETags, as the full listing gives them


def test_a_kept_listing_of_another_pattern_is_not_used(tmp_path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    _write(one, "00000.tar")
    _write(two, "00000.tar", "00001.tar")
    output = str(tmp_path / "out")
    _keep(listing.list_input_entries([str(one)], {}, output))
    listed = listing.list_input_entries([str(two)], {}, output)
    assert listed.folders[0].how == "full" and len(listed.listing.entries) == 2


def test_formats_whose_names_say_nothing_of_order_are_listed_in_full(tmp_path, small_overlap) -> None:
    images, output = tmp_path / "images", str(tmp_path / "out")
    _write(images, *(f"{name}.jpg" for name in ("b", "c", "d", "e")))
    _keep(listing.list_input_entries([str(images)], {}, output), "files")
    assert not (tmp_path / "out" / listing.FOLDER).exists()  # nothing kept: it would never be used
    _write(images, "a.jpg")
    again = listing.list_input_entries([str(images)], {}, output)
    assert again.folders[0].how == "full" and str(images / "a.jpg") in {e.uri for e in again.listing.entries}


def test_the_listing_mode_is_checked_at_the_edge() -> None:
    with pytest.raises(Exception, match="listing mode 'sometimes'"):
        ListingConfig(mode="sometimes")
    with pytest.raises(Exception, match="full_every_days"):
        ListingConfig(full_every_days=0)
