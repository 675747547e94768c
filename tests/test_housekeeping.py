"""`optimize` compacts without changing what any reader sees, and rescoring still replaces a unit's rows;
`vacuum` deletes what no table version within the retention reads, and nothing a reader still needs."""

from __future__ import annotations

import os
import shutil

import pytest

from pipeline.errors import InputError
from pipeline.housekeeping import compact_when_fragmented, optimize, vacuum
from pipeline.io import units
from pipeline.io.commits import UnitCommitter, data_file_name
from pipeline.io.delta import committed_files, open_table
from tests.io.test_commits import SCHEMA, _commit, _keys, _record, _write


def test_vacuum_deletes_replaced_versions_and_stopped_runs_files_only(tmp_path):
    committer = UnitCommitter(str(tmp_path))
    _commit(committer, tmp_path, "u1", [5.5])
    _commit(committer, tmp_path, "u2", [6.6])
    _commit(committer, tmp_path, "u1", [5.7])  # replaces u1's version 1
    leftover = tmp_path / data_file_name("u3", 1, "5-6")  # written, never committed
    shutil.copy(tmp_path / data_file_name("u1", 2, "5-6"), leftover)
    keys_before = sorted(open_table(str(tmp_path)).to_pyarrow_table(columns=["key"])["key"].to_pylist())

    kept = vacuum(str(tmp_path))  # the default retention keeps a week of versions: nothing is old enough
    assert kept.data_files == []
    listed = vacuum(str(tmp_path), retention_hours=0, dry_run=True)
    assert sorted(path.rsplit("/", 1)[-1] for path in listed.data_files) == ["u1.v1.parquet", "u3.v1.parquet"]
    assert leftover.exists()

    vacuum(str(tmp_path), retention_hours=0)
    assert not leftover.exists() and not (tmp_path / data_file_name("u1", 1, "5-6")).exists()
    assert all(os.path.exists(path) for path in committed_files(str(tmp_path)))
    assert sorted(open_table(str(tmp_path)).to_pyarrow_table(columns=["key"])["key"].to_pylist()) == keys_before


def _band_files(output) -> list[str]:
    return sorted(path.rsplit("/", 1)[-1] for path in committed_files(str(output)))


def test_optimize_compacts_each_band_and_every_reader_sees_the_same_rows(tmp_path):
    import polars as pl

    committer = UnitCommitter(str(tmp_path))
    for unit, scores in (("u1", [5.1, 5.2]), ("u2", [5.3, 6.7]), ("u3", [5.4])):
        _commit(committer, tmp_path, unit, scores)
    before = _keys(tmp_path)
    unit_rows = units.read_table(str(tmp_path)).to_pylist()

    result = optimize(str(tmp_path))
    assert (result.files_removed, result.files_added) == (3, 1), "the 5-6 band's three; 6.5+ has one file only"
    assert result.unit_files_removed >= 3 and result.unit_files_added == 1
    assert _keys(tmp_path) == before
    assert sorted(pl.read_delta(str(tmp_path))["key"].to_list()) == before
    assert units.read_table(str(tmp_path)).to_pylist() == unit_rows
    assert any(name.endswith(".checkpoint.parquet") for name in os.listdir(tmp_path / "_delta_log"))


