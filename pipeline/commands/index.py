"""`aesthetics index`: a thin shell over :mod:`pipeline.index`."""

from __future__ import annotations

import argparse

from pipeline.commands.options import add_storage_options
from pipeline.errors import ExitCode


def cmd_index(args: argparse.Namespace) -> int:
    from pipeline.index import IndexOptions, build_index, describe, index_uri

    options = IndexOptions(nlist=args.nlist, pq_m=args.pq_m, nprobe=args.nprobe, train_rows=args.train_rows,
                           rows_per_part=args.rows_per_part, rebuild=args.rebuild, seed=args.seed)
    result = build_index(args.output, options, args.model_identity, dict(args.storage_option or []))
    about = describe(result.manifest)
    what = "trained and filled" if result.trained else "brought up to date"
    print(f"{index_uri(args.output)} {what} in {result.seconds:.1f}s: {about['rows']:,} rows of {about['units']:,} "
          f"units in {about['parts']} parts ({result.parts_added} added for {result.units_added} units, "
          f"{result.parts_dropped} dropped), {about['factory']}, nprobe {about['nprobe']}, table version "
          f"{about['data_version']}. `aesthetics select {args.output} --query ...` uses it.")
    return ExitCode.OK


def register(commands: argparse._SubParsersAction) -> None:
    index = commands.add_parser(
        "index", help="build or update an IVF-PQ nearest-neighbour index over the stored embeddings (select "
                      "and serve use it)",
        description="Build the output's ANN index, or add the units scored since its last update.")
    index.add_argument("output", help="scored output prefix, scored with --write-embeddings")
    index.add_argument("--nlist", type=int, help="IVF cells (default: a power of two near sqrt(rows))")
    index.add_argument("--pq-m", type=int, help="PQ codes a row, bytes (default: width / 8)")
    index.add_argument("--nprobe", type=int, help="cells a query visits (default: nlist / 16, at least 16)")
    index.add_argument("--train-rows", type=int, default=200_000, help="rows sampled to train the quantizers")
    index.add_argument("--rows-per-part", type=int, default=1_000_000, help="rows one Ray task adds")
    index.add_argument("--model-identity", help="the model whose embeddings to index, when the units name several")
    index.add_argument("--rebuild", action="store_true", help="train afresh and re-add every unit")
    index.add_argument("--seed", type=int, default=0)
    add_storage_options(index)
    index.set_defaults(run=cmd_index)
