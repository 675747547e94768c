"""`aesthetics report` and `aesthetics select`: thin shells over :mod:`pipeline.analysis`."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from pipeline.commands.options import add_storage_options
from pipeline.errors import ExitCode

SELECT_EXAMPLE = ('aesthetics select OUTPUT --query "a breathtaking travel photo of a scenic landscape" '
                  '--min-score 6 --top-k 100 --diverse --out travel/')


def cmd_report(args: argparse.Namespace) -> int:
    from pipeline.analysis.report import write_report

    options = dict(args.storage_option or [])
    info = write_report(args.output, args.out, options, per_position=args.per_bucket, thumb_size=args.thumb_size,
                        title=args.title, dedup=args.dedup)
    missing = [t for t in info.thumbs if t.jpeg is None]
    print(f"wrote {args.out} ({info.html_bytes / 1024:.0f} KiB, {len(info.thumbs)} thumbnails over "
          f"{len(info.bands)} score bands, {info.seconds:.1f}s)")
    for thumb in missing:
        print(f"  no thumbnail for {thumb.key} ({thumb.shard}): {thumb.error}", file=sys.stderr)
    if not info.tables:
        print(f"aesthetics: no committed units under {args.output}", file=sys.stderr)
        return ExitCode.INPUT
    return ExitCode.OK


def _model_override(args: argparse.Namespace, output: str, options: dict[str, Any]):
    """None (take the model from the records) unless --model/--pretrained/--pretrained-sha256 was given."""
    if not (args.model or args.pretrained or args.pretrained_sha256):
        return None
    from pipeline.analysis.select import model_config_of
    from pipeline.config import TINY_MODEL, ModelConfig
    from pipeline.errors import UsageError
    from pipeline.io.units import read_units

    recorded = None
    configs = {model_config_of(m) for m in read_units(output, options).values()}
    if len(configs) == 1:
        recorded = configs.pop()
    name = args.model or (recorded.name if recorded else None)
    if name is None:
        raise UsageError("select: --pretrained needs --model when the units name several models")
    if name == TINY_MODEL:
        return ModelConfig(name=TINY_MODEL, precision="fp32", seed=recorded.seed if recorded and
                           recorded.is_tiny_random else 0)
    pretrained = args.pretrained or (recorded.pretrained if recorded and recorded.name == name else "openai")
    return ModelConfig(name=name, pretrained=pretrained, pretrained_sha256=args.pretrained_sha256, precision="fp32")


def cmd_select(args: argparse.Namespace) -> int:
    from pipeline.analysis.select import SelectionError

    try:
        return _select(args)
    except SelectionError as error:
        print(f"aesthetics select: {error}", file=sys.stderr)
        return ExitCode.USAGE


def _select(args: argparse.Namespace) -> int:
    from pipeline.analysis.select import SelectOptions, select_images, write_selection

    options = dict(args.storage_option or [])
    select_options = SelectOptions(
        query=args.query, min_score=args.min_score, top_k=args.top_k, diverse=args.diverse,
        mmr_lambda=args.mmr_lambda, pool_factor=args.pool_factor, use_ray=args.ray, ray_min_rows=args.ray_min_rows,
        dedup=args.dedup, use_index=False if args.no_index else None, candidates=args.candidates)
    selection = select_images(args.output, select_options, model=_model_override(args, args.output, options),
                              weights_dirs=tuple(args.weights_dir or ()), storage_options=options,
                              device=args.device)
    written = write_selection(selection, args.out, webdataset=args.webdataset, storage_options=options)
    info = selection.info
    if info.get("tiny_random"):
        print("WARNING: these units were scored with the tiny random-weight model; similarities and scores "
              "mean nothing.", file=sys.stderr)
    print(f"selected {info['selected']} of {info['rows_passing']} rows with score >= {args.min_score} "
          f"({info['method']}; {info['files_read']} files read, {info['files_skipped_by_band']} skipped by band, "
          f"{'Ray' if info['used_ray'] else 'local'}; {info['seconds']:.1f}s)")
    if info.get("index"):
        about = info["index"]
        print(f"index: {about['factory']} over {about['rows']:,} rows, {about['candidates']} candidates re-ranked "
              f"exactly; {about['units_read_from_files']} units scored since it was updated read from their files")
    print(f"mean pairwise embedding distance: {info['mean_pairwise_distance']:.4f} "
          f"(plain top-K: {info['mean_pairwise_distance_plain_top_k']:.4f})")
    print(json.dumps(written, indent=2))
    return ExitCode.OK if info["selected"] else ExitCode.FAILED


def register(commands: Any) -> None:
    report = commands.add_parser(
        "report", help="one self-contained HTML page: cutoff table, histogram, thumbnails per score band",
        description="Write one self-contained HTML page about the committed units of OUTPUT.")
    report.add_argument("output", help="scored output prefix (any fsspec URI)")
    report.add_argument("--out", required=True, help="the .html file to write (path or URI)")
    report.add_argument("--per-bucket", type=int, default=3, help="images per position (best/median/worst) per band")
    report.add_argument("--thumb-size", type=int, default=192, help="thumbnail longest side, pixels")
    report.add_argument("--title")
    report.add_argument("--dedup", action="store_true",
                        help="count and show each duplicate group (`aesthetics dedup`) once: its keeper")
    add_storage_options(report)
    report.set_defaults(run=cmd_report)

    select = commands.add_parser(
        "select", help="rank by a text query against the stored embeddings, keep a score threshold, top K",
        description="Select images by text. Example: " + SELECT_EXAMPLE)
    select.add_argument("output", help="scored output prefix, scored with --write-embeddings")
    select.add_argument("--query", required=True, help="text to rank by (CLIP text embedding)")
    select.add_argument("--min-score", type=float, default=None, help="keep rows with aesthetic_score >= this")
    select.add_argument("--top-k", type=int, default=100)
    select.add_argument("--dedup", action="store_true",
                        help="pick each duplicate group's keeper only (groups from `aesthetics dedup`)")
    select.add_argument("--no-index", action="store_true",
                        help="compare the query with every stored embedding, even where `aesthetics index` built an "
                             "index (the exact answer, at the cost of reading every file)")
    select.add_argument("--candidates", type=int,
                        help="rows the index proposes for exact re-ranking (default: 10 x the pool)")
    select.add_argument("--diverse", action="store_true",
                        help="spread the picks with maximal marginal relevance over the embeddings")
    select.add_argument("--mmr-lambda", type=float, default=0.5,
                        help="MMR trade-off: 1 = query similarity only, 0 = diversity only")
    select.add_argument("--pool-factor", type=int, default=5,
                        help="--diverse picks among the pool-factor x top-k most query-similar rows")
    select.add_argument("--out", required=True, help="folder for selection.parquet / .json (path or URI)")
    select.add_argument("--webdataset", action="store_true",
                        help="also write selection-000000.tar with the selected images and captions")
    select.add_argument("--model", help="open_clip model (default: the one recorded in the records)")
    select.add_argument("--pretrained", help="open_clip tag or a path/URI of the weights the scores were made with")
    select.add_argument("--pretrained-sha256")
    select.add_argument("--weights-dir", action="append", help="folder searched first for weight files")
    select.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu",
                        help="where to embed the query (default cpu: one short text)")
    ray_group = select.add_mutually_exclusive_group()
    ray_group.add_argument("--ray", dest="ray", action="store_true", default=None,
                           help="score files as Ray tasks (default: only past --ray-min-rows rows)")
    ray_group.add_argument("--no-ray", dest="ray", action="store_false")
    select.add_argument("--ray-min-rows", type=int, default=500_000)
    add_storage_options(select)
    select.set_defaults(run=cmd_select)
