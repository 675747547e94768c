"""`make bench`: the CPU figures of the scoring job, all on the same img2dataset-made shards.

    .venv/bin/python -m bench.run_cpu [--shards 8] [--per-shard 100] [--scale 10] [--memory-scale 10]

Measured with the tiny random-weight model (tiny-random, fp32) and one batch size throughout:

1. decode images/s: the Decode stage alone over the shards' image bytes, one process, one thread;
2. model-only images/s: EmbedScore on the pixels step 1 decoded (same loader and model as the job), at
   torch's default threads and at 1 thread (what a Ray actor with num_cpus=1 gets: OMP_NUM_THREADS=1);
3. end-to-end images/s through Ray: run_score (read -> decode -> embed -> stage -> Parquet committed) on
   ``--shards`` shards. Ray is started and warmed on a separate 1-shard input first, so Ray's start-up and
   the workers' imports are not timed. Ray Data still starts a fresh embed actor (new process: imports
   torch + open_clip, loads the model) inside every run_score: that is part of each timed run;
4. end-to-end of a plain single-process loop doing the same work with the same code (bench.plain_loop),
   warmed the same way, at torch's default threads and at 1 thread; the Ray / plain throughput ratio is
   taken against the faster of the two;
5. the job's peak memory: RSS of the driver + every Ray worker process (``ray::*``, Ray's per-node agents
   excepted), sampled every 0.2 s with psutil from a process of its own (bench.memory), at 1x, at
   ``--scale`` x and at ``--memory-scale`` x that (the same shards copied under new numbers; 8 / 80 /
   800 shards). The goal (flat: under 1.25x when the input grows 10x) is checked from 80 to 800 shards:
   the 800-image 1x run ends before decode has run ahead as far as backpressure lets it, so its peak is
   not the job's steady-state peak;
6. from the 1x and 10x runs, each side's marginal (steady-state) rate and so Ray's fixed cost per run.

Each side runs in its own spawned process, so the Ray driver holds only what `aesthetics score` would
(not the plain loop's model or open_clip): the job's driver is measured, not the benchmark's. Plain and
Ray runs alternate, so a machine shared with other work slows both alike; the load average at each run
is printed. Shards are built once under bench-output/cpu/ (gitignored, ~30 s) and reused; a run takes
about 4 min on 2 cores (the 800-shard run alone 2-3 min). Goals are checked and printed as met or MISSED.
BENCHMARKS.md has the figures.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import platform
import shutil
import sys
import time
import traceback
from importlib.metadata import version
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from bench.memory import MemorySampler
from bench.table import text_table

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench-output" / "cpu"
BROKEN_URLS = 3  # build_sample_dataset's default failures: 3 URLs that 404 + 1 text body
NON_IMAGE = 1

GOAL_RATIO = 0.7  # Ray / plain throughput at 1x
THROUGHPUT_TARGET_RATIO = 0.85
GOAL_MEMORY_RATIO = 1.25  # peak memory when the input grows 10x (80 -> 800 shards)


# Input -----------------------------------------------------------------------------------------

def sample_shards(n_shards: int, per_shard: int, image_size: int) -> tuple[Path, int]:
    """``n_shards`` img2dataset shards of ``per_shard`` samples (4 of them failed URLs), built once.
    Returns (shards folder, images with bytes in the tars)."""
    folder = OUT / f"data-{n_shards}x{per_shard}-{image_size}px"
    marker = folder / "BUILT.json"
    if marker.exists() and len(list((folder / "shards").glob("*.tar"))) == n_shards:
        return folder / "shards", json.loads(marker.read_text())["images"]
    from pipeline.sample_data import build_sample_dataset

    shutil.rmtree(folder, ignore_errors=True)
    print(f"building {n_shards} shards x {per_shard} samples with img2dataset under {folder} ...", flush=True)
    n_images = n_shards * per_shard - BROKEN_URLS - NON_IMAGE
    dataset = build_sample_dataset(folder, n_images=n_images, images_per_shard=per_shard, image_size=image_size,
                                   broken_urls=BROKEN_URLS, non_image=bool(NON_IMAGE))
    if len(dataset.tar_paths) != n_shards:
        raise RuntimeError(f"img2dataset wrote {len(dataset.tar_paths)} shards, expected {n_shards}")
    shutil.rmtree(folder / "photos", ignore_errors=True)  # the source photos are not needed again
    marker.write_text(json.dumps({"images": len(dataset.expected_keys), "build_s": dataset.build_seconds}))
    print(f"  built in {dataset.build_seconds:.0f}s", flush=True)
    return folder / "shards", len(dataset.expected_keys)


def copied_shards(source: Path, name: str, copies: int, first: int | None = None) -> Path:
    """The shards of ``source`` (or its first ``first``) copied ``copies`` times under new numbers."""
    tars = sorted(source.glob("*.tar"))[:first]
    folder = OUT / f"{source.parent.name}-{name}" / "shards"
    expected = [f"{c * len(tars) + i:05d}" for c in range(copies) for i in range(len(tars))]
    if sorted(p.stem for p in folder.glob("*.tar")) == expected:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for number, tar in zip(expected, [t for _ in range(copies) for t in tars]):
        shutil.copyfile(tar, folder / f"{number}.tar")
        shutil.copyfile(tar.with_suffix(".parquet"), folder / f"{number}.parquet")
    return folder


def fresh_output(name: str) -> str:
    path = OUT / "runs" / name
    shutil.rmtree(path, ignore_errors=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    return str(path)


def make_config(inputs: str, output: str, batch_size: int, **resources: Any):
    """The integration tests' set-up: tiny-random fp32, the real LAION V2 head when ../shared has it."""
    from pipeline.config import DecodeConfig, ModelConfig, ResourcesConfig, ScoreConfig
    from pipeline.demo import v2_head_or_stand_in

    heads, weights_dirs = v2_head_or_stand_in(OUT / "heads")
    return ScoreConfig(
        input=(inputs,), output=output, model=ModelConfig(name="tiny-random", precision="fp32"),
        heads=heads, weights_dirs=weights_dirs, decode=DecodeConfig(batch_size=batch_size),
        resources=ResourcesConfig(embed_batch_size=batch_size, **resources),
    )


