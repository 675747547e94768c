"""`make bench-scale`: the bookkeeping commands on outputs of 1,000 to 58,000 units, on local disk and on S3.

A real run (img2dataset shards, local Ray, tiny model) gives one unit's files and record. Each output is
then fabricated from it: 4 numbered shards per unit in an input prefix, each its tar, Parquet sidecar and stats
file as img2dataset writes them, the unit's band files copied per unit, the data table committed in batches of units (each carrying its app transactions), the unit table
written with one row per unit, both checkpointed, as a long history of per-unit commits leaves them, the
input's listing kept in the output as the run that scored it keeps it (pipeline.io.listing), and a year of
nightly run summaries.
Each command then runs in a subprocess of its own, and its wall seconds and peak RSS (the process's own
``ru_maxrss``) are printed:

- listing the whole input alone (what ``status`` and ``nightly`` would pay on every run without the kept
  listing; not timed on moto past 10,000 units);
- ``cutoffs``; ``status --input``; ``nightly --dry-run`` with nothing new, and with 100 new shards (the time
  to a plan, every check included), each listing the input from where the kept listing ended;
- opening the snapshot: Polars ``scan_delta`` to its schema, DuckDB over the table's pyarrow dataset;
- ``aesthetics optimize``, then cutoffs, status and both openings again on the compacted tables
  (``--no-optimize`` skips it).

    python -m bench.bench_scale [--units 1000 10000 58000] [--stores local s3]

S3 is moto's server on 127.0.0.1, run in this process (bench/s3_server.py): the bench fills its buckets
directly, and each command's line says how many requests of each kind the server answered for it and how long
it took over them. moto answers each LIST page by sorting its whole bucket, which S3 does not: its listing
seconds are printed apart, with one empty listing page timed per output, and the 2x verdicts are given with
and without them. The input and the output are in two buckets.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARDS_PER_UNIT = 4
NEW_SHARDS = 100
BATCH_UNITS = 2000  # units per fabricated data commit
RUN_HISTORY = 365  # run summaries in each output: a year of nightly runs
FULL_LISTING_ON_MOTO = 10000  # units; beyond, a full listing on moto takes most of an hour (see _kept_listing)

AFTER_OPTIMIZE = ("cutoffs", "status", "Polars open", "DuckDB open")  # timed again on the compacted tables
TARGETS_58K_S3 = {"cutoffs": 5.0, "status": 10.0, "nightly, nothing new": 30.0, "nightly, 100 new shards": 30.0,
                  "Polars open": 10.0, "DuckDB open": 10.0}


def _template(scratch: Path) -> tuple[dict[str, Any], list[tuple[str, str, bytes]], list[str]]:
    """(one unit's record, its files as (relative path, band, bytes), the --head/--weights-dir arguments)."""
    from pipeline.config import ModelConfig
    from pipeline.demo import v2_head_or_stand_in
    from pipeline.io.units import read_units
    from pipeline.ray_session import start_local_ray
    from pipeline.runner import run_score
    from pipeline.sample_data import build_sample_dataset
    from tests.integration.conftest import Scoring

    data = build_sample_dataset(scratch / "sample", n_images=36, images_per_shard=10, broken_urls=3)  # 40 rows
    scoring = Scoring(*v2_head_or_stand_in(scratch / "heads"))
    start_local_ray(num_cpus=2, log_to_driver=False, configure_logging=False)
    output = scratch / "template"
    config = scoring.config(data.shards_dir, str(output), shards_per_unit=SHARDS_PER_UNIT,
                            model=ModelConfig(name="tiny-random", precision="fp32"))
    summary = run_score(config)
    assert summary.ok and summary.units_committed, summary
    record = read_units(str(output))[summary.units_committed[0]]
    files = [(entry["path"], entry["band"], (output / entry["path"]).read_bytes()) for entry in record["files"]]
    args = []
    for head in scoring.heads:
        args += ["--head", f"{head.weights.uri},sha256={head.weights.sha256}"]
    for directory in scoring.weights_dirs:
        args += ["--weights-dir", directory]
    return record, files, args


def _put(fs: Any, items: dict[str, bytes], server: Any = None) -> None:
    """Write many small objects: files on a local disk, straight into the S3 server's buckets on S3."""
    from pipeline.io.storage import protocol_of

    if protocol_of(fs) in ("file", "local"):
        for path, data in items.items():
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_bytes(data)
        return
    by_bucket: dict[str, dict[str, bytes]] = {}
    for path, data in items.items():
        bucket, key = path.split("/", 1)
        by_bucket.setdefault(bucket, {})[key] = data
    for bucket, objects in by_bucket.items():
        server.put(bucket, objects)


def shard_files(number: int) -> list[str]:
    """What img2dataset writes for one shard: the tar, its Parquet sidecar and a stats file."""
    return [f"{number:06d}.tar", f"{number:06d}.parquet", f"{number:06d}_stats.json"]


def fabricate(units: int, input_uri: str, output_uri: str, record: dict[str, Any],
              files: list[tuple[str, str, bytes]], storage_options: dict[str, Any], server: Any = None) -> float:
    """An input of ``units`` x 4 shards and an output with every unit committed; seconds it took."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from deltalake import CommitProperties, DeltaTable, Schema, Transaction
    from deltalake.transaction import AddAction, create_table_with_add_actions

    from pipeline import bands
    from pipeline.io import units as unit_table
    from pipeline.io.commits import UNIT_KEY, data_file_name
    from pipeline.io.delta import storage_options_for, table_uri
    from pipeline.io.shards import plan_units, shards_from
    from pipeline.io.storage import filesystem, join

    started = time.perf_counter()
    fs, in_root = filesystem(input_uri, storage_options)
    names = [join(in_root, name) for n in range(units * SHARDS_PER_UNIT) for name in shard_files(n)]
    _put(fs, {name: b"" for name in names}, server)
    listed = _kept_listing(fs, input_uri, output_uri, names, storage_options)
    planned = plan_units(shards_from(listed.listing), SHARDS_PER_UNIT).work_units()
    assert len(planned) == units

    out_fs, out_root = filesystem(output_uri, storage_options)
    schema = pq.read_schema(pa.BufferReader(files[0][2])).append(pa.field(bands.COLUMN, pa.string()))
    location, options = table_uri(output_uri), storage_options_for(output_uri, storage_options)
    rows, now_ms = [], int(time.time() * 1000)
    for start in range(0, units, BATCH_UNITS):
        batch = planned[start:start + BATCH_UNITS]
        objects, adds = {}, []
        for unit in batch:
            for _, band, data in files:
                name = data_file_name(unit.unit_id, 1, band)
                objects[join(out_root, name)] = data
                adds.append(AddAction(name, len(data), {bands.COLUMN: band}, now_ms, True,
                                      json.dumps({"numRecords": 1})))
        _put(out_fs, objects, server)
        properties = CommitProperties(app_transactions=[Transaction(u.unit_id, 1) for u in batch],
                                      custom_metadata={UNIT_KEY: "fabricated"})
        if start == 0:
            create_table_with_add_actions(location, Schema.from_arrow(schema), adds, mode="append",
                                          partition_by=[bands.COLUMN], storage_options=options,
                                          commit_properties=properties)
        else:
            DeltaTable(location, storage_options=options).create_write_transaction(
                adds, mode="append", schema=schema, partition_by=[bands.COLUMN], commit_properties=properties)
        version = DeltaTable(location, storage_options=options).version()
        for unit in batch:
            unit_record = copy.deepcopy(record)
            unit_record.update(unit=unit.unit_id, shards=[{**shard.version(), "rows": 10} for shard in unit.shards],
                               files=[{"path": data_file_name(unit.unit_id, 1, band), "band": band, "rows": 1}
                                      for _, band, _ in files])
            rows.append(unit_table.to_row(unit_record, 1, version))
    unit_table.append(output_uri, rows, storage_options)
    listed.save()  # as the run that committed them keeps it
    _put(out_fs, _run_history(out_root, input_uri, units, record), server)
    for uri in (output_uri, unit_table.units_uri(output_uri)):
        DeltaTable(table_uri(uri), storage_options=storage_options_for(uri, storage_options)).create_checkpoint()
    return time.perf_counter() - started


def _run_history(out_root: str, input_uri: str, units: int, record: dict[str, Any]) -> dict[str, bytes]:
    """A year of nightly runs' summaries, as the runner writes them (``status`` reads the latest)."""
    from pipeline.io import layout
    from pipeline.runner import RunSummary

    objects, now = {}, time.time()
    for night in range(RUN_HISTORY):
        run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now - (RUN_HISTORY - night) * 86400)) + f"-{night:06x}"
        summary = RunSummary(run_id=run_id, output=out_root, input=[input_uri], shards_per_unit=SHARDS_PER_UNIT,
                             model_key=record["model_key"], units_total=units, units_done_before=units)
        objects[layout.run_file(out_root, run_id)] = json.dumps(summary.to_json()).encode()
    return objects


