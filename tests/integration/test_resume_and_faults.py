"""Resuming: nothing lost, nothing twice — a killed driver, a killed actor, shards that arrive later."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow.dataset as pads
import pytest
import torch
from ray import cloudpickle

from pipeline import schema as S
from pipeline.config import DEFAULT_COMPACT_AT
from pipeline.cutoffs import build_tables
from pipeline.io.commits import UNIT_KEY
from pipeline.io.delta import committed_files, open_table
from pipeline.io.units import read_facts, read_units
from pipeline.runner import run_score
from pipeline.status import unit_status
from tests.drivers import kill_when

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def _keys(output: str) -> list[tuple[str, str]]:
    table = pads.dataset(committed_files(output), format="parquet", partitioning="hive").to_table(
        columns=[S.SHARD, S.KEY])
    return list(zip(table[S.SHARD].to_pylist(), table[S.KEY].to_pylist()))


@pytest.fixture(scope="module")
def nine_shards(tmp_path_factory):
    """40 photos + 4 failures through img2dataset, 5 URLs a shard: 9 shards."""
    from pipeline.sample_data import build_sample_dataset

    return build_sample_dataset(tmp_path_factory.mktemp("nine"), n_images=40, images_per_shard=5)


def _score_command(shards: str, output: str, scoring) -> list[str]:
    command = [sys.executable, "-m", "jobs.score", "--input", shards, "--output", output, "--model", "tiny-random",
               "--precision", "fp32", "--shards-per-unit", "1", "--batch-size", "8", "--decode-batch-size", "8"]
    for directory in scoring.weights_dirs:
        command += ["--weights-dir", directory]
    for head in scoring.heads:
        command += ["--head", f"{head.weights.uri},sha256={head.weights.sha256}"]
    return command


def test_a_driver_killed_mid_run_resumes_and_every_key_lands_once(nine_shards, scoring, tmp_path):
    output = str(tmp_path / "scores")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    command = _score_command(nine_shards.shards_dir, output, scoring)
    log_folder = Path(output) / "_delta_log"  # one commit (file) per unit

    def commits() -> int:
        return len(list(log_folder.glob("*.json"))) if log_folder.exists() else 0

    kill_when(command, tmp_path / "first.log", commits)
    committed_at_kill = commits()
    assert 1 <= committed_at_kill < 9
    print(f"killed the driver with {committed_at_kill} of 9 units committed")

    rerun = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    print(rerun.stdout[-3000:])
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads(sorted((Path(output) / "_runs").glob("*.json"))[-1].read_text())
    assert summary["units_done_before"] >= committed_at_kill
    assert len(summary["units_committed"]) + summary["units_done_before"] == 9
    keys = _keys(output)
    assert len(keys) == len(set(keys)) == len(nine_shards.all_keys)
    assert sorted(k for _, k in keys) == nine_shards.all_keys
    assert not (Path(output) / "_staging").exists() or not any((Path(output) / "_staging").iterdir())


def test_a_driver_killed_between_the_data_and_the_unit_commit_leaves_every_key_once(nine_shards, scoring,
                                                                                     ray_local, tmp_path):
    output = str(tmp_path / "scores")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    command = _score_command(nine_shards.shards_dir, output, scoring)
    command[1:3] = ["-m", "tests.integration.killed_between_commits"]
    driver = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        log, _ = driver.communicate(timeout=300)
    finally:
        try:
            os.killpg(driver.pid, signal.SIGKILL)  # whatever of the local Ray outlived its driver
        except ProcessLookupError:
            pass
    assert driver.returncode == -signal.SIGKILL, log.decode(errors="replace")[-2000:]
    visible = _keys(output)
    assert visible and not os.path.exists(os.path.join(output, "_units")), "one unit's rows, and no unit row yet"

    rerun = run_score(scoring.config(nine_shards.shards_dir, output))
    records = read_units(output)
    assert len(records) == 9 and rerun.units_done_before == 1 and len(rerun.units_committed) == 8
    assert len([r for r in records.values() if r["run_id"] != rerun.run_id]) == 1, "the killed run's unit, rolled forward"
    keys = _keys(output)
    assert len(keys) == len(set(keys)) and sorted(k for _, k in keys) == nine_shards.all_keys
    assert unit_status(output).pending == {}
    table = pads.dataset(committed_files(output), format="parquet").to_table(columns=[S.AESTHETIC_SCORE])
    scores = [s for s in table[S.AESTHETIC_SCORE].to_pylist() if s is not None]
    (cutoffs,) = build_tables(read_facts(output).values())
    assert [row.count for row in cutoffs.rows_by_threshold] == [sum(s >= t for s in scores)
                                                                for t in S.LAION_THRESHOLDS]


@pytest.mark.parametrize("compact_at", [DEFAULT_COMPACT_AT, 1], ids=["files-per-unit", "compacted-by-every-run"])
def test_nightly_scores_only_the_shards_that_arrived_since(nine_shards, scoring, ray_local, tmp_path, compact_at):
    """Also when every run compacts the table at its end: a unit's rows then share files with other units'."""
    shards = tmp_path / "shards"
    shards.mkdir()
    source = Path(nine_shards.shards_dir)
    for stem in ("00000", "00001", "00002"):
        for suffix in (".tar", ".parquet"):
            shutil.copy(source / f"{stem}{suffix}", shards)
    output = str(tmp_path / "scores")
    config = dataclasses.replace(scoring.config(str(shards), output), compact_at=compact_at)
    first = run_score(config)
    assert len(first.units_committed) == 3
    assert bool(first.compacted) == (compact_at == 1)
    if compact_at == 1:  # compacted while it committed, not only once at its end
        history = open_table(output).history()
        optimized = [entry["version"] for entry in history if entry.get("operation") == "OPTIMIZE"]
        committed = [entry["version"] for entry in history if UNIT_KEY in entry]
        assert optimized and min(optimized) < max(committed), history
    files_per_band = Counter(re.search(r"score_band=([^/]+)/", uri).group(1) for uri in committed_files(output))
    assert (max(files_per_band.values()) == 1) == (compact_at == 1), files_per_band
    before = read_units(output)

    for stem in ("00003", "00004"):
        for suffix in (".tar", ".parquet"):
            shutil.copy(source / f"{stem}{suffix}", shards)
    assert set(unit_status(output).pending.values()) == {"new"}
    second = run_score(config)
    assert set(second.pending_reasons.values()) == {"new"} and len(second.units_committed) == 2
    after = read_units(output)
    assert all(after[unit]["run_id"] == before[unit]["run_id"] for unit in before)  # untouched
    assert len(_keys(output)) == sum(m["rows"] for m in after.values())

    third = run_score(config)
    assert third.units_committed == [] and third.units_done_before == 5

    rescored = dataclasses.replace(config, model=dataclasses.replace(config.model, seed=1))
    stale = run_score(rescored)
    assert stale.units_committed == [] and len(stale.units_stale) == 5  # never silently
    redone = run_score(dataclasses.replace(rescored, rescore=True))
    assert len(redone.units_committed) == 5
    keys = _keys(output)
    assert len(keys) == len(set(keys)) == sum(m["rows"] for m in read_units(output).values())
    scores = pads.dataset(committed_files(output), format="parquet").to_table(columns=[S.AESTHETIC_SCORE])
    scores = [s for s in scores[S.AESTHETIC_SCORE].to_pylist() if s is not None]
    (cutoffs,) = build_tables(read_facts(output).values())
    assert [row.count for row in cutoffs.rows_by_threshold] == [sum(s >= t for s in scores)
                                                                for t in S.LAION_THRESHOLDS]


class _DiesOnFirstBatch(torch.nn.Module):
    """Wraps the CLIP model; the first encode_image call anywhere kills its whole process."""

    def __init__(self, model: torch.nn.Module, marker: str):
        super().__init__()
        self.inner = model
        self.marker = marker

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        if not os.path.exists(self.marker):
            Path(self.marker).write_text(str(os.getpid()))
            os._exit(1)
        return self.inner.encode_image(images)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.inner.encode_text(tokens)


def _loader_that_dies_once(model_config, heads, search_dirs, marker: str):
    from pipeline.stages.embed import load_clip_and_heads

    clip, bank = load_clip_and_heads(model_config, heads, search_dirs)
    return dataclasses.replace(clip, model=_DiesOnFirstBatch(clip.model, marker)), bank


def test_an_actor_killed_mid_batch_loses_and_duplicates_nothing(sample_dataset, scoring, ray_local, tmp_path):
    import functools

    import tests.integration.test_resume_and_faults as this_module

    cloudpickle.register_pickle_by_value(this_module)
    output = str(tmp_path / "scores")
    config = scoring.config(sample_dataset.shards_dir, output)
    marker = str(tmp_path / "actor-died")
    loader = functools.partial(_loader_that_dies_once, config.model, config.heads, config.weights_dirs, marker)
    summary = run_score(config, embed_loader=loader)
    assert Path(marker).exists(), "the actor never died: the test tested nothing"
    assert summary.ok
    keys = _keys(output)
    assert len(keys) == len(set(keys))
    assert sorted(k for _, k in keys) == sample_dataset.all_keys
