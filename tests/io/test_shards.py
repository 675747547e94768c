import pytest

from pipeline.io.shards import InputError, list_shards, plan_units


def _touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_a_folder_lists_tars_with_their_sidecars_and_sidecars_without_tars(tmp_path):
    for name in ("00000.tar", "00000.parquet", "00001.tar", "00002.parquet", "00002_stats.json", "other.parquet"):
        _touch(tmp_path / name)
    shards = list_shards([str(tmp_path)])
    assert [(s.stem, bool(s.tar), bool(s.sidecar)) for s in shards] == [
        ("00000", True, True), ("00001", True, False), ("00002", False, True)]


def test_a_glob_and_a_single_file_both_work(tmp_path):
    for name in ("00000.tar", "00000.parquet", "00001.tar"):
        _touch(tmp_path / name)
    assert len(list_shards([str(tmp_path / "*.tar")])) == 2
    single = list_shards([str(tmp_path / "00000.tar")])
    assert len(single) == 1 and single[0].sidecar.endswith("00000.parquet")


def test_nothing_to_score_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        list_shards([str(tmp_path / "missing")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no .tar shards"):
        list_shards([str(tmp_path / "empty")])


def test_units_are_fixed_by_shard_number_so_late_shards_join_the_same_unit(tmp_path):
    for i in range(3):
        _touch(tmp_path / f"{i:05d}.tar")
    first = {u.unit_id: [s.stem for s in u.shards] for u in plan_units(list_shards([str(tmp_path)]), 2).work_units()}
    _touch(tmp_path / "00003.tar")
    second = {u.unit_id: [s.stem for s in u.shards] for u in plan_units(list_shards([str(tmp_path)]), 2).work_units()}
    assert list(first) == list(second)
    unit = list(second)[1]
    assert first[unit] == ["00002"] and second[unit] == ["00002", "00003"]


def test_other_names_go_by_sorted_position_in_their_folder_and_subfolders_are_folders_of_their_own(tmp_path):
    for name in ("zeta.tar", "alpha.tar", "beta.tar", "00004.tar", "sub/00004.tar", "sub/00005.parquet",
                 "1234567890123456789012.tar"):
        _touch(tmp_path / name)
    units = plan_units(list_shards([str(tmp_path)]), 2).work_units()
    grouped = sorted((u.unit_id.rsplit("-", 1)[1], [s.name[len(str(tmp_path)) + 1:] for s in u.shards]) for u in units)
    # A number too long to be img2dataset's is a name like any other: it sorts first among them.
    assert grouped == [("000002", ["00004.tar"]), ("000002", ["sub/00004.tar", "sub/00005.parquet"]),
                       ("n000000", ["1234567890123456789012.tar", "alpha.tar"]), ("n000001", ["beta.tar", "zeta.tar"])]
    by_folder = {u.unit_id.rsplit("-", 1)[0] for u in units}
    assert len(by_folder) == 2  # the folder and its subfolder, each named by its own label
    assert all(u.unit_id.startswith("sub-") for u in units if u.shards[0].name.startswith(str(tmp_path / "sub")))
