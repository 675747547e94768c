"""`aesthetics dedup`: a thin shell over :mod:`pipeline.dedup`."""

from __future__ import annotations

import argparse

from pipeline.commands.options import add_storage_options
from pipeline.errors import ExitCode


def cmd_dedup(args: argparse.Namespace) -> int:
    from pipeline.dedup import dedup, dedup_uri

    result = dedup(args.output, args.threshold, args.clusters, args.seed, dict(args.storage_option or []))
    clusters = "cells of the ANN index" if result.clusters_from_index else "k-means clusters"
    how = (f"near duplicates at cosine >= {result.threshold:g} within {result.clusters} {clusters}"
           if result.near_searched else "no embeddings stored (score with --write-embeddings): exact duplicates only")
    print(f"{result.rows:,} ok rows (table version {result.data_version}): {result.groups:,} groups hold "
          f"{result.duplicates:,} duplicates ({result.exact:,} same bytes as their keeper, {result.near:,} near); "
          f"{how}. Written to {dedup_uri(args.output)}; `aesthetics cutoffs {args.output} --dedup` counts keepers only.")
    return ExitCode.OK


def register(commands: argparse._SubParsersAction) -> None:
    from pipeline.dedup import DEFAULT_THRESHOLD

    dedup = commands.add_parser("dedup", help="group exact (same bytes) and near (embedding cosine) duplicates; "
                                              "each group's best-scored row is its keeper")
    dedup.add_argument("output")
    dedup.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                       help=f"cosine at or above which two images are near duplicates (default {DEFAULT_THRESHOLD})")
    dedup.add_argument("--clusters", type=int, help="k-means clusters (default: the square root of the rows)")
    dedup.add_argument("--seed", type=int, default=0, help="k-means seed")
    add_storage_options(dedup)
    dedup.set_defaults(run=cmd_dedup)
