"""`aesthetics serve`'s configuration, checked at the edge: no Ray, no model."""

from __future__ import annotations

import pytest

from pipeline.cli import build_parser, main
from pipeline.commands.serve import TOKEN_ENV, config_from_args
from pipeline.config import ConfigError
from pipeline.errors import ExitCode
from pipeline.serve.config import ServeConfig, is_loopback

TOKEN = "t" * 32


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("localhost", True), ("::1", True),
                                            ("127.0.0.2", True), ("0.0.0.0", False), ("10.0.0.5", False),
                                            ("myhost.example", False), ("::", False)])
def test_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_only_loopback_goes_without_a_token():
    assert ServeConfig(output="o").token is None
    with pytest.raises(ConfigError, match="token is required"):
        ServeConfig(output="o", host="0.0.0.0")
    assert ServeConfig(output="o", host="0.0.0.0", token=TOKEN).token_required
    with pytest.raises(ConfigError, match="at least 16"):
        ServeConfig(output="o", host="0.0.0.0", token="short")
    for bad in (dict(port=0), dict(max_upload_bytes=0), dict(max_batch_size=0), dict(batch_wait_s=float("nan")),
                dict(model_cpus=-1), dict(model_replicas=0)):
        with pytest.raises(ConfigError):
            ServeConfig(output="o", **bad)


def _args(*argv):
    return build_parser().parse_args(["serve", "out", *argv])


def test_a_host_without_a_token_gets_a_generated_one(monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    config, generated = config_from_args(_args("--host", "0.0.0.0"))
    assert generated and len(config.token) >= 16 and config.host == "0.0.0.0"
    other, _ = config_from_args(_args("--host", "0.0.0.0"))
    assert other.token != config.token
    config, generated = config_from_args(_args())
    assert config.token is None and not generated and config.host == "127.0.0.1"


def test_the_token_comes_from_a_file_or_the_environment(monkeypatch, tmp_path):
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    config, generated = config_from_args(_args("--host", "0.0.0.0", "--token-file", str(path)))
    assert config.token == TOKEN and not generated
    monkeypatch.setenv(TOKEN_ENV, "e" * 20)
    config, _ = config_from_args(_args("--host", "0.0.0.0"))
    assert config.token == "e" * 20


def test_bad_serve_options_exit_2_before_anything_starts(tmp_path, capsys):
    assert main(["serve", str(tmp_path), "--max-batch-size", "0"]) == ExitCode.USAGE
    assert "max-batch-size" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--token-file", str(tmp_path / "missing")]) == ExitCode.USAGE
    # No committed units: exit 6, and no Ray was started for it.
    assert main(["serve", str(tmp_path)]) == ExitCode.INPUT
    assert "no committed units" in capsys.readouterr().err