# Stage benchmarks (plain side) -----------------------------------------------------------------

def read_batches(shards_dir: Path, batch_size: int) -> list[dict[str, np.ndarray]]:
    """Every shard read and joined as the read stage does, cut into numpy batches of ``batch_size`` rows."""
    import pyarrow as pa

    from bench.batches import numpy_batch
    from pipeline.stages.read import read_shard_rows, to_table

    tables = []
    for tar in sorted(shards_dir.glob("*.tar")):
        rows = read_shard_rows(str(tar), str(tar.with_suffix(".parquet")))
        tables.append(to_table(rows, str(tar), "bench"))
    table = pa.concat_tables(tables)
    return [numpy_batch(table.slice(s, batch_size)) for s in range(0, table.num_rows, batch_size)]


def best_pass(run: Callable[[], Any], min_seconds: float = 2.0, max_passes: int = 10) -> float:
    """Wall seconds of the fastest pass, after one warm-up pass."""
    run()
    times: list[float] = []
    while len(times) < max_passes and (sum(times) < min_seconds or len(times) < 3):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def stage_benchmarks(shards: str, batch_size: int) -> dict[str, Any]:
    """Decode alone, then EmbedScore alone on what decode produced."""
    import torch

    from pipeline import schema as S
    from pipeline.models.clip import image_geometry
    from pipeline.stages.decode import Decode
    from pipeline.stages.embed import EmbedScore

    config = make_config(shards, fresh_output("unused"), batch_size)
    batches = read_batches(Path(shards), batch_size)
    size, interpolation = image_geometry(config.model)
    decode = Decode(config.decode, image_size=size, interpolation=interpolation)
    decoded: list[dict[str, np.ndarray]] = []

    def run_decode() -> None:
        decoded[:] = [decode(batch) for batch in batches]

    decode_s = best_pass(run_decode)
    images = sum(int((b[S.STATUS] == S.Status.OK.value).sum()) for b in decoded)

    pixels = np.concatenate([b[S.PIXELS][b[S.STATUS] == S.Status.OK.value] for b in decoded])
    captions = np.concatenate([b[S.CAPTION][b[S.STATUS] == S.Status.OK.value] for b in decoded])
    if len(pixels) < batch_size:
        pixels = np.resize(pixels, (batch_size,) + pixels.shape[1:])
        captions = np.resize(captions, batch_size)
    n_batches = len(pixels) // batch_size
    model_batches = [{S.PIXELS: pixels[i * batch_size:(i + 1) * batch_size],
                      S.CAPTION: captions[i * batch_size:(i + 1) * batch_size],
                      S.STATUS: np.full(batch_size, S.Status.OK.value, dtype=object),
                      S.ERROR: np.full(batch_size, None, dtype=object)} for i in range(n_batches)]
    default_threads = torch.get_num_threads()
    stage = EmbedScore(config.model, config.heads, search_dirs=config.weights_dirs,
                       caption_similarity=config.caption_similarity)
    model_rates = {}
    for threads in sorted({default_threads, 1}, reverse=True):
        torch.set_num_threads(threads)
        model_rates[threads] = n_batches * batch_size / best_pass(lambda: [stage(b) for b in model_batches])
    torch.set_num_threads(default_threads)
    # clip_similarity's share of the model stage: the same stage without the captions' text tower.
    images_only = EmbedScore(config.model, config.heads, search_dirs=config.weights_dirs, caption_similarity=False)
    images_only_rate = n_batches * batch_size / best_pass(lambda: [images_only(b) for b in model_batches])
    return {"decode_rate": images / decode_s, "images": images, "model_rates": model_rates,
            "default_threads": default_threads,
            "similarity_share": 1 - model_rates[default_threads] / images_only_rate}


