"""The same end-to-end checks over every input format, each input built from the sample dataset's images:
score, rerun (nothing rescored), add an item and run again (only it scored), the cutoff table against the
rows, and every image read back from where its row says it lies."""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from pipeline import schema as S
from pipeline.analysis.reading import fetch_images, open_scores
from pipeline.config import InputConfig
from pipeline.io import listing
from pipeline.io import units as unit_table
from pipeline.runner import RunSummary, run_score
from pipeline.status import unit_status
from tests.sources.inputs import copy_shards, tar_member_bytes, write_loose_files, write_parquet_files

pytestmark = pytest.mark.integration


def add_shard(tars: list[str], target: Path) -> None:
    copy_shards(tars, target)


def add_one_file(tars: list[str], target: Path) -> None:
    """One image (and its caption files) of the withheld shard, into a folder already scored."""
    staging = target.parent / "withheld-files"
    write_loose_files(tars, staging)
    image = sorted(staging.glob("*/*.jpg"))[0]
    for sibling in image.parent.glob(f"{image.stem}.*"):
        shutil.copy(sibling, target / "00000" / sibling.name)


@dataclass(frozen=True)
class Format:
    build: Callable[[list[str], Path], None]  # the input from some of the sample's tars
    add: Callable[[list[str], Path], None]  # one new work item from the withheld tar
    options: dict


FORMATS = {
    "webdataset": Format(copy_shards, add_shard, {}),
    "files": Format(write_loose_files, add_one_file, {}),
    "parquet": Format(write_parquet_files, write_parquet_files,
                      {"image_column": "jpg", "key_column": "key", "caption_column": "caption"}),
}


@dataclass
class Runs:
    format: str
    output: str
    first: RunSummary
    rerun: RunSummary
    nightly: RunSummary
    unit_versions_before: dict[str, tuple[int, int]]
    unit_versions_after: dict[str, tuple[int, int]]
    pending_before_nightly: dict[str, str]  # what `aesthetics status` said once the item was added
    originals: dict[str, bytes]  # sha256 -> bytes of every image of the sample
    first_images: set[str]  # sha256 of the images in the first run's input


@pytest.fixture(scope="module", params=sorted(FORMATS))
def runs(request, sample_dataset, scoring, ray_local, tmp_path_factory) -> Runs:
    fmt = FORMATS[request.param]
    root = tmp_path_factory.mktemp(f"source-{request.param}")
    tars = sorted(sample_dataset.tar_paths)
    fmt.build(tars[:-1], root / "input")
    output = str(root / "scores")
    config = scoring.config(str(root / "input"), output, source=InputConfig(request.param, fmt.options))
    with pytest.MonkeyPatch.context() as patch:
        # One kept file listed again: with a handful of items, an incremental listing then skips most of them.
        patch.setattr(listing, "OVERLAP", 1)
        first = run_score(config)
        rerun = run_score(config)
        before = unit_table.versions(output)
        fmt.add(tars[-1:], root / "input")
        pending = unit_status(output).pending
        nightly = run_score(config)
    return Runs(request.param, output, first, rerun, nightly, before, unit_table.versions(output), pending,
                tar_member_bytes(tars), set(tar_member_bytes(tars[:-1])))


def rows(output: str):
    return open_scores(output).to_table()


def test_every_work_item_is_scored_once_and_its_images_are_the_samples(runs):
    assert runs.first.ok and runs.first.units_committed and not runs.first.units_failed
    table = rows(runs.output)
    ok = table.filter(pc.equal(table[S.STATUS], S.Status.OK.value))
    assert ok.num_rows > 0 and ok.num_rows == runs.first.scored + runs.nightly.scored
    assert set(ok[S.IMAGE_SHA256].to_pylist()) <= set(runs.originals)
    first = ok.filter(pc.is_in(ok[S.UNIT], pa.array(runs.first.units_committed)))
    assert sorted(first[S.IMAGE_SHA256].to_pylist()) == sorted(runs.first_images)  # every image, once, in any format
    assert pc.all(pc.is_finite(ok[S.AESTHETIC_SCORE])).as_py()
    pairs = list(zip(table[S.SHARD].to_pylist(), table[S.KEY].to_pylist()))
    assert len(pairs) == len(set(pairs))  # exactly once: no (item, key) twice


def test_a_rerun_scores_nothing(runs):
    assert runs.rerun.ok and runs.rerun.units_committed == [] and runs.rerun.rows == 0
    assert runs.rerun.units_done_before == runs.rerun.units_total == len(runs.first.units_committed)


def test_a_new_item_is_all_the_next_run_scores(runs):
    nightly = runs.nightly
    assert nightly.ok and len(nightly.units_committed) == 1 and nightly.pending_reasons == {
        nightly.units_committed[0]: "new"}
    assert {u: runs.unit_versions_after[u] for u in runs.unit_versions_before} == runs.unit_versions_before
    table = rows(runs.output)
    new_rows = table.filter(pc.equal(table[S.UNIT], nightly.units_committed[0]))
    assert new_rows.num_rows == nightly.rows > 0
    assert table.num_rows == runs.first.rows + nightly.rows


def test_status_lists_the_input_as_its_format_and_finds_what_is_pending(runs):
    assert runs.pending_before_nightly == {runs.nightly.units_committed[0]: "new"}
    report = unit_status(runs.output)
    assert report.pending == {} and report.failed == {} and report.input == runs.first.input
    # Numbered shards are listed from where the last run's listing ended; other formats in full.
    assert ("listed after" in report.listed) == (runs.format == "webdataset"), report.listed
    assert sum(report.rows_by_model.values()) == runs.first.rows + runs.nightly.rows


def test_the_cutoff_table_counts_the_committed_rows(runs):
    (cutoffs,) = runs.nightly.cutoffs
    table = rows(runs.output)
    assert cutoffs.rows == table.num_rows
    assert dict(cutoffs.counts_by_status) == {k: v for k, v in zip(*pc.value_counts(table[S.STATUS]).flatten())
                                              for k, v in [(k.as_py(), v.as_py())]}
    scores = table.filter(pc.equal(table[S.STATUS], S.Status.OK.value))[S.AESTHETIC_SCORE].to_pylist()
    assert [row.count for row in cutoffs.rows_by_threshold] == [sum(s >= row.threshold for s in scores)
                                                              for row in cutoffs.rows_by_threshold]


def test_every_image_reads_back_as_the_original_bytes(runs):
    table = rows(runs.output)
    ok = table.filter(pc.equal(table[S.STATUS], S.Status.OK.value)).to_pylist()
    fetched = fetch_images(ok)
    assert [hashlib.sha256(data).hexdigest() for data in fetched] == [row[S.IMAGE_SHA256] for row in ok]
    assert all(data == runs.originals[row[S.IMAGE_SHA256]] for data, row in zip(fetched, ok))
