"""Cluster entrypoint: `python -m jobs.cutoffs OUTPUT`."""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["cutoffs", *sys.argv[1:]]))
