"""Storage faults, injected by a proxy in front of the local S3 server.

Transient faults (throttling, 5xx, a dropped connection) are retried with backoff and cost nothing;
a shard that stays unreadable fails its unit alone, is reported, and the next run redoes it.
"""

from __future__ import annotations

from collections import Counter

import pyarrow.dataset as pads
import pytest

from pipeline import schema as S
from pipeline.io.delta import committed_files
from pipeline.runner import run_score
from pipeline.status import unit_status
from tests.faulty_s3 import DROP_CONNECTION, INTERNAL_ERROR, SLOW_DOWN, FaultyS3Proxy

pytestmark = pytest.mark.integration


def _committed_keys(output: str, s3_server) -> Counter:
    table = pads.dataset(committed_files(output), format="parquet", partitioning="hive",
                         filesystem=s3_server.filesystem()).to_table(columns=[S.SHARD, S.KEY, S.STATUS])
    assert S.Status.STORAGE_ERROR.value not in table[S.STATUS].to_pylist()
    return Counter(zip(table[S.SHARD].to_pylist(), table[S.KEY].to_pylist()))


@pytest.fixture
def shards_on_s3(sample_dataset, s3_bucket, upload_dir) -> str:
    uri = f"s3://{s3_bucket}/shards"
    upload_dir(sample_dataset.shards_dir, uri)
    return uri


def test_transient_faults_are_retried_and_every_key_lands_once(
        shards_on_s3, s3_bucket, s3_server, sample_dataset, scoring, ray_local):
    output = f"s3://{s3_bucket}/scores"
    with FaultyS3Proxy(s3_server.endpoint_url) as proxy:
        for shard in ("00000", "00001", "00002"):
            proxy.fail("GET", rf"/{shard}\.tar$", SLOW_DOWN, times=2)
        proxy.fail("GET", r"/00001\.tar$", INTERNAL_ERROR, times=2)
        proxy.fail("GET", r"/00002\.parquet$", DROP_CONNECTION, times=1)
        proxy.fail("PUT", r"/_staging/", SLOW_DOWN, times=2)
        proxy.fail("PUT", r"/_units/", INTERNAL_ERROR, times=1)
        storage = {"endpoint_url": proxy.endpoint}
        summary = run_score(scoring.config(shards_on_s3, output, storage_options=storage))

    assert [(rule.path_pattern, rule.served) for rule in proxy.rules] == \
        [(rule.path_pattern, rule.times) for rule in proxy.rules], "every planned fault was served"
    assert summary.ok, summary.units_failed
    assert len(summary.units_committed) == 3
    keys = _committed_keys(output, s3_server)
    assert set(keys.values()) == {1}
    assert len(keys) == summary.rows == len(sample_dataset.all_keys)


def test_a_shard_that_stays_unreadable_fails_only_its_unit_and_the_next_run_redoes_it(
        shards_on_s3, s3_bucket, s3_server, sample_dataset, scoring, ray_local):
    output = f"s3://{s3_bucket}/scores"
    with FaultyS3Proxy(s3_server.endpoint_url) as proxy:
        broken = proxy.fail("GET", r"/00001\.tar$", INTERNAL_ERROR)  # every attempt, every retry
        # Three attempts instead of ten keep the test short; the path through the code is the same.
        storage = {"endpoint_url": proxy.endpoint, "config_kwargs": {"retries": {"mode": "standard", "max_attempts": 3}}}
        config = scoring.config(shards_on_s3, output, storage_options=storage)
        first = run_score(config)

        assert broken.served >= 3, "the failing read was retried before giving up"
        assert len(first.units_committed) == 2
        [(failed_unit, why)] = first.units_failed.items()
        assert failed_unit.endswith("-000001") and "unreadable from storage" in why
        report = unit_status(output, storage_options=storage)
        assert failed_unit in report.failed and failed_unit in report.pending
        assert "unreadable from storage" in report.to_text()

        proxy.heal()
        second = run_score(config)

    assert second.ok and second.units_committed == [failed_unit] and second.units_done_before == 2
    keys = _committed_keys(output, s3_server)
    assert set(keys.values()) == {1}
    assert len(keys) == len(sample_dataset.all_keys)
    assert not unit_status(output).failed  # the proxy is gone: straight to the server
