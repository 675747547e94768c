"""What a scored prefix holds, as readers that are not ours see it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import schema as S
from pipeline.config import ModelConfig
from pipeline.cutoffs import LAION_PUBLISHED_COUNTS
from pipeline.errors import ExitCode
from pipeline.io import layout, listing
from pipeline.io.delta import committed_files, open_table
from pipeline.io.storage import filesystem, read_json
from pipeline.io.units import read_units
from pipeline.runner import run_score

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def scored(sample_dataset, scoring, ray_local, tmp_path_factory):
    """The sample shards scored with fp16 asked for on a CPU, then a copy of a committed file planted under a
    new name, as a run stopped before its commit would leave it."""
    output = tmp_path_factory.mktemp("prefix") / "scores"
    asked_fp16_on_cpu = ModelConfig(name="tiny-random", precision="fp16", device="cpu")
    summary = run_score(scoring.config(sample_dataset.shards_dir, str(output), model=asked_fp16_on_cpu))
    clean_rows = len(pd.read_parquet(output))  # an analyst's first line, before any leftovers exist
    first = Path(committed_files(str(output))[0])
    shutil.copy(first, first.with_name("stopped-run-leftover.v1.parquet"))
    return {"output": output, "summary": summary, "clean_rows": clean_rows}


def test_a_fresh_prefix_reads_as_plain_parquet_and_records_the_precision_that_ran(scored, sample_dataset):
    summary = scored["summary"]
    assert summary.ok and scored["clean_rows"] == summary.rows
    records = read_units(str(scored["output"])).values()
    assert {(r["precision"], r["precision_requested"], r["clip"]["precision"]) for r in records} == {
        ("fp32", "fp16", "fp32")}
    assert summary.model_key.startswith("tiny-random(seed=0)/fp32|")


def test_every_engine_reads_the_same_committed_rows_and_no_leftover(scored, sample_dataset):
    import duckdb
    import polars as pl
    import ray

    from pipeline.io.delta import table_uri

    output = str(scored["output"])
    expected = sorted(sample_dataset.all_keys)
    dataset = open_table(output).to_pyarrow_dataset()  # noqa: F841 - DuckDB reads it by name
    keys = {
        "polars": pl.read_delta(output)["key"].to_list(),
        "pyarrow": open_table(output).to_pyarrow_table(columns=["key"])["key"].to_pylist(),
        "pandas": open_table(output).to_pandas(columns=["key"])["key"].tolist(),
        "duckdb": [k for (k,) in duckdb.sql("SELECT key FROM dataset").fetchall()],
        "ray": [row["key"] for row in ray.data.read_delta(table_uri(output), columns=["key"]).take_all()],
    }
    assert {engine: sorted(found) for engine, found in keys.items()} == {engine: expected for engine in keys}


def test_the_cutoff_table_equals_counts_recomputed_from_the_rows(scored):
    output = str(scored["output"])
    rows = open_table(output).to_pyarrow_table(columns=[S.STATUS, S.AESTHETIC_SCORE]).to_pandas()
    scores = rows.loc[rows[S.STATUS] == "ok", S.AESTHETIC_SCORE].to_numpy(dtype=np.float64)
    fs, root = filesystem(output)
    (table,) = read_json(fs, root + "/" + layout.CUTOFFS_JSON)["tables"]
    assert {row["threshold"]: row["count"] for row in table["thresholds"]} == {
        threshold: int((scores >= threshold).sum()) for threshold in LAION_PUBLISHED_COUNTS}
    assert table["scored"] == len(scores)


def test_two_runs_started_together_leave_every_key_once(sample_dataset, scoring, tmp_path):
    output = tmp_path / "scores"
    command = [sys.executable, "-m", "pipeline.cli", "score", "--input", sample_dataset.shards_dir,
               "--output", str(output), "--model", "tiny-random", "--precision", "fp32", "--shards-per-unit", "1"]
    for head in scoring.heads:
        command += ["--head", f"{head.weights.uri},sha256={head.weights.sha256}"]
    for directory in scoring.weights_dirs:
        command += ["--weights-dir", directory]
    runs = [subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    outcomes = [(run.wait(timeout=600), run.stderr.read()) for run in runs]
    codes = sorted(code for code, _ in outcomes)
    # The loser of the lease backs off (3), or, if it came late, finds every unit done (0).
    assert codes in ([ExitCode.OK, ExitCode.OK], [ExitCode.OK, ExitCode.BUSY]), outcomes
    keys = open_table(str(output)).to_pyarrow_table(columns=["key"])["key"].to_pylist()
    assert sorted(keys) == sorted(sample_dataset.all_keys)


def test_a_dry_run_prints_the_plan_and_writes_nothing(scored, sample_dataset, scoring):
    output = scored["output"]
    version = open_table(str(output)).version()
    command = [sys.executable, "-m", "pipeline.cli", "nightly", "--input", sample_dataset.shards_dir, "--output",
               str(output), "--model", "tiny-random", "--precision", "fp16", "--device", "cpu", "--dry-run",
               "--shards-per-unit", "1"]
    for head in scoring.heads:
        command += ["--head", f"{head.weights.uri},sha256={head.weights.sha256}"]
    for directory in scoring.weights_dirs:
        command += ["--weights-dir", directory]
    kept = {path: path.read_bytes() for path in (output / listing.FOLDER).iterdir()}
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    units = len(read_units(str(output)))
    assert f"plan: {units} units of 1 shards; {units} done, 0 to do (none)" in result.stdout
    assert open_table(str(output)).version() == version and not (output / layout.LOCK).exists()
    assert {path: path.read_bytes() for path in (output / listing.FOLDER).iterdir()} == kept


def test_a_run_keeps_its_input_listing_and_status_lists_from_it(scored, sample_dataset, capsys):
    from pipeline.cli import main

    output = str(scored["output"])
    (kept,) = (scored["output"] / listing.FOLDER).iterdir()  # one input folder, one kept listing
    assert main(["status", output]) == ExitCode.OK
    text = capsys.readouterr().out
    assert "pending       0 units" in text and "listed after the start" in text, text
    assert main(["status", output, "--listing", "full"]) == ExitCode.OK
    assert "listed: shards: full" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # argparse's usage error: the modes are auto and full
        main(["status", output, "--listing", "sometimes"])