def test_scoring_a_unit_again_after_optimize_replaces_its_rows_in_the_compacted_file(tmp_path):
    committer = UnitCommitter(str(tmp_path))
    for unit, scores in (("u1", [5.1, 5.2]), ("u2", [5.3]), ("u3", [5.4])):
        _commit(committer, tmp_path, unit, scores)
    optimize(str(tmp_path))

    committer = UnitCommitter(str(tmp_path))
    version = committer.next_version("u2")
    files = _write(tmp_path, "u2", version, [4.9, 6.8])
    data_version = committer.commit("u2", version, files, SCHEMA, _record("u2", [4.9, 6.8]))
    assert _keys(tmp_path) == ["u1-5.1", "u1-5.2", "u2-4.9", "u2-6.8", "u3-5.4"]
    assert committer.commit("u2", version, files, SCHEMA, _record("u2", [4.9, 6.8])) == data_version, \
        "the same version again is a no-op"
    assert units.versions(str(tmp_path))["u2"] == (2, data_version)
    assert open_table(str(tmp_path)).transaction_version("u2") == 2

    version = committer.next_version("u1")  # the snapshot is read again after a replacement
    committer.commit("u1", version, _write(tmp_path, "u1", version, [7.0]), SCHEMA, _record("u1", [7.0]))
    assert _keys(tmp_path) == ["u1-7.0", "u2-4.9", "u2-6.8", "u3-5.4"]


def test_a_unit_committed_after_optimize_outside_the_compacted_range_is_added_by_name(tmp_path):
    committer = UnitCommitter(str(tmp_path))
    _commit(committer, tmp_path, "u1", [5.1])
    _commit(committer, tmp_path, "u2", [5.2])
    optimize(str(tmp_path))
    _commit(UnitCommitter(str(tmp_path)), tmp_path, "u9", [5.3])
    assert "u9.v1.parquet" in _band_files(tmp_path)
    assert _keys(tmp_path) == ["u1-5.1", "u2-5.2", "u9-5.3"]


def test_a_run_compacts_only_once_the_table_holds_enough_small_files(tmp_path):
    committer = UnitCommitter(str(tmp_path))
    for unit, score in (("u1", 5.1), ("u2", 5.2), ("u3", 5.3)):
        _commit(committer, tmp_path, unit, [score])
    assert compact_when_fragmented(str(tmp_path), at=4) is None
    assert compact_when_fragmented(str(tmp_path), at=0) is None, "0: never"
    assert _band_files(tmp_path) == ["u1.v1.parquet", "u2.v1.parquet", "u3.v1.parquet"]
    compacted = compact_when_fragmented(str(tmp_path), at=3)
    assert (compacted.files_removed, compacted.files_added) == (3, 1)
    assert _keys(tmp_path) == ["u1-5.1", "u2-5.2", "u3-5.3"]
    assert compact_when_fragmented(str(tmp_path), at=3) is None, "one small file left"
    assert compact_when_fragmented(str(tmp_path / "empty"), at=1) is None, "no table: nothing to compact"


def test_optimize_can_zorder_by_score_and_refuses_unknown_columns_and_missing_tables(tmp_path):
    committer = UnitCommitter(str(tmp_path))
    _commit(committer, tmp_path, "u1", [5.1, 5.9])
    _commit(committer, tmp_path, "u2", [5.5])
    assert optimize(str(tmp_path), zorder_by=["aesthetic_score"]).zorder_by == ("aesthetic_score",)
    assert _keys(tmp_path) == ["u1-5.1", "u1-5.9", "u2-5.5"]
    with pytest.raises(InputError, match="not a column"):
        optimize(str(tmp_path), zorder_by=["sharpness"])
    with pytest.raises(InputError, match="nothing to optimize"):
        optimize(str(tmp_path / "empty"))


def test_the_optimize_command_says_what_it_did_and_refuses_a_missing_table_in_one_line(tmp_path, capsys):
    from pipeline.cli import main
    from pipeline.errors import ExitCode

    _commit(UnitCommitter(str(tmp_path)), tmp_path, "u1", [5.1])
    _commit(UnitCommitter(str(tmp_path)), tmp_path, "u2", [5.2])
    assert main(["optimize", str(tmp_path)]) == ExitCode.OK
    assert "compacted" in capsys.readouterr().out
    assert main(["optimize", str(tmp_path / "nothing-here")]) == ExitCode.INPUT
    assert capsys.readouterr().err.strip().splitlines() == [
        f"aesthetics: no Delta table under {tmp_path / 'nothing-here'}: nothing to optimize"]
