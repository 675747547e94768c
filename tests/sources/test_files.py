"""Loose image files: samples by key, their rows, and their statuses when a file is not what it says."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from pipeline import schema as S
from pipeline.analysis.reading import fetch_image
from pipeline.config import DecodeConfig, InputConfig
from pipeline.sources import StorageError, get_source
from pipeline.sources.base import Listing, list_entries
from pipeline.stages.decode import Decode
from pipeline.stages.read import ReadItems
from tests.hostile_images import encode, photo

SOURCE = get_source("files")
OPTIONS = InputConfig("files").options


def _write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    _write(root / "a" / "cat.jpg", encode(photo(40, 30, seed=1), "JPEG", quality=90))
    _write(root / "a" / "cat.txt", "a cat on a mat".encode())
    _write(root / "a" / "cat.json", json.dumps({"url": "http://x/cat.jpg", "license": "cc0"}).encode())
    _write(root / "dog.png", encode(photo(30, 20, seed=2), "PNG"))
    _write(root / "fake.jpg", b"this is no jpeg")
    _write(root / "anim.gif", encode(photo(20, 20, seed=3), "GIF"))
    _write(root / "orphan.txt", b"a caption without its image")
    _write(root / "notes.pdf", b"%PDF-1.4")
    _write(root / ".DS_Store", b"\0")
    return root


def _items(folder):
    return {item.key: item for item in SOURCE.list_items(Listing.of(list_entries([str(folder)])), OPTIONS)}


def _rows(folder):
    return {key: SOURCE.read(item.task(), {}, OPTIONS)[0] for key, item in _items(folder).items()}


def test_files_group_by_key_relative_to_the_input_and_hidden_files_are_not_samples(folder):
    items = _items(folder)
    assert sorted(items) == ["a/cat", "anim", "dog", "fake", "notes", "orphan"]
    cat = items["a/cat"]
    assert (cat.name, cat.text, cat.json) == (str(folder / "a/cat.jpg"), str(folder / "a/cat.txt"),
                                              str(folder / "a/cat.json"))
    assert cat.size == (folder / "a/cat.jpg").stat().st_size
    assert items["orphan"].image is None and items["orphan"].name == str(folder / "orphan.txt")


def test_a_new_caption_is_a_changed_item(folder):
    before = _items(folder)["a/cat"].version()
    _write(folder / "a" / "cat.txt", "a different caption, written later".encode())
    os.utime(folder / "a" / "cat.txt", (1, 1))
    assert _items(folder)["a/cat"].version() != before


def test_a_sample_reads_into_the_columns_a_tar_sample_does(folder):
    row = _rows(folder)["a/cat"]
    data = (folder / "a/cat.jpg").read_bytes()
    assert row[S.STATUS] == "ok" and row[S.ERROR] is None and row[S.IMAGE] == data
    assert (row[S.KEY], row[S.MEMBER], row[S.OFFSET], row[S.SIZE], row[S.IMAGE_FORMAT]) == (
        "a/cat", "cat.jpg", 0, len(data), "jpg")
    assert row[S.CAPTION] == "a cat on a mat" and row[S.URL] == "http://x/cat.jpg"
    assert json.loads(row[S.METADATA_JSON]) == {"url": "http://x/cat.jpg", "license": "cc0"}


def test_files_that_are_no_scorable_image_get_a_status_each(folder):
    rows = _rows(folder)
    assert rows["anim"][S.STATUS] == "unsupported_format" and "anim.gif" in rows["anim"][S.ERROR]
    assert rows["orphan"][S.STATUS] == "no_image" and rows["orphan"][S.CAPTION] == "a caption without its image"
    assert rows["notes"][S.STATUS] == "no_image"
    batch = {name: np.array([rows[k].get(name) for k in ("dog", "fake")], dtype=object)
             for name in (S.IMAGE, S.STATUS, S.ERROR, S.KEY)}
    decoded = Decode(DecodeConfig(), image_size=32)(batch)
    assert list(decoded[S.STATUS]) == ["ok", "decode_error"]


def test_a_file_gone_since_the_listing_is_a_storage_error_row(folder):
    item = _items(folder)["dog"]
    (folder / "dog.png").unlink()
    with pytest.raises(StorageError, match="dog.png"):
        SOURCE.read(item.task(), {}, OPTIONS)
    read = ReadItems("files", OPTIONS)
    (table,) = read({"unit": np.array(["u"]), "items": np.array([json.dumps([item.task()])])})
    assert table.to_pylist()[0][S.STATUS] == "storage_error" and table[S.SHARD][0].as_py() == item.name


def test_a_rows_image_reads_back_from_its_file(folder):
    row = {**_rows(folder)["a/cat"], S.SHARD: str(folder / "a/cat.jpg")}
    assert SOURCE.owns_row(row[S.SHARD], row[S.MEMBER])
    assert fetch_image(row) == (folder / "a/cat.jpg").read_bytes()
