"""`aesthetics optimize` and `aesthetics vacuum`: thin shells over :mod:`pipeline.housekeeping`."""

from __future__ import annotations

import argparse

from pipeline.commands.options import add_storage_options
from pipeline.errors import ExitCode


def cmd_optimize(args: argparse.Namespace) -> int:
    from pipeline.housekeeping import optimize

    result = optimize(args.output, args.target_size_mb, tuple(args.zorder or ()), dict(args.storage_option or []))
    how = f"Z-ordered by {', '.join(result.zorder_by)}" if result.zorder_by else "compacted"
    print(f"{how} {args.output}: {result.files_removed} data files into {result.files_added}, "
          f"{result.unit_files_removed} unit-table files into {result.unit_files_added}; "
          f"table version {result.data_version}, logs checkpointed. The replaced files stay for time travel "
          f"until `aesthetics vacuum`.")
    return ExitCode.OK


def cmd_vacuum(args: argparse.Namespace) -> int:
    from pipeline.housekeeping import vacuum

    result = vacuum(args.output, args.retention_hours, args.dry_run, dict(args.storage_option or []))
    verb = "would delete" if result.dry_run else "deleted"
    print(f"{verb} {len(result.data_files)} data files and {len(result.unit_files)} unit-table files no table "
          f"version of the last {args.retention_hours} h needs")
    if result.dry_run:
        for path in result.data_files + result.unit_files:
            print(f"  {path}")
    return ExitCode.OK


def register(commands: argparse._SubParsersAction) -> None:
    from pipeline.housekeeping import DEFAULT_RETENTION_HOURS, DEFAULT_TARGET_SIZE_MB

    optimize = commands.add_parser("optimize", help="compact small files into few per score band (optionally "
                                                    "Z-ordered) and checkpoint the table logs")
    optimize.add_argument("output")
    optimize.add_argument("--target-size-mb", type=int, default=DEFAULT_TARGET_SIZE_MB,
                          help=f"size of the compacted files (default {DEFAULT_TARGET_SIZE_MB} MB)")
    optimize.add_argument("--zorder", nargs="+", metavar="COLUMN",
                          help="Z-order the rows by these columns (e.g. aesthetic_score): filters on them skip "
                               "more files, and scoring a unit again rewrites more")
    add_storage_options(optimize)
    optimize.set_defaults(run=cmd_optimize)

    vacuum = commands.add_parser("vacuum", help="delete files no table version within the retention needs "
                                                "(replaced unit versions, stopped runs' files)")
    vacuum.add_argument("output")
    vacuum.add_argument("--retention-hours", type=int, default=DEFAULT_RETENTION_HOURS,
                        help=f"keep what versions of the last H hours read (default {DEFAULT_RETENTION_HOURS})")
    vacuum.add_argument("--dry-run", action="store_true", help="list what would be deleted; delete nothing")
    add_storage_options(vacuum)
    vacuum.set_defaults(run=cmd_vacuum)
