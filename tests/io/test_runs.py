"""Run summaries: the latest one says which units are still failing, however many runs came before it."""

from __future__ import annotations

import json

from pipeline.io import runs


def _write(output, run_id: str, committed=(), failed=None, failing=None) -> dict:
    summary = {"run_id": run_id, "units_committed": list(committed), "units_failed": dict(failed or {})}
    if failing is not None:
        summary[runs.FAILING] = failing
    folder = output / "_runs"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{run_id}.json").write_text(json.dumps(summary))
    return summary


def test_a_failure_is_carried_until_the_unit_is_committed():
    after_first = runs.carried_forward({}, "r1", ["a"], {"b": "OSError: gone", "c": "timeout"})
    assert after_first == {"b": "OSError: gone (run r1)", "c": "timeout (run r1)"}
    after_second = runs.carried_forward(after_first, "r2", ["b"], {"c": "timeout again"})
    assert after_second == {"c": "timeout again (run r2)"}


def test_the_latest_summary_is_the_highest_run_id_and_none_before_any_run(tmp_path):
    assert runs.latest(str(tmp_path)) is None
    assert runs.failing(None, str(tmp_path)) == {}
    _write(tmp_path, "20261201T000000Z-aaaaaa")
    _write(tmp_path, "20261202T000000Z-000000", failing={"u": "x (run 20261202T000000Z-000000)"})
    _write(tmp_path, "20261130T000000Z-ffffff")
    assert runs.latest(str(tmp_path))["run_id"] == "20261202T000000Z-000000"


def test_the_latest_summary_alone_says_what_is_failing(tmp_path):
    _write(tmp_path, "r1", failed={"a": "boom"})  # would say "a" is failing, were it read
    last = _write(tmp_path, "r2", failing={"b": "OSError (run r2)"})
    assert runs.failing(last, str(tmp_path)) == {"b": "OSError (run r2)"}


def test_summaries_from_before_the_carried_field_are_folded_in_run_order(tmp_path):
    _write(tmp_path, "r1", failed={"a": "boom", "b": "gone"})
    _write(tmp_path, "r2", committed=["a"], failed={"c": "timeout"})
    last = _write(tmp_path, "r3", committed=["c"])
    _write(tmp_path, "r4", failed={"d": "later than the summary asked about"})
    assert runs.failing(last, str(tmp_path)) == {"b": "gone (run r1)"}
