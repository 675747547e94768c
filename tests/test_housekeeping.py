"""`vacuum` deletes what no table version within the retention reads, and nothing a reader still needs."""

from __future__ import annotations

import os
import shutil

from pipeline.housekeeping import vacuum
from pipeline.io.commits import UnitCommitter, data_file_name
from pipeline.io.delta import committed_files, open_table
from tests.io.test_commits import _commit


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
