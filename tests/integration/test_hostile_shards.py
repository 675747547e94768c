"""A corpus of hostile shards. The job finishes, every row says what happened to it,
unreadable shards are named by a row of their own, and nothing is written outside the output."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from pipeline import schema as S
from pipeline.io.delta import committed_files
from pipeline.io.tar_reader import IMAGE_EXTENSIONS, MAX_TEXT_BYTES
from pipeline.io.units import read_units
from pipeline.runner import run_score
from tests.hostile_images import encode, hostile_corpus, photo
from tests.tarfiles import make_sidecar, make_tar, sidecar_row

pytestmark = pytest.mark.integration


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory, scoring, ray_local):
    root = tmp_path_factory.mktemp("hostile")
    workdir = tmp_path_factory.mktemp("cwd")  # the driver's working directory must stay empty
    previous = os.getcwd()
    os.chdir(workdir)
    shards = root / "shards"
    shards.mkdir()
    good = encode(photo(64, 48), "JPEG", quality=90)
    corpus = hostile_corpus()
    members = []
    for name, case in corpus.items():
        if case.data is not None:
            members.append((f"img_{name}.{case.ext}", case.data))
        members.append((f"img_{name}.txt", f"caption of {name}".encode()))
    members += [
        ("captiononly.txt", b"a caption whose image never came"),
        ("badjson.jpg", good), ("badjson.json", b"{\"caption\": broken"),
        ("apart.jpg", good), ("between.jpg", good), ("apart.txt", b"members not adjacent"),
        ("dup.jpg", good), ("dup.jpg", b"second copy"),
        ("../../escape.jpg", good), ("../../escape.txt", b"dot dot slash"),
        ("hugecaption.jpg", good), ("hugecaption.txt", b"x" * (MAX_TEXT_BYTES + 10)),
        ("latin1.jpg", good), ("latin1.txt", "café crème".encode("latin-1")),
    ]
    (shards / "00000.tar").write_bytes(make_tar(members))
    (shards / "00000.parquet").write_bytes(make_sidecar([
        sidecar_row("apart", caption="sidecar caption wins"), sidecar_row("gone", status="failed_to_download")]))
    truncated = make_tar([("t1.jpg", good), ("t2.jpg", good * 3), ("t3.jpg", good)])
    (shards / "00001.tar").write_bytes(truncated[: len(truncated) // 2])
    (shards / "00001.parquet").write_bytes(make_sidecar([sidecar_row(k) for k in ("t1", "t2", "t3")]))
    (shards / "00002.tar").write_bytes(b"definitely not a tar " * 100)
    (shards / "00003.tar").write_bytes(b"")
    (shards / "00004.tar").write_bytes(make_tar([("lonely.jpg", good)]))
    (shards / "00005.parquet").write_bytes(make_sidecar([sidecar_row("orphan"), sidecar_row("orphan2", status="failed_to_download")]))

    output = root / "out"
    before = _tree(root)
    try:
        summary = run_score(scoring.config(str(shards), str(output)))
    finally:
        os.chdir(previous)
    after = _tree(root)
    table = pads.dataset(committed_files(str(output)), format="parquet", partitioning="hive").to_table()
    rows = {(Path(r[S.SHARD]).name, r[S.KEY]): r for r in table.to_pylist()}
    print("\nhostile corpus, one line per output row (pytest -s shows it):")
    for (shard, key), row in sorted(rows.items()):
        print(f"  {shard:14} {key[:22]!r:26} {row[S.STATUS]:18} {(row[S.ERROR] or '')[:70]}")
    return {"summary": summary, "rows": rows, "corpus": corpus, "new_paths": after - before,
            "cwd_new": set(os.listdir(workdir)), "output": str(output), "table": table}


def test_the_job_finishes_and_commits_every_shard(hostile_run):
    summary = hostile_run["summary"]
    assert summary.ok, summary.units_failed
    assert len(read_units(hostile_run["output"])) == 6


def test_every_hostile_image_gets_the_status_the_corpus_names(hostile_run):
    rows = hostile_run["rows"]
    for name, case in hostile_run["corpus"].items():
        row = rows[("00000.tar", f"img_{name}")]
        expected = case.status if case.ext in IMAGE_EXTENSIONS or case.data is None else S.Status.UNSUPPORTED_FORMAT
        assert row[S.STATUS] == expected.value, (name, row[S.ERROR])
        assert row[S.CAPTION] == f"caption of {name}"
        if expected is not S.Status.OK:
            assert row[S.ERROR]


def test_odd_members_and_captions(hostile_run):
    rows = hostile_run["rows"]
    def row(key):
        return rows[("00000.tar", key)]
    assert row("captiononly")[S.STATUS] == S.Status.NO_IMAGE.value
    assert row("badjson")[S.STATUS] == "ok" and "not valid JSON" in row("badjson")[S.ERROR]
    assert row("apart")[S.CAPTION] == "sidecar caption wins" and row("apart")[S.STATUS] == "ok"
    assert row("dup")[S.STATUS] == "ok" and "ignored" in row("dup")[S.ERROR]
    assert row("../../escape")[S.STATUS] == "ok" and row("../../escape")[S.CAPTION] == "dot dot slash"
    assert len(row("hugecaption")[S.CAPTION]) == MAX_TEXT_BYTES and "cut" in row("hugecaption")[S.ERROR]
    assert row("latin1")[S.CAPTION] == "caf\ufffd cr\ufffdme"
    assert row("gone")[S.STATUS] == S.Status.DOWNLOAD_FAILED.value


def test_unreadable_shards_are_named_never_dropped(hostile_run):
    rows = hostile_run["rows"]
    truncated = {k: r[S.STATUS] for (shard, k), r in rows.items() if shard == "00001.tar"}
    assert set(truncated) == {"t1", "t2", "t3"}  # no extra row: t3 itself says the tar is cut short
    assert truncated["t1"] == "ok" and truncated["t3"] == S.Status.SHARD_ERROR.value
    (entry,) = [s for m in read_units(hostile_run["output"]).values() for s in m["shards"]
                if s["name"].endswith("00001.tar")]
    assert entry["shard_errors"] and entry["counts_by_status"]["shard_error"] >= 1
    for shard in ("00002.tar", "00003.tar"):
        (only,) = [r for (s, _), r in rows.items() if s == shard]
        assert only[S.KEY] == S.SHARD_ROW_KEY and only[S.STATUS] == S.Status.SHARD_ERROR.value and only[S.ERROR]
    assert rows[("00004.tar", "lonely")][S.STATUS] == "ok"
    assert rows[("00005.parquet", "orphan")][S.STATUS] == S.Status.SHARD_ERROR.value
    assert rows[("00005.parquet", "orphan2")][S.STATUS] == S.Status.DOWNLOAD_FAILED.value


def test_nothing_is_written_outside_the_output_prefix(hostile_run):
    assert all(path.startswith("out") for path in hostile_run["new_paths"]), hostile_run["new_paths"]
    assert hostile_run["cwd_new"] == set()
    assert not any("escape" in path for path in hostile_run["new_paths"])