def _kept_listing(fs: Any, input_uri: str, output_uri: str, names: list[str], storage_options: dict[str, Any]) -> Any:
    """The input's listing, as the first run that scored it keeps it (pipeline.io.listing). On a local disk that
    run's full listing is made here; on S3 it is written from what was put, since moto answers each listing
    page by sorting the whole bucket: a full listing of 696,000 objects there takes hours, against a few
    minutes at S3's own rate of 1,000 keys per request. An S3 ETag of a single-part upload is the MD5 of
    its bytes, here of nothing."""
    import hashlib

    import pyarrow as pa

    from pipeline.io.listing import FILES, FolderListing, InputListing, list_input_entries
    from pipeline.io.storage import full_uri, protocol_of
    from pipeline.sources import Listing

    if protocol_of(fs) in ("file", "local"):
        listed = list_input_entries([input_uri], storage_options, output_uri)
    else:
        uris = sorted(full_uri(fs, name) for name in names)
        empty = hashlib.md5(b"").hexdigest()
        files = pa.table({"uri": uris, "size": pa.repeat(pa.scalar(0, pa.int64()), len(uris)),
                          "etag": pa.repeat(empty, len(uris))}, schema=FILES)
        folder = FolderListing(input_uri, input_uri.rstrip("/"), files, time.time(), True, "webdataset")
        listed = InputListing(output_uri, storage_options, Listing.concat([folder.listed()]), [folder])
    listed.format = "webdataset"
    return listed


