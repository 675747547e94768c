"""What every input format shares: listing, auto-detection, options, and the units new items form."""

from __future__ import annotations

import os

import pytest
from fsspec.implementations.local import LocalFileSystem

from pipeline.config import ConfigError, InputConfig, ScoreConfig
from pipeline.errors import InputError
from pipeline.sources import list_items, source_names
from pipeline.sources.base import Entry, list_entries, plan_sticky_units
from pipeline.sources.files import ImageFile


def _touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_each_module_with_a_source_is_a_format():
    assert {"webdataset", "files"} <= set(source_names())


def test_a_folder_lists_every_file_below_it_and_a_glob_or_a_file_brings_its_siblings(tmp_path):
    for name in ("a/1.jpg", "a/1.txt", "a/2.jpg", "b/3.png", "b/3.json"):
        _touch(tmp_path / name)
    assert [e.relative for e in list_entries([str(tmp_path)])] == ["a/1.jpg", "a/1.txt", "a/2.jpg", "b/3.json",
                                                                    "b/3.png"]
    assert [e.relative for e in list_entries([str(tmp_path / "a" / "*.jpg")])] == ["1.jpg", "1.txt", "2.jpg"]
    assert [e.relative for e in list_entries([str(tmp_path / "b" / "3.png")])] == ["3.json", "3.png"]
    with pytest.raises(InputError, match="does not exist"):
        list_entries([str(tmp_path / "missing")])


def test_a_local_folder_is_listed_as_fsspec_lists_it_links_and_all(tmp_path):
    """A local folder is walked without fsspec (a third of the time at 696,000 files), but a file's size and
    ETag stay what fsspec's listing gave, so units committed from either are not seen as changed."""
    for name in ("00000.tar", "00000.parquet", "sub/00001.tar"):
        _touch(tmp_path / "in" / name)
    _touch(tmp_path / "elsewhere" / "00002.tar", b"target bytes")
    (tmp_path / "in" / "00002.tar").symlink_to(tmp_path / "elsewhere" / "00002.tar")
    (tmp_path / "in" / "dangling.tar").symlink_to(tmp_path / "missing.tar")
    (tmp_path / "in" / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    os.utime(tmp_path / "in" / "00002.tar", (1, 1), follow_symlinks=False)  # the link's own mtime, not its target's

    ours = {e.uri: (e.size, e.etag) for e in list_entries([str(tmp_path / "in")])}
    fs = LocalFileSystem()
    theirs = {path: (Entry(path, info, "").size, Entry(path, info, "").etag)
              for path, info in fs.find(str(tmp_path / "in"), detail=True).items()}
    assert ours == theirs
    assert ours[str(tmp_path / "in" / "00002.tar")] == (len(b"target bytes"), "1.0")
    assert ours[str(tmp_path / "in" / "dangling.tar")][0] == 0


def _config(tmp_path, fmt="auto", **options):
    return ScoreConfig(input=(str(tmp_path / "in"),), output=str(tmp_path / "out"), source=InputConfig(fmt, options))


def test_auto_reads_the_one_format_that_fits_and_asks_when_several_or_none_do(tmp_path):
    _touch(tmp_path / "in" / "00000.tar")
    _touch(tmp_path / "in" / "00000.parquet")
    _touch(tmp_path / "in" / "cover.jpg")  # a stray image beside shards does not make them loose files
    assert list_items(_config(tmp_path))[0].name == "webdataset"
    (tmp_path / "in" / "00000.tar").unlink()
    with pytest.raises(InputError, match="could be read as .*; say which with --input-format") as ambiguous:
        list_items(_config(tmp_path))
    assert "files" in str(ambiguous.value) and "webdataset" in str(ambiguous.value)
    source, items = list_items(_config(tmp_path, "files"))
    assert source.name == "files" and [i.key for i in items] == ["00000", "cover"]
    for path in (tmp_path / "in").iterdir():
        path.unlink()
    _touch(tmp_path / "in" / "notes.md")
    with pytest.raises(InputError, match="nothing to score under .*--input-format"):
        list_items(_config(tmp_path))


def test_options_are_checked_and_typed_by_their_format_once_it_is_known(tmp_path):
    assert InputConfig("files", {"files_per_unit": "5"}).options.files_per_unit == 5
    with pytest.raises(ConfigError, match=r"input format files has no option\(s\) \['image_column'\]; it takes: "
                                          r"files_per_unit"):
        InputConfig("files", {"image_column": "jpg"})
    with pytest.raises(ConfigError, match="files_per_unit='many' must be int"):
        InputConfig("files", {"files_per_unit": "many"})
    with pytest.raises(ConfigError, match="files_per_unit must be a whole number >= 1"):
        InputConfig("files", {"files_per_unit": 0})
    with pytest.raises(ConfigError, match="input format 'zip' is not one of auto, "):
        InputConfig("zip")
    with pytest.raises(ConfigError, match="input format webdataset has no option"):
        InputConfig("webdataset", {"files_per_unit": 3})
    _touch(tmp_path / "in" / "1.jpg")
    with pytest.raises(ConfigError, match="input format files has no option"):  # auto: checked once resolved
        list_items(_config(tmp_path, "auto", nope=1))


def _item(name):
    return ImageFile(name=name, key=name.rsplit("/", 1)[-1].split(".")[0], image=name, text=None, json=None, extra=(), size=1,
                     etag="1")


def test_committed_items_keep_their_unit_and_new_items_form_new_units_named_by_their_first_item():
    items = [_item(f"/in/{n}.jpg") for n in ("b", "d", "f")]
    first = plan_sticky_units(items, 2, {})
    assert sorted([i.key for i in u.shards] for u in first) == [["b", "d"], ["f"]]
    records = {u.unit_id: {"shards": u.versions()} for u in first}
    committed = {v["name"]: u for u, record in records.items() for v in record["shards"]}
    later = plan_sticky_units(items + [_item("/in/a.jpg"), _item("/in/c.jpg"), _item("/in/e.jpg")], 2, committed)
    by_id = {u.unit_id: sorted(i.key for i in u.shards) for u in later}
    assert {u: by_id[u] for u in records} == {u.unit_id: sorted(i.key for i in u.shards) for u in first}
    new = sorted(v for u, v in by_id.items() if u not in records)
    assert new == [["a", "c"], ["e"]]
    again = plan_sticky_units(items + [_item("/in/a.jpg"), _item("/in/c.jpg"), _item("/in/e.jpg")], 2, committed)
    assert [u.unit_id for u in again] == [u.unit_id for u in later]


def test_the_command_line_names_the_format_and_its_options_and_a_bad_one_is_a_usage_error(tmp_path, capsys):
    from pipeline.cli import build_parser, config_from_args, main

    args = build_parser().parse_args(["score", "--input", "in", "--output", "out", "--input-format", "files",
                                      "--input-option", "files_per_unit=7"])
    assert config_from_args(args).source == InputConfig("files", {"files_per_unit": 7})
    code = main(["score", "--input", str(tmp_path), "--output", str(tmp_path / "out"), "--input-format", "files",
                 "--input-option", "files_per_unit=lots"])
    assert code == 2
    assert capsys.readouterr().err.strip() == "aesthetics: input option files_per_unit='lots' must be int"