# Runs (each in its own child process) ----------------------------------------------------------

def ray_start() -> dict[str, Any]:
    import ray

    from pipeline.ray_session import start_local_ray

    started = time.perf_counter()
    start_local_ray(num_cpus=2, log_to_driver=False, configure_logging=False)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    return {"seconds": time.perf_counter() - started}


def ray_run(shards: str, images: int, batch_size: int, output: str, resources: dict) -> dict[str, Any]:
    from pipeline.runner import run_score

    config = make_config(shards, fresh_output(output), batch_size, **resources)
    load = os.getloadavg()[0]
    with MemorySampler() as sampler:
        start = time.perf_counter()
        summary = run_score(config)
        seconds = time.perf_counter() - start
    if not summary.ok or (images and summary.scored != images):
        raise RuntimeError(f"Ray run on {shards}: scored {summary.scored} of {images}; failed {summary.units_failed}")
    return {"seconds": seconds, "rows": summary.rows, "load": load, **sampler.result()}


def plain_run(shards: str, images: int, batch_size: int, output: str, threads: int | None) -> dict[str, Any]:
    import torch

    from bench.plain_loop import run_plain

    default = torch.get_num_threads()
    torch.set_num_threads(threads or default)
    config = make_config(shards, fresh_output(output), batch_size)
    load = os.getloadavg()[0]
    try:
        with MemorySampler(driver_only=True) as sampler:
            start = time.perf_counter()
            summary = run_plain(config)
            seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(default)
    if images and summary.scored != images:
        raise RuntimeError(f"plain run on {shards}: scored {summary.scored} of {images}")
    return {"seconds": seconds, "rows": summary.rows, "load": load, "threads": threads or default,
            "stage_s": {k: round(v, 2) for k, v in summary.stage_s.items()}, **sampler.result()}


