"""Cluster entrypoint: `python -m jobs.evaluate --scores ... --labels ...` (= `aesthetics evaluate`)."""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
