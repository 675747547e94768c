"""Where everything lives under the output prefix.

    <output>/_delta_log/                        the data table's log: the only list of committed files
    <output>/score_band=<band>/<unit>.v<N>.parquet   data files, version N of a unit (Hive partition by band)
    <output>/_units/                            the unit table (Delta): one row per unit commit
    <output>/_staging/<run>/<unit>/<part>.parquet   rows before their unit commits
    <output>/_runs/<run>.json                   one summary per run
    <output>/_lock.json                         the lease a running job holds on the prefix
    <output>/_cutoffs.json, _cutoffs.md         the cutoff table over all committed units

Read the data through its Delta log (pipeline.io.delta; any engine's Delta reader). A reader that globs
the Parquet files instead also sees files no snapshot lists: a unit's replaced versions (until vacuum) and
a stopped run's uncommitted ones. Everything else starts with "_", which Parquet readers skip.
"""

from __future__ import annotations

from pipeline.io.storage import join

STAGING = "_staging"
RUNS = "_runs"
LOCK = "_lock.json"
CUTOFFS_JSON = "_cutoffs.json"
CUTOFFS_MD = "_cutoffs.md"


def staging_dir(output: str, run_id: str, unit_id: str) -> str:
    return join(output, STAGING, run_id, unit_id)


def run_file(output: str, run_id: str) -> str:
    return join(output, RUNS, f"{run_id}.json")