def ray_task_threads() -> dict[str, Any]:
    """What a Ray task with num_cpus=1 sees: OMP_NUM_THREADS and torch's threads."""
    import ray

    def probe():
        import torch

        return os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads()

    omp, threads = ray.get(ray.remote(num_cpus=1)(probe).remote())
    return {"omp": omp, "torch_threads": threads}


_HANDLERS: dict[str, Callable[..., dict[str, Any]]] = {
    "ray_start": ray_start, "ray_run": ray_run, "plain_run": plain_run, "stages": stage_benchmarks,
    "ray_task_threads": ray_task_threads,
}


def _serve(conn) -> None:
    """A child's loop: (handler, kwargs) in, its result (or the traceback) out, until None."""
    while True:
        message = conn.recv()
        if message is None:
            break
        name, kwargs = message
        try:
            conn.send({"ok": _HANDLERS[name](**kwargs)})
        except BaseException:  # noqa: BLE001 - reported to the parent, which raises
            conn.send({"error": traceback.format_exc()})
    conn.close()


class Child:
    """A spawned process running :func:`_serve`: one side of the comparison."""

    def __init__(self, name: str):
        context = multiprocessing.get_context("spawn")
        self.name = name
        self.conn, theirs = context.Pipe()
        self.process = context.Process(target=_serve, args=(theirs,), name=f"bench-{name}")
        self.process.start()

    def __call__(self, handler: str, **kwargs: Any) -> dict[str, Any]:
        self.conn.send((handler, kwargs))
        reply = self.conn.recv()
        if "error" in reply:
            raise RuntimeError(f"{self.name} child, {handler}:\n{reply['error']}")
        return reply["ok"]

    def close(self) -> None:
        if self.process.is_alive():
            self.conn.send(None)
            self.process.join(timeout=120)
        if self.process.is_alive():
            self.process.terminate()


# Report ----------------------------------------------------------------------------------------

