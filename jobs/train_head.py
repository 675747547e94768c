"""Cluster entrypoint: `python -m jobs.train_head --scores ... --labels ... --out ...` (= `aesthetics train-head`)."""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-head", *sys.argv[1:]]))