def measure(command: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in MiB, last line of output) of one command in a process of its own."""
    # A child forked from this process (Ray and torch loaded) counts our pages in its peak RSS until it execs:
    # the command runs under a small Python that reports its own child's peak.
    wrapper = [sys.executable, "-c", _RSS_WRAPPER, *command]
    result = subprocess.run(wrapper, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} ... exited {result.returncode}: {result.stderr[-2000:]}")
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    seconds, peak_kib = map(float, lines[-1].split())
    return seconds, peak_kib / 1024, lines[-2] if len(lines) > 1 else ""


_RSS_WRAPPER = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
                "code = subprocess.run(sys.argv[1:]).returncode; t = time.perf_counter() - t; "
                "sys.exit(code) if code else print(t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


# Opening the snapshot: the log and checkpoint read, the files listed, the schema known; no data file is read
# (counting rows would read every file's footer, which is the data's cost, not the bookkeeping's).
POLARS = ("import sys, json, polars as pl; frame = pl.scan_delta(sys.argv[1], storage_options=json.loads(sys.argv[2]));"
          " print(len(frame.collect_schema()), 'columns')")
DUCKDB = ("import sys, json, duckdb; from deltalake import DeltaTable; "
          "ds = DeltaTable(sys.argv[1], storage_options=json.loads(sys.argv[2])).to_pyarrow_dataset(); "
          "print(len(duckdb.sql('SELECT * FROM ds LIMIT 0').columns), 'columns,', len(ds.files), 'files')")


def commands(input_uri: str, output_uri: str, options: dict[str, Any], head_args: list[str]) -> dict[str, list[str]]:
    from pipeline.io.delta import storage_options_for, table_uri

    cli = [sys.executable, "-m", "pipeline.cli"]
    storage = [f"--storage-option={key}={json.dumps(value) if not isinstance(value, str) else value}"
               for key, value in options.items() if key in ("endpoint_url",)]
    plan = [*cli, "nightly", "--input", input_uri, "--output", output_uri, "--model", "tiny-random",
            "--precision", "fp32", "--shards-per-unit", str(SHARDS_PER_UNIT), "--dry-run", *head_args, *storage]
    delta = [table_uri(output_uri), json.dumps(storage_options_for(output_uri, options))]
    listing = ("import sys, json; from pipeline.io.shards import list_shards; "
               "print(len(list_shards([sys.argv[1]], json.loads(sys.argv[2]))), 'shards')")
    return {
        "list the input": [sys.executable, "-c", listing, input_uri, json.dumps(options)],
        "cutoffs": [*cli, "cutoffs", output_uri, *storage],
        "status": [*cli, "status", output_uri, "--input", input_uri, *storage],
        "nightly, nothing new": plan,
        "nightly, 100 new shards": plan,
        "Polars open": [sys.executable, "-c", POLARS, *delta],
        "DuckDB open": [sys.executable, "-c", DUCKDB, *delta],
    }


@dataclass(frozen=True)
class Timed:
    store: str
    units: int
    label: str
    wall: float
    rss: float
    last: str
    served: dict[str, tuple[int, float]]  # kind -> (requests, seconds) the S3 server answered for the command

    @property
    def listing_s(self) -> float:
        """Seconds the S3 server spent answering LIST pages (moto's own cost; 0 on a local disk)."""
        return self.served.get("LIST", (0, 0.0))[1]

    def line(self) -> str:
        served = "  ".join(f"{kind} {count} ({seconds:.2f} s)" for kind, (count, seconds) in sorted(self.served.items()))
        return (f"  {self.label:26s} {self.wall:7.2f} s {self.rss:8.0f} MiB   {self.last[:90]}"
                + (f"\n  {'':26s} server: {served}" if served else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, nargs="+", default=[1000, 10000, 58000])
    parser.add_argument("--stores", nargs="+", default=["local", "s3"], choices=("local", "s3"))
    parser.add_argument("--no-optimize", dest="optimize", action="store_false",
                        help="skip `aesthetics optimize` and the commands timed again after it")
    args = parser.parse_args(argv)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

    from bench.s3_server import S3Server, difference
    from bench.table import text_table

    scratch = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    server = None
    try:
        print("a real run for the template unit ...", flush=True)
        record, files, head_args = _template(scratch)
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        options: dict[str, Any] = {}
        if "s3" in args.stores:
            server = S3Server()
            options = {"endpoint_url": server.endpoint}
            for name, value in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                                "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}.items():
                os.environ[name] = env[name] = value

        results: list[Timed] = []

        def timed(store: str, units: int, label: str, command: list[str]) -> Timed:
            counted = server is not None and store == "s3"
            before = server.served() if counted else {}
            wall, rss, last = measure(command, env)
            served = difference(server.served(), before) if counted else {}
            result = Timed(store, units, label, wall, rss, last, served)
            results.append(result)
            print(result.line(), flush=True)
            return result

        for store in args.stores:
            for units in args.units:
                name = f"{store}-{units}"
                if store == "local":
                    input_uri, output_uri, opts = str(scratch / name / "shards"), str(scratch / name / "scores"), {}
                else:
                    # The input and the output in buckets of their own, as a deployment keeps them.
                    for bucket in (f"scale-{units}-shards", f"scale-{units}-scores"):
                        server.create_bucket(bucket)
                    input_uri, output_uri = f"s3://scale-{units}-shards/shards", f"s3://scale-{units}-scores/scores"
                    opts = options
                seconds = fabricate(units, input_uri, output_uri, record, files, opts, server)
                print(f"{name}: fabricated in {seconds:.0f} s (tar, sidecar and stats file per shard)", flush=True)
                if store == "s3":
                    print(f"  one empty listing page of the input on this server: {_one_page(input_uri, units, opts):.2f} s "
                          f"({units * SHARDS_PER_UNIT * len(shard_files(0)):,} objects in its bucket)", flush=True)
                for label, command in commands(input_uri, output_uri, opts, head_args).items():
                    if label == "list the input" and store == "s3" and units > FULL_LISTING_ON_MOTO:
                        print(f"  {label:26s} not timed: moto sorts the whole bucket for every page", flush=True)
                        continue
                    if label == "nightly, 100 new shards":
                        _add_new_shards(input_uri, units, opts, server)
                    timed(store, units, label, command)
                if args.optimize:
                    runs = commands(input_uri, output_uri, opts, head_args)
                    optimize = [*runs["cutoffs"][:3], "optimize", output_uri, *runs["cutoffs"][5:]]
                    timed(store, units, "optimize", optimize)
                    for label in AFTER_OPTIMIZE:
                        timed(store, units, f"{label}, optimized", runs[label])
                if store == "local":
                    shutil.rmtree(scratch / name, ignore_errors=True)
        print()
        print(text_table(["store", "units", "command", "wall s", "of which LIST on the server s", "peak RSS MiB"],
                         [[r.store, f"{r.units:,}", r.label, f"{r.wall:.2f}",
                           f"{r.listing_s:.2f}" if r.store == "s3" else "", f"{r.rss:.0f}"] for r in results]))
        _verdicts(results)
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


def _verdicts(results: list[Timed]) -> None:
    by_key = {(r.store, r.units, r.label): r for r in results}
    for (store, units, label), result in sorted(by_key.items()):
        if store == "s3" and units == 58000 and label in TARGETS_58K_S3:
            target = TARGETS_58K_S3[label]
            print(f"target at 58,000 units on S3: {label} {result.wall:.2f} s (<= {target:g} s): "
                  f"{'met' if result.wall <= target else 'NOT met'}")
        small = by_key.get((store, 1000, label))
        if units > 1000 and small:
            ratio = result.wall / small.wall
            text = f"{store} {label}: {units:,} units / 1,000 units = {ratio:.2f}x ({'within' if ratio <= 2 else 'NOT within'} 2x)"
            if store == "s3" and (result.listing_s or small.listing_s):
                apart = (result.wall - result.listing_s) / (small.wall - small.listing_s)
                text += (f"; without the server's LIST seconds {apart:.2f}x "
                         f"({'within' if apart <= 2 else 'NOT within'} 2x)")
            print(text)


def _one_page(input_uri: str, units: int, options: dict[str, Any]) -> float:
    """Seconds for one listing page after the input's last key: what S3 answers at once, moto by sorting."""
    import boto3

    bucket, prefix = input_uri[len("s3://"):].split("/", 1)
    client = boto3.client("s3", endpoint_url=options["endpoint_url"], region_name="us-east-1")
    last = f"{prefix}/{shard_files(units * SHARDS_PER_UNIT - 1)[-1]}"
    started = time.perf_counter()
    client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/", StartAfter=last)
    return time.perf_counter() - started


def _add_new_shards(input_uri: str, units: int, options: dict[str, Any], server: Any) -> None:
    from pipeline.io.storage import filesystem, join

    fs, root = filesystem(input_uri, options)
    first = units * SHARDS_PER_UNIT
    _put(fs, {join(root, name): b"" for n in range(first, first + NEW_SHARDS) for name in shard_files(n)}, server)


if __name__ == "__main__":
    sys.exit(main())
