"""What a scored prefix holds, as a reader that is not ours sees it."""

from __future__ import annotations

import pandas as pd
import pytest

from pipeline.config import ModelConfig
from pipeline.io.manifests import read_manifests
from pipeline.runner import run_score

pytestmark = pytest.mark.integration


def test_the_prefix_reads_as_a_parquet_dataset_and_records_the_precision_that_ran(sample_dataset, scoring,
                                                                                   ray_local, tmp_path):
    output = tmp_path / "scores"
    asked_fp16_on_cpu = ModelConfig(name="tiny-random", precision="fp16", device="cpu")

    summary = run_score(scoring.config(sample_dataset.shards_dir, str(output), model=asked_fp16_on_cpu))

    frame = pd.read_parquet(output)  # an analyst's first line: nothing but table data where readers look
    assert summary.ok and len(frame) == summary.rows
    assert sorted(frame["key"]) == sorted(sample_dataset.all_keys)
    manifests = read_manifests(str(output)).values()
    assert {(m["precision"], m["precision_requested"], m["clip"]["precision"]) for m in manifests} == {
        ("fp32", "fp16", "fp32")}
    assert summary.model_key.startswith("tiny-random(seed=0)/fp32|")
