"""Run summaries: one JSON file per run under ``_runs/``, named by its run id, which sorts by start time.

Each summary carries the units still failing after its run (``units_failing``: each one's last failure and the
run it happened in), carried forward from the summary before it, so a reader needs the latest summary alone
however long the output's history. Summaries written before that field existed are folded over once.
"""

from __future__ import annotations

import posixpath
from typing import Any, Iterable, Mapping

from pipeline.io import layout
from pipeline.io.storage import filesystem, join, read_json

FAILING = "units_failing"


def _summary_paths(output: str, storage_options: Mapping[str, Any] | None) -> tuple[Any, list[str]]:
    fs, root = filesystem(output, storage_options)
    try:
        paths = fs.ls(join(root, layout.RUNS), detail=False)
    except FileNotFoundError:
        return fs, []
    return fs, sorted((p for p in paths if p.endswith(".json")), key=posixpath.basename)


def latest(output: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """The summary of the output's latest run; None when no run has finished."""
    fs, paths = _summary_paths(output, storage_options)
    return read_json(fs, paths[-1]) if paths else None


def failing(summary: Mapping[str, Any] | None, output: str,
            storage_options: Mapping[str, Any] | None = None) -> dict[str, str]:
    """unit -> its last failure ("why (run id)"), for the units not committed since, as of ``summary``."""
    if summary is None:
        return {}
    if FAILING in summary:
        return dict(summary[FAILING])
    fs, paths = _summary_paths(output, storage_options)  # an output from before the field: fold every summary
    failures: dict[str, str] = {}
    for run in (read_json(fs, path) for path in paths):
        failures = carried_forward(failures, run["run_id"], run.get("units_committed", []),
                                   run.get("units_failed", {}))
        if run["run_id"] == summary["run_id"]:
            break
    return failures


def carried_forward(failures: Mapping[str, str], run_id: str, committed: Iterable[str],
                    failed: Mapping[str, str]) -> dict[str, str]:
    """The failing units after a run that committed ``committed`` and failed ``failed`` (unit -> why)."""
    out = dict(failures)
    for unit in committed:
        out.pop(unit, None)
    for unit, why in failed.items():
        out[unit] = f"{why} (run {run_id})"
    return out
