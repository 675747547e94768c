"""Cluster entrypoint: `python -m jobs.score --input ... --output ...` (what `aesthetics submit` runs)."""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["score", *sys.argv[1:]]))
