"""Cluster entrypoint: `python -m jobs.nightly --input ... --output ...` (what the nightly schedule submits).

Scores only the shards that are new or changed since the last run; see `aesthetics nightly --help`.
"""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["nightly", *sys.argv[1:]]))