def machine() -> dict[str, str]:
    import psutil

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "memory": f"{psutil.virtual_memory().total / 2**30:.0f} GiB",
        "python": platform.python_version(),
    }


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def marginal_rate(images_small: int, seconds_small: float, images_large: int, seconds_large: float) -> float | None:
    """Images/s of the extra work between two runs: the rate with each run's fixed cost taken out."""
    extra = seconds_large - seconds_small
    return (images_large - images_small) / extra if extra > 0 else None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=8, help="shards of the 1x input")
    parser.add_argument("--per-shard", type=int, default=100, help="samples per shard (4 in all are failed URLs)")
    parser.add_argument("--image-size", type=int, default=256, help="img2dataset's short side, px")
    parser.add_argument("--scale", type=int, default=10, help="the large input is this many copies of the 1x")
    parser.add_argument("--memory-scale", type=int, default=10,
                        help="one more Ray run on this many times the large input, for memory flatness (0: none)")
    parser.add_argument("--batch-size", type=int, default=256, help="decode and embed batch size, everywhere")
    parser.add_argument("--repeats", type=int, default=2, help="timed end-to-end runs at 1x per side (best kept)")
    parser.add_argument("--resources", default="{}",
                        help="JSON of ResourcesConfig overrides for the Ray runs, e.g. '{\"cpus_per_actor\": 0.5}'")
    args = parser.parse_args(argv)
    resources = json.loads(args.resources)
    started = time.perf_counter()
    load_before = os.getloadavg()

    shards, images = sample_shards(args.shards, args.per_shard, args.image_size)
    warm = copied_shards(shards, "warm", 1, first=1)
    large = copied_shards(shards, f"x{args.scale}", args.scale)
    n_large = args.shards * args.scale
    print(f"input: {args.shards} shards ({images} images + {BROKEN_URLS + NON_IMAGE} failed URLs) in {shards}; "
          f"{args.scale}x: {n_large} shards in {large}", flush=True)

    plain, ray_side = Child("plain"), Child("ray")
    try:
        print("decode alone, model alone (plain process) ...", flush=True)
        stages = plain("stages", shards=str(shards), batch_size=args.batch_size)
        if stages["images"] != images:
            raise RuntimeError(f"decode made {stages['images']} images of {images}")

        print("starting Ray, warming both sides on a 1-shard input (not timed) ...", flush=True)
        ray_up = ray_side("ray_start")
        t = time.perf_counter()
        ray_side("ray_run", shards=str(warm), images=0, batch_size=args.batch_size, output="warm-ray",
                 resources=resources)
        ray_warm_s = time.perf_counter() - t
        plain("plain_run", shards=str(warm), images=0, batch_size=args.batch_size, output="warm-plain", threads=None)

        threads_options = sorted({stages["default_threads"], 1}, reverse=True)
        plain_1x: dict[int, list[dict]] = {n: [] for n in threads_options}
        ray_1x: list[dict] = []
        for rep in range(args.repeats):
            for n in threads_options:
                print(f"plain loop, {args.shards} shards, {n} torch thread(s), run {rep + 1} ...", flush=True)
                plain_1x[n].append(plain("plain_run", shards=str(shards), images=images, batch_size=args.batch_size,
                                         output=f"plain-1x-t{n}-{rep}", threads=n))
            print(f"Ray run_score, {args.shards} shards, run {rep + 1} ...", flush=True)
            ray_1x.append(ray_side("ray_run", shards=str(shards), images=images, batch_size=args.batch_size,
                                   output=f"ray-1x-{rep}", resources=resources))

        best_threads = min(threads_options, key=lambda n: min(r["seconds"] for r in plain_1x[n]))
        print(f"Ray run_score, {n_large} shards ...", flush=True)
        ray_large = ray_side("ray_run", shards=str(large), images=images * args.scale, batch_size=args.batch_size,
                             output=f"ray-{args.scale}x", resources=resources)
        print(f"plain loop, {n_large} shards, {best_threads} torch thread(s) ...", flush=True)
        plain_large = plain("plain_run", shards=str(large), images=images * args.scale,
                            batch_size=args.batch_size, output=f"plain-{args.scale}x", threads=best_threads)
        ray_huge = None
        if args.memory_scale:
            huge = copied_shards(shards, f"x{args.scale * args.memory_scale}", args.scale * args.memory_scale)
            print(f"Ray run_score, {n_large * args.memory_scale} shards (memory at scale) ...", flush=True)
            ray_huge = ray_side("ray_run", shards=str(huge), images=images * args.scale * args.memory_scale,
                                batch_size=args.batch_size, output=f"ray-{args.scale * args.memory_scale}x",
                                resources=resources)
        task_threads = ray_side("ray_task_threads")
    finally:
        plain.close()
        ray_side.close()

    info = machine()
    plain_best = {n: min(runs, key=lambda r: r["seconds"]) for n, runs in plain_1x.items()}
    plain_ref = plain_best[best_threads]
    ray_best = min(ray_1x, key=lambda r: r["seconds"])
    plain_rate = images / plain_ref["seconds"]
    ray_rate = images / ray_best["seconds"]
    ratio = ray_rate / plain_rate
    n_big = images * args.scale
    ray_peak_1x = max(r["peak_rss"] for r in ray_1x)
    ray_pss_1x = max(r["peak_pss"] for r in ray_1x)
    memory_ratio = ray_large["peak_rss"] / ray_peak_1x
    ray_marginal = marginal_rate(images, ray_best["seconds"], n_big, ray_large["seconds"])
    plain_marginal = marginal_rate(images, plain_ref["seconds"], n_big, plain_large["seconds"])
    ray_fixed = ray_best["seconds"] - images / ray_marginal if ray_marginal else None
    ratio_large = plain_large["seconds"] / ray_large["seconds"]  # same images: throughput ratio
    total = time.perf_counter() - started

    def rate_cell(n: int, run: dict) -> str:
        return f"{n / run['seconds']:,.1f} img/s ({run['seconds']:.2f} s)"

    rows = [
        ("decode: Decode stage alone, 1 process, 1 thread", f"{stages['decode_rate']:,.0f} img/s", "", ""),
    ]
    for n, rate in sorted(stages["model_rates"].items(), key=lambda kv: -int(kv[0])):
        rows.append((f"model only: EmbedScore on decoded pixels, {n} torch thread(s)", f"{rate:,.0f} img/s", "", ""))
    rows.append(("clip_similarity: its share of the model-only time (captions' text tower)",
                 f"{stages['similarity_share']:.0%}", "", ""))
    for n in threads_options:
        mark = "  <- reference" if n == best_threads else ""
        rows.append((f"end to end, plain loop, {args.shards} shards, {n} torch thread(s){mark}",
                     rate_cell(images, plain_best[n]), "", ""))
    rows += [
        (f"end to end, Ray run_score, {args.shards} shards (Ray start-up excluded)", rate_cell(images, ray_best), "", ""),
        (f"Ray / plain throughput, {args.shards} shards", f"{ratio:.2f}x", f">= {GOAL_RATIO}x", verdict(ratio >= GOAL_RATIO)),
        ("", "", f">= {THROUGHPUT_TARGET_RATIO}x (target)", verdict(ratio >= THROUGHPUT_TARGET_RATIO)),
        (f"end to end, plain loop, {n_large} shards", rate_cell(n_big, plain_large), "", ""),
        (f"end to end, Ray run_score, {n_large} shards", rate_cell(n_big, ray_large), "", ""),
        (f"Ray / plain throughput, {n_large} shards", f"{ratio_large:.2f}x",
         f">= {THROUGHPUT_TARGET_RATIO}x (target)", verdict(ratio_large >= THROUGHPUT_TARGET_RATIO)),
        (f"steady state ({args.shards}->{n_large} shards, marginal): plain / Ray",
         f"{plain_marginal or float('nan'):,.1f} / {ray_marginal or float('nan'):,.1f} img/s", "", ""),
        ("  Ray / plain, steady state",
         f"{ray_marginal / plain_marginal:.2f}x" if ray_marginal and plain_marginal else "n/a", "", ""),
        ("  Ray's fixed cost per run (mostly the embed actor's cold start)",
         f"{ray_fixed:.1f} s" if ray_fixed is not None else "n/a", "", ""),
        (f"peak RSS, driver + Ray workers, {args.shards} shards",
         f"{mib(ray_peak_1x)} ({max(r['workers'] for r in ray_1x)} workers)", "", ""),
        (f"peak RSS, driver + Ray workers, {n_large} shards",
         f"{mib(ray_large['peak_rss'])} ({ray_large['workers']} workers)", "", ""),
        (f"peak memory {args.scale}x / 1x (RSS; the 1x run is too short to fill the pipeline)",
         f"{memory_ratio:.2f}x", "", ""),
        (f"  same in PSS (shared pages once; sampled every 2 s): {mib(ray_pss_1x)} -> {mib(ray_large['peak_pss'])}",
         f"{ray_large['peak_pss'] / ray_pss_1x:.2f}x", "", ""),
        ("  not counted: raylet, GCS, Ray agents (RSS, 1x / 10x)",
         f"{mib(max(r['daemons_rss'] for r in ray_1x))} / {mib(ray_large['daemons_rss'])}", "", ""),
        (f"  plain loop, one process, peak RSS ({args.shards} / {n_large} shards)",
         f"{mib(plain_ref['peak_rss'])} / {mib(plain_large['peak_rss'])}", "", ""),
    ]
    if ray_huge is not None:
        n_huge, huge_ratio = n_big * args.memory_scale, ray_huge["peak_rss"] / ray_large["peak_rss"]
        rows += [
            (f"end to end, Ray run_score, {n_large * args.memory_scale} shards", rate_cell(n_huge, ray_huge), "", ""),
            ("  Ray there / plain loop's steady-state rate",
             f"{(n_huge / ray_huge['seconds']) / plain_marginal:.2f}x" if plain_marginal else "n/a", "", ""),
            (f"peak RSS, driver + Ray workers, {n_large * args.memory_scale} shards",
             f"{mib(ray_huge['peak_rss'])} ({ray_huge['workers']} workers)", "", ""),
            (f"peak memory {n_large * args.memory_scale} / {n_large} shards (RSS)", f"{huge_ratio:.2f}x",
             f"< {GOAL_MEMORY_RATIO}x", verdict(huge_ratio < GOAL_MEMORY_RATIO)),
            (f"  same in PSS: {mib(ray_large['peak_pss'])} -> {mib(ray_huge['peak_pss'])}",
             f"{ray_huge['peak_pss'] / ray_large['peak_pss']:.2f}x", "", ""),
        ]

    print()
    print("=" * 110)
    print(f"make bench (CPU), {info['date']}")
    print(f"machine: nproc={info['nproc']}, {info['cpu']}, {info['memory']} RAM, no GPU used; "
          f"load average at start {load_before[0]:.1f} (1 min) / {load_before[1]:.1f} (5 min)")
    print(f"software: python {info['python']}, torch {version('torch')} ({stages['default_threads']} threads by "
          f"default), ray {version('ray')}; a Ray task with num_cpus=1 sees "
          f"OMP_NUM_THREADS={task_threads['omp']}, torch threads {task_threads['torch_threads']}")
    print(f"input: {args.shards} img2dataset shards x {args.per_shard} samples, {args.image_size} px short side = "
          f"{images} images + {BROKEN_URLS + NON_IMAGE} failed URLs; {args.scale}x = the same shards copied to "
          f"{n_large} numbers ({n_big} images)")
    print(f"model: tiny-random fp32 (224 px), 1 head; batch size {args.batch_size} for decode and embed; "
          f"shards_per_unit 4; Ray: num_cpus=2, resources "
          f"{'as configured by default' if not resources else resources}")
    print()
    print(text_table(("figure", "value", "goal", "result"), rows, numbers_right=False))
    print()
    print("timed runs, seconds (load average when each started):")
    for n in threads_options:
        print(f"  plain {args.shards} shards, {n} thread(s): "
              + ", ".join(f"{r['seconds']:.2f} ({r['load']:.1f})" for r in plain_1x[n]))
    print(f"  Ray   {args.shards} shards: " + ", ".join(f"{r['seconds']:.2f} ({r['load']:.1f})" for r in ray_1x)
          + f"   peaks: {', '.join(mib(r['peak_rss']) for r in ray_1x)}")
    print(f"  plain {n_large} shards: {plain_large['seconds']:.2f} ({plain_large['load']:.1f});  "
          f"Ray {n_large} shards: {ray_large['seconds']:.2f} ({ray_large['load']:.1f})")
    print(f"  not timed: ray.init {ray_up['seconds']:.1f} s, Ray warm-up run on 1 shard {ray_warm_s:.1f} s")
    print(f"CPU seconds spent (user+system) -- plain {args.shards} / {n_large} shards: {plain_ref['cpu_s']['driver']} / "
          f"{plain_large['cpu_s']['driver']};  Ray {args.shards} shards: {ray_best['cpu_s']};  Ray {n_large} shards: "
          f"{ray_large['cpu_s']}")
    print(f"plain loop's seconds by stage ({args.shards} shards, reference run): {plain_ref['stage_s']}")
    print(f"plain loop's seconds by stage ({n_large} shards): {plain_large['stage_s']}")
    print(f"bench wall time: {total:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
