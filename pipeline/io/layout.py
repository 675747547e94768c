"""Where everything lives under the output prefix.

    <output>/score_band=<band>/<unit>.parquet   committed data (Hive partition by score band)
    <output>/_manifests/<unit>.json             one per committed unit, written last: the commit marker
    <output>/_staging/<run>/<unit>/<part>.parquet   rows before their unit commits
    <output>/_runs/<run>.json                   one summary per run
    <output>/_lock.json                         the lease a running job holds on the prefix
    <output>/_cutoffs.json, _cutoffs.md         the cutoff table over all committed units

Only table data lies outside names that start with "_", which pyarrow, pandas, Polars, DuckDB's hive
reader and Spark skip: reading the prefix as a Parquet dataset reads the scores and nothing else.
"""

from __future__ import annotations

from pipeline import schema as S
from pipeline.io.storage import join

MANIFESTS = "_manifests"
STAGING = "_staging"
RUNS = "_runs"
LOCK = "_lock.json"
CUTOFFS_JSON = "_cutoffs.json"
CUTOFFS_MD = "_cutoffs.md"


def data_file(output: str, band: str, unit_id: str) -> str:
    return join(output, f"{S.SCORE_BAND}={band}", f"{unit_id}.parquet")


def manifest_file(output: str, unit_id: str) -> str:
    return join(output, MANIFESTS, f"{unit_id}.json")


def staging_dir(output: str, run_id: str, unit_id: str) -> str:
    return join(output, STAGING, run_id, unit_id)


def run_file(output: str, run_id: str) -> str:
    return join(output, RUNS, f"{run_id}.json")
