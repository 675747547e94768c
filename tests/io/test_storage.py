from pipeline.io.storage import S3_RETRIES, filesystem


def test_s3_gets_retries_with_backoff_unless_the_caller_chose_its_own():
    fs, path = filesystem("s3://bucket/shards", {"skip_instance_cache": True})
    assert path == "bucket/shards"
    assert fs.config_kwargs["retries"] == S3_RETRIES

    mine = {"mode": "adaptive", "max_attempts": 3}
    fs, _ = filesystem("s3://bucket/shards", {"config_kwargs": {"retries": mine}, "skip_instance_cache": True})
    assert fs.config_kwargs["retries"] == mine


def test_the_endpoint_comes_from_the_environment_and_an_explicit_option_wins(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    fs, _ = filesystem("s3://bucket/x", {"skip_instance_cache": True})
    assert fs.endpoint_url == "http://127.0.0.1:1"
    fs, _ = filesystem("s3://bucket/x", {"endpoint_url": "http://127.0.0.1:2", "skip_instance_cache": True})
    assert fs.endpoint_url == "http://127.0.0.1:2"


def test_local_paths_take_no_options():
    fs, path = filesystem("/tmp/some/where", {"config_kwargs": {"retries": {}}})
    assert path == "/tmp/some/where" and "file" in fs.protocol
