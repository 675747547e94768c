"""The `aesthetics` command line: parse, build a validated config, call the pipeline, report.

No pipeline logic lives here; every subcommand is a thin shell over a `pipeline` function.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from typing import Any, Mapping, Sequence

import yaml

from pipeline.commands.options import add_storage_options
from pipeline.config import LISTING_MODES, PRECISIONS, ConfigError, ListingConfig, ScoreConfig, config_from_mapping
from pipeline.errors import ExitCode, explain
from pipeline.io import layout

TINY_WARNING = (
    "\n" + "!" * 78 + "\n"
    "!! TINY RANDOM-WEIGHT MODEL: no CLIP weights were given, so this run uses a tiny\n"
    "!! open_clip architecture with seeded random weights. Its scores MEAN NOTHING.\n"
    "!! Every unit record says tiny_random=true. For real scores give --pretrained\n"
    "!! (a hub tag, or a path/URI of ViT-L-14-quickgelu OpenAI weights).\n"
    + "!" * 78 + "\n"
)


def _head(text: str) -> dict[str, Any]:
    uri, _, pin = text.partition(",sha256=")
    return {"uri": uri, "sha256": pin or None}


def _input_option(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"input option {text!r} is not KEY=VALUE")
    return key, value


def add_score_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", action="append", required=False,
                        help="a folder/prefix, a glob, or single files; repeat for several (any fsspec URI)")
    parser.add_argument("--input-format",
                        help="a module of pipeline/sources: webdataset (img2dataset shards), files (images with "
                             ".txt/.json beside them), ...; default: auto, the one format the input fits")
    parser.add_argument("--input-option", action="append", type=_input_option, metavar="KEY=VALUE",
                        help="an option of the input format, e.g. files_per_unit=1000 (files); repeat for several")
    parser.add_argument("--output", help="output prefix (any fsspec URI)")
    add_listing_arguments(parser)
    parser.add_argument("--config", help="YAML file with the same settings (flags override it)")
    parser.add_argument("--model", help="open_clip model name (default ViT-L-14-quickgelu; 'tiny-random' for tests)")
    parser.add_argument("--pretrained", help="open_clip tag (openai) or a path/URI of a weights file")
    parser.add_argument("--pretrained-sha256", help="pin for --pretrained when it is a file")
    parser.add_argument("--head", action="append", type=_head,
                        help="head name (sac+logos+ava1-l14-linearMSE, sa_0_4_vit_l_14_linear, ...) or a path/URI, "
                             "optionally ',sha256=HEX'; repeat for several, the first is the primary score")
    parser.add_argument("--weights-dir", action="append", help="folder (path or URI) searched first for weight files")
    parser.add_argument("--precision", choices=PRECISIONS,
                        help="fp16/bf16: weights cast; amp_bf16: fp32 weights under bf16 autocast")
    parser.add_argument("--compile", action="store_true", default=None,
                        help="torch.compile the image tower (a compile per actor; pays on long GPU runs)")
    parser.add_argument("--channels-last", action="store_true", default=None,
                        help="NHWC memory order for the image tower's convolution")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--batch-size", type=int, help="images per embed batch")
    parser.add_argument("--decode-batch-size", type=int)
    parser.add_argument("--min-actors", type=int)
    parser.add_argument("--max-actors", type=int)
    parser.add_argument("--gpus-per-actor", type=float)
    parser.add_argument("--decode-cpus-per-actor", type=float,
                        help="CPUs of JPEG decode that feed one embed actor (GPU); caps decode tasks at this x max-actors")
    parser.add_argument("--shards-per-unit", type=int)
    parser.add_argument("--write-embeddings", action="store_true", default=None)
    parser.add_argument("--quality-metrics", action="store_true", default=None,
                        help="sharpness, exposure, contrast and colourfulness columns from the decode stage")
    parser.add_argument("--prompts", help="zero-shot prompt score columns: 'default' or a prompt-set YAML file")
    parser.add_argument("--exact-decode", action="store_true", default=None,
                        help="full-size decode (slower) instead of JPEG DCT downscaling")
    parser.add_argument("--caption-similarity", action=argparse.BooleanOptionalAction, default=None,
                        help="clip_similarity: cosine of each image and its caption in the same CLIP (default on)")
    parser.add_argument("--phash", action="store_true", default=None,
                        help="a phash column: the 64-bit perceptual hash of the decoded pixels (imagehash)")
    parser.add_argument("--exclude-hashes", metavar="FILE_OR_URI",
                        help="hex MD5 or SHA-256 digests of image bytes or URLs, one per line (.gz too): "
                             "matching rows get status 'excluded' and no score")
    parser.add_argument("--rescore", action="store_true", default=None,
                        help="redo units scored with another model or head")
    parser.add_argument("--dry-run", action="store_true",
                        help="check everything and print the plan (units done, to do and why); write nothing")
    parser.add_argument("--compact-at", type=int, metavar="FILES",
                        help="compact the output's data files once this many are small, looking each time the run "
                             "has committed this many more and at its end (default 1000; 0: never, `aesthetics "
                             "optimize` does it by hand)")
    add_storage_options(parser)


def add_listing_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listing", choices=LISTING_MODES,
                        help="auto (default): list each input folder from where the output's kept listing of it "
                             "ended, and in full every --full-listing-days; full: list everything")
    parser.add_argument("--full-listing-days", type=float, metavar="DAYS",
                        help="list the input in full when the last full listing is older than this (default 7)")


def listing_values(args: argparse.Namespace, values: Mapping[str, Any] | None = None) -> dict[str, Any]:
    listing = dict((values or {}).get("listing", {}))
    if args.listing is not None:
        listing["mode"] = args.listing
    if args.full_listing_days is not None:
        listing["full_every_days"] = args.full_listing_days
    return listing


def read_config_file(path: str) -> dict[str, Any]:
    """The settings in a YAML file, as a mapping; any problem with the file is a ConfigError."""
    try:
        with open(path) as handle:
            values = yaml.safe_load(handle)
    except OSError as error:
        raise ConfigError(f"--config {path}: {error.strerror or error}") from error
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"--config {path} is not valid YAML: {problem}{where}") from error
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path} must hold a mapping of settings, not a {type(values).__name__}")
    return values


def config_from_args(args: argparse.Namespace) -> ScoreConfig:
    values: dict[str, Any] = read_config_file(args.config) if args.config else {}
    model = dict(values.get("model", {}))
    resources = dict(values.get("resources", {}))
    decode = dict(values.get("decode", {}))
    for flag, target, name in [
        ("model", model, "name"), ("pretrained", model, "pretrained"), ("pretrained_sha256", model, "pretrained_sha256"),
        ("precision", model, "precision"), ("device", model, "device"), ("compile", model, "compile"),
        ("channels_last", model, "channels_last"),
        ("batch_size", resources, "embed_batch_size"), ("min_actors", resources, "min_actors"),
        ("max_actors", resources, "max_actors"), ("gpus_per_actor", resources, "gpus_per_actor"),
        ("decode_cpus_per_actor", resources, "decode_cpus_per_actor"),
        ("decode_batch_size", decode, "batch_size"), ("quality_metrics", decode, "quality_metrics"),
        ("phash", decode, "phash"),
    ]:
        if getattr(args, flag) is not None:
            target[name] = getattr(args, flag)
    if args.exact_decode:
        decode["fast"] = False
    if resources.get("max_actors") is not None and resources.get("min_actors") is None:
        resources["min_actors"] = min(resources["max_actors"], 1)
    values.update(model=model, resources=resources, decode=decode, listing=listing_values(args, values))
    if args.input:
        values["input"] = args.input
    if args.output:
        values["output"] = args.output
    if args.head:
        values["heads"] = args.head
    if args.weights_dir:
        values["weights_dirs"] = args.weights_dir
    if args.shards_per_unit is not None:
        values["shards_per_unit"] = args.shards_per_unit
    if args.compact_at is not None:
        values["compact_at"] = args.compact_at
    if args.input_format is not None or args.input_option:
        source = dict(values.get("source", {}))
        if args.input_format is not None:
            source["format"] = args.input_format
        if args.input_option:
            source["options"] = {**source.get("options", {}), **dict(args.input_option)}
        values["source"] = source
    for flag in ("write_embeddings", "rescore", "prompts", "exclude_hashes", "caption_similarity"):
        if getattr(args, flag) is not None:
            values[flag] = getattr(args, flag)
    if args.storage_option:
        values["storage_options"] = {**values.get("storage_options", {}), **dict(args.storage_option)}
    if not values.get("input") or not values.get("output"):
        raise ConfigError("--input and --output are required (or give them in --config)")
    return config_from_mapping(values)


def run_scoring(args: argparse.Namespace) -> int:
    """`score` and `nightly`: both score what is pending; `nightly` also says what it found to do."""
    from pipeline.preflight import prepare_run
    from pipeline.runner import run_prepared

    prepared = prepare_run(config_from_args(args))
    config = prepared.config
    if args.dry_run:
        return print_plan(prepared)

    def warn_if_tiny() -> None:
        if config.model.is_tiny_random:
            print(TINY_WARNING, file=sys.stderr)

    summary = run_prepared(prepared, on_start=warn_if_tiny)
    if args.command == "nightly":
        print(f"nightly: {len(summary.pending_reasons)} units to do "
              f"({_count_reasons(summary.pending_reasons) or 'none'})")
    print_summary(summary)
    warn_if_tiny()
    return ExitCode.OK if summary.ok else ExitCode.FAILED


def _count_reasons(reasons: dict[str, str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for why in reasons.values():
        counts[why] = counts.get(why, 0) + 1
    return counts


def print_plan(prepared: Any) -> int:
    """What a run would do, from the checks and the unit table alone: nothing is written, Ray is not started."""
    from pipeline.planning import plan_run

    plan = plan_run(prepared.config, prepared.shards)
    print(f"plan: {len(plan.unit_ids)} units of {plan.shards_per_unit} shards; {len(plan.done)} done, "
          f"{len(plan.pending)} to do ({_count_reasons(plan.reasons) or 'none'}), {len(plan.stale)} stale "
          f"(--rescore redoes them)")
    return ExitCode.OK


def cmd_status(args: argparse.Namespace) -> int:
    from pipeline.status import unit_status

    report = unit_status(args.output, args.input, storage_options=dict(args.storage_option or []),
                         listing=ListingConfig(**listing_values(args)))
    print(report.to_text())
    return ExitCode.FAILED if report.failed else ExitCode.OK


def print_summary(summary: Any) -> None:
    print(f"\nrun {summary.run_id}: {len(summary.units_committed)} units committed, "
          f"{summary.units_done_before} already done, {len(summary.units_failed)} failed, "
          f"{len(summary.units_stale)} stale (other model; --rescore redoes them)")
    print(f"rows {summary.rows}, scored {summary.scored}, by status {summary.counts_by_status}, "
          f"wall {summary.wall_s:.1f}s")
    for unit_id, reason in summary.units_failed.items():
        print(f"  FAILED {unit_id}: {reason}", file=sys.stderr)
    if summary.compacted:
        removed, added = (sum(getattr(c, name) for c in summary.compacted) for name in ("files_removed", "files_added"))
        print(f"compacted the data table {len(summary.compacted)} time(s): {removed} small files rewritten into {added}")
    for table in summary.cutoffs:
        print()
        print(table.to_markdown())
    print(f"output: {summary.output} (a Delta table: Parquet under score_band=*/, unit facts in _units/, "
          f"the cutoff table in {layout.CUTOFFS_MD} and {layout.CUTOFFS_JSON})")


def cmd_cutoffs(args: argparse.Namespace) -> int:
    from pipeline.cutoffs import dedup_tables, write_cutoffs

    options = dict(args.storage_option or [])
    tables = dedup_tables(args.output, options) if args.dedup else write_cutoffs(args.output, options)
    if not tables:
        print(f"aesthetics: no committed units under {args.output}", file=sys.stderr)
        return ExitCode.INPUT
    for table in tables:
        print(table.to_markdown())
    return ExitCode.OK


def cmd_migrate(args: argparse.Namespace) -> int:
    from pipeline.migrate import MIGRATED, migrate

    result = migrate(args.output, dict(args.storage_option or []))
    print(f"migrated {result.units} units ({result.rows} rows) of {args.output} into Delta tables"
          + (f", {result.skipped} converted before" if result.skipped else "")
          + f"; the old manifests are in {MIGRATED}/")
    return ExitCode.OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aesthetics", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the job does")
    parser.add_argument("--debug", action="store_true", help="on failure, print the traceback too")
    commands = parser.add_subparsers(dest="command", required=True)

    score = commands.add_parser("score", help="score shards into partitioned Parquet and print the cutoff table")
    add_score_arguments(score)
    score.set_defaults(run=run_scoring)

    nightly = commands.add_parser("nightly", help="score only shards that are new or changed since the last run")
    add_score_arguments(nightly)
    nightly.set_defaults(run=run_scoring)

    status = commands.add_parser("status", help="units done / pending / failed, by model version, and why")
    status.add_argument("output")
    status.add_argument("--input", action="append", help="the shards (default: the last run's input)")
    add_listing_arguments(status)
    add_storage_options(status)
    status.set_defaults(run=cmd_status)

    cutoffs = commands.add_parser("cutoffs", help="the cutoff table of an output prefix, from its unit table")
    cutoffs.add_argument("output")
    cutoffs.add_argument("--dedup", action="store_true",
                         help="count each duplicate group (`aesthetics dedup`) once: its keeper; the others "
                              "show as status 'duplicate'")
    add_storage_options(cutoffs)
    cutoffs.set_defaults(run=cmd_cutoffs)

    migrate = commands.add_parser("migrate", help="convert an output of the earlier layout (_manifests/) into "
                                                  "Delta tables")
    migrate.add_argument("output")
    add_storage_options(migrate)
    migrate.set_defaults(run=cmd_migrate)

    import importlib
    import pkgutil

    import pipeline.commands

    # Every module under pipeline/commands with a register(commands) adds its subcommands: a new command
    # is one new module there. Name order keeps the help listing stable.
    for module in sorted(m.name for m in pkgutil.iter_modules(pipeline.commands.__path__)):
        register = getattr(importlib.import_module(f"pipeline.commands.{module}"), "register", None)
        if register is not None:
            register(commands)
    return parser


def use_jemalloc() -> None:
    """Arrow's jemalloc pool for this process, unless ARROW_DEFAULT_MEMORY_POOL names one.

    A command allocates its Arrow buffers once (a plan over LAION's listing: hundreds of megabytes), and the
    first touch of fresh memory from pyarrow's default mimalloc pool costs several times jemalloc's.
    """
    import os

    import pyarrow as pa

    if "ARROW_DEFAULT_MEMORY_POOL" in os.environ:
        return
    try:
        pa.set_memory_pool(pa.jemalloc_memory_pool())
    except NotImplementedError:  # a pyarrow built without jemalloc
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; every failure ends in one ``aesthetics:`` line and an ExitCode (README)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    use_jemalloc()
    try:
        return int(args.run(args))
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - the top level turns any failure into one line
        code, message = explain(exc)
        if args.debug:
            traceback.print_exc()
        print(f"aesthetics: {message}", file=sys.stderr)
        return int(code)


if __name__ == "__main__":
    sys.exit(main())
