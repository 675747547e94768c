"""`make bench`: the CPU figures of the scoring job, all on the same img2dataset-made shards.

    .venv/bin/python -m bench.run_cpu [--shards 8] [--per-shard 20] [--scale 10] [--batch-size 64]

Measured, with the tiny random-weight model (tiny-random, fp32) and one batch size throughout:

1. decode images/s: the Decode stage alone over the shards' image bytes, in this one process;
2. model-only images/s: EmbedScore on the pixels step 1 decoded (same loader and model as the job), at the
   process's torch threads and at 1 thread (what a Ray actor with num_cpus=1 gets: OMP_NUM_THREADS=1);
3. end-to-end images/s through Ray: run_score (read -> decode -> embed -> stage -> Parquet committed) on
   ``--shards`` shards, Ray started and warmed on a separate 1-shard input first, so start-up, imports and
   the first actor are not timed (the run's own actor start and model load are);
4. end-to-end images/s of a plain single-process loop doing the same work with the same code
   (bench.plain_loop), and the ratio Ray / plain;
5. the job's peak memory (RSS of the driver + every Ray worker process, sampled every 0.2 s) at 1x and
   at ``--scale`` x the input (the same shards copied under new numbers), and the ratio of the two.

Shards are built once under bench-output/cpu/ (gitignored) and reused. Runs take ~3-4 min here after
the first build (~1 min). Goals are checked and printed as met or MISSED.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench-output" / "cpu"
SHARED_HEADS = ROOT.parent / "shared" / "reference" / "laion-aesthetics" / "heads"
BROKEN_URLS = 3  # build_sample_dataset's default failures: 3 URLs that 404 + 1 text body
NON_IMAGE = 1

GOAL_RATIO = 0.7  # Ray / plain throughput at 1x
ISSUE5_RATIO = 0.85
GOAL_MEMORY_RATIO = 1.25  # peak memory at 10x input / at 1x


# Input -----------------------------------------------------------------------------------------

def sample_shards(n_shards: int, per_shard: int, image_size: int) -> tuple[Path, int]:
    """``n_shards`` img2dataset shards of ``per_shard`` samples (4 of them failed URLs), built once.
    Returns (shards folder, images with bytes in the tars)."""
    from pipeline.sample_data import build_sample_dataset

    folder = OUT / f"data-{n_shards}x{per_shard}-{image_size}px"
    marker = folder / "BUILT.json"
    n_images = n_shards * per_shard - BROKEN_URLS - NON_IMAGE
    if marker.exists() and len(list((folder / "shards").glob("*.tar"))) == n_shards:
        return folder / "shards", json.loads(marker.read_text())["images"]
    shutil.rmtree(folder, ignore_errors=True)
    print(f"building {n_shards} shards x {per_shard} samples with img2dataset under {folder} ...", flush=True)
    dataset = build_sample_dataset(folder, n_images=n_images, images_per_shard=per_shard, image_size=image_size)
    if len(dataset.tar_paths) != n_shards:
        raise RuntimeError(f"img2dataset wrote {len(dataset.tar_paths)} shards, expected {n_shards}")
    shutil.rmtree(folder / "photos", ignore_errors=True)  # the source photos are not needed again
    marker.write_text(json.dumps({"images": len(dataset.expected_keys), "build_s": dataset.build_seconds}))
    print(f"  built in {dataset.build_seconds:.0f}s", flush=True)
    return folder / "shards", len(dataset.expected_keys)


def copied_shards(source: Path, name: str, copies: int, first: int | None = None) -> Path:
    """The shards of ``source`` (or its first ``first``) copied ``copies`` times under new numbers."""
    tars = sorted(source.glob("*.tar"))[:first]
    folder = OUT / name / "shards"
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
    from pipeline.config import DEFAULT_HEAD, KNOWN_HEADS, DecodeConfig, HeadSpec, ModelConfig, \
        ResourcesConfig, ScoreConfig, WeightsSpec

    if (SHARED_HEADS / "sac+logos+ava1-l14-linearMSE.pth").exists():
        heads, weights_dirs = (KNOWN_HEADS[DEFAULT_HEAD],), (str(SHARED_HEADS),)
    else:
        from pipeline.demo import _random_v2_head

        path, digest = _random_v2_head(OUT / "heads")
        heads, weights_dirs = (HeadSpec("random-v2", WeightsSpec(path, digest)),), ()
    return ScoreConfig(
        input=(inputs,), output=output, model=ModelConfig(name="tiny-random", precision="fp32"),
        heads=heads, weights_dirs=weights_dirs, decode=DecodeConfig(batch_size=batch_size),
        resources=ResourcesConfig(embed_batch_size=batch_size, **resources),
    )


# Memory ----------------------------------------------------------------------------------------

class MemorySampler:
    """Every ``interval`` s: RSS (and PSS) of this process + every Ray worker process (``ray::*``), and of
    Ray's own daemons (raylet, GCS, agents) on the side. Workers are the driver's descendants, since
    ray.init() started the local cluster from here."""

    def __init__(self, interval: float = 0.2):
        import psutil

        self.psutil = psutil
        self.interval = interval
        self.driver = psutil.Process()
        self.peak_rss = self.peak_pss = self.peak_daemons_rss = 0
        self.peak_workers = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> tuple[int, int, int, int]:
        rss = pss = daemons = workers = 0
        for proc in [self.driver] + self.driver.children(recursive=True):
            try:
                is_worker = proc is self.driver or proc.cmdline()[:1] and proc.cmdline()[0].startswith("ray::")
                info = proc.memory_full_info()
            except (self.psutil.NoSuchProcess, self.psutil.AccessDenied, self.psutil.ZombieProcess, IndexError):
                continue
            if is_worker:
                rss += info.rss
                pss += getattr(info, "pss", info.rss)
                workers += proc is not self.driver
            else:
                daemons += info.rss
        return rss, pss, daemons, workers

    def _loop(self) -> None:
        while not self._stop.is_set():
            rss, pss, daemons, workers = self.sample()
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_pss = max(self.peak_pss, pss)
            self.peak_daemons_rss = max(self.peak_daemons_rss, daemons)
            self.peak_workers = max(self.peak_workers, workers)
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


# Stage benchmarks ------------------------------------------------------------------------------

def read_batches(shards_dir: Path, batch_size: int) -> list[dict[str, np.ndarray]]:
    """Every shard read and joined as the read stage does, cut into numpy batches of ``batch_size`` rows."""
    import pyarrow as pa

    from bench.plain_loop import numpy_batch
    from pipeline.stages.read import read_shard_rows, to_table

    tables = []
    for tar in sorted(shards_dir.glob("*.tar")):
        rows = read_shard_rows(str(tar), str(tar.with_suffix(".parquet")))
        tables.append(to_table(rows, str(tar), "bench"))
    table = pa.concat_tables(tables)
    return [numpy_batch(table.slice(s, batch_size)) for s in range(0, table.num_rows, batch_size)]


def best_pass(run: Callable[[], Any], min_seconds: float = 2.0, max_passes: int = 10) -> tuple[float, list[float]]:
    """Wall seconds of the fastest pass (one warm-up pass first), and all of them."""
    run()
    times: list[float] = []
    while len(times) < max_passes and (sum(times) < min_seconds or len(times) < 3):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times), times


def bench_decode(config, batches: list[dict[str, np.ndarray]]) -> tuple[float, list[dict[str, np.ndarray]], int]:
    from pipeline import schema as S
    from pipeline.models.clip import image_geometry
    from pipeline.stages.decode import Decode

    size, interpolation = image_geometry(config.model)
    decode = Decode(config.decode, image_size=size, interpolation=interpolation)
    decoded: list[dict[str, np.ndarray]] = []

    def run() -> None:
        decoded[:] = [decode(batch) for batch in batches]

    best, _ = best_pass(run)
    images = sum(int((b[S.STATUS] == S.Status.OK.value).sum()) for b in decoded)
    return images / best, decoded, images


def bench_model_only(config, decoded: list[dict[str, np.ndarray]], batch_size: int,
                     threads: int) -> float:
    """EmbedScore on pre-decoded pixels: full batches of ``batch_size`` decoded images."""
    import torch

    from pipeline import schema as S
    from pipeline.stages.embed import EmbedScore

    pixels = np.concatenate([b[S.PIXELS][b[S.STATUS] == S.Status.OK.value] for b in decoded])
    n_batches = max(1, len(pixels) // batch_size)
    if len(pixels) < batch_size:
        pixels = np.resize(pixels, (batch_size,) + pixels.shape[1:])
    batches = [{S.PIXELS: pixels[i * batch_size:(i + 1) * batch_size],
                S.STATUS: np.full(batch_size, S.Status.OK.value, dtype=object),
                S.ERROR: np.full(batch_size, None, dtype=object)} for i in range(n_batches)]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        stage = EmbedScore(config.model, config.heads, search_dirs=config.weights_dirs)
        best, _ = best_pass(lambda: [stage(b) for b in batches])
    finally:
        torch.set_num_threads(before)
    return n_batches * batch_size / best


# End to end ------------------------------------------------------------------------------------

@dataclass
class E2E:
    label: str
    images: int
    times: list[float] = field(default_factory=list)
    peak_rss: int = 0
    peak_pss: int = 0
    peak_daemons_rss: int = 0
    peak_workers: int = 0
    rows: int = 0
    stage_s: dict[str, float] = field(default_factory=dict)

    @property
    def best_s(self) -> float:
        return min(self.times)

    @property
    def rate(self) -> float:
        return self.images / self.best_s


def ray_start() -> None:
    import ray

    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             configure_logging=False)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False


def ray_run(label: str, shards: Path, images: int, batch_size: int, repeats: int, resources: dict,
            memory: bool = True) -> E2E:
    from pipeline.runner import run_score

    result = E2E(label, images)
    for attempt in range(repeats):
        config = make_config(str(shards), fresh_output(f"ray-{label}-{attempt}"), batch_size, **resources)
        sampler = MemorySampler() if memory else None
        start = time.perf_counter()
        if sampler:
            with sampler:
                summary = run_score(config)
        else:
            summary = run_score(config)
        result.times.append(time.perf_counter() - start)
        if not summary.ok or summary.scored != images:
            raise RuntimeError(f"Ray run {label}: scored {summary.scored} of {images}; failed {summary.units_failed}")
        result.rows = summary.rows
        if sampler:
            result.peak_rss = max(result.peak_rss, sampler.peak_rss)
            result.peak_pss = max(result.peak_pss, sampler.peak_pss)
            result.peak_daemons_rss = max(result.peak_daemons_rss, sampler.peak_daemons_rss)
            result.peak_workers = max(result.peak_workers, sampler.peak_workers)
    return result


def plain_run(label: str, shards: Path, images: int, batch_size: int, repeats: int) -> E2E:
    from bench.plain_loop import run_plain

    result = E2E(label, images)
    for attempt in range(repeats):
        config = make_config(str(shards), fresh_output(f"plain-{label}-{attempt}"), batch_size)
        sampler = MemorySampler()
        with sampler:
            start = time.perf_counter()
            summary = run_plain(config)
            result.times.append(time.perf_counter() - start)
        if summary.scored != images:
            raise RuntimeError(f"plain run {label}: scored {summary.scored} of {images}")
        result.rows = summary.rows
        result.stage_s = {k: round(v, 3) for k, v in summary.stage_s.items()}
        result.peak_rss = sampler.peak_rss
    return result


# Report ----------------------------------------------------------------------------------------

def machine() -> dict[str, str]:
    import psutil
    import ray
    import torch

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
        "torch": f"{torch.__version__}, {torch.get_num_threads()} threads in this process",
        "gpu": "none (torch.cuda.is_available() is False)" if not torch.cuda.is_available() else torch.cuda.get_device_name(),
        "python": platform.python_version(),
        "ray": ray.__version__,
    }


def mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def print_table(rows: Sequence[tuple[str, str, str, str]]) -> None:
    header = ("figure", "value", "goal", "result")
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(4)]
    line = "  ".join("-" * w for w in widths)
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print(line)
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=8, help="shards of the 1x input")
    parser.add_argument("--per-shard", type=int, default=20, help="samples per shard (4 in all are failed URLs)")
    parser.add_argument("--image-size", type=int, default=256, help="img2dataset's short side, px")
    parser.add_argument("--scale", type=int, default=10, help="the large input is this many copies of the 1x")
    parser.add_argument("--batch-size", type=int, default=64, help="decode and embed batch size, everywhere")
    parser.add_argument("--repeats", type=int, default=2, help="timed end-to-end runs at 1x (best is reported)")
    parser.add_argument("--resources", default="{}",
                        help="JSON of ResourcesConfig overrides for the Ray runs, e.g. '{\"cpus_per_actor\": 0.5}'")
    args = parser.parse_args(argv)
    resources = json.loads(args.resources)
    started = time.perf_counter()

    shards, images = sample_shards(args.shards, args.per_shard, args.image_size)
    warm = copied_shards(shards, "warm", 1, first=1)
    large = copied_shards(shards, f"x{args.scale}", args.scale)
    n_failed = BROKEN_URLS + NON_IMAGE
    config = make_config(str(shards), fresh_output("unused"), args.batch_size)
    print(f"input: {args.shards} shards ({images} images + {n_failed} failed URLs) in {shards}; "
          f"{args.scale}x: {args.shards * args.scale} shards in {large}", flush=True)

    import torch

    torch_threads = torch.get_num_threads()
    print("decode ...", flush=True)
    batches = read_batches(shards, args.batch_size)
    decode_rate, decoded, decoded_images = bench_decode(config, batches)
    assert decoded_images == images, (decoded_images, images)
    print("model only ...", flush=True)
    model_rate = bench_model_only(config, decoded, args.batch_size, torch_threads)
    model_rate_1 = bench_model_only(config, decoded, args.batch_size, 1)

    print("starting Ray and warming it on a 1-shard input (not timed) ...", flush=True)
    ray_start()
    from pipeline.runner import run_score

    warm_summary = run_score(make_config(str(warm), fresh_output("warm-ray"), args.batch_size, **resources))
    if not warm_summary.ok:
        raise RuntimeError(f"warm-up run failed: {warm_summary.units_failed}")
    from bench.plain_loop import run_plain

    run_plain(make_config(str(warm), fresh_output("warm-plain"), args.batch_size))

    print(f"plain loop, {args.shards} shards x{args.repeats} ...", flush=True)
    plain = plain_run("1x", shards, images, args.batch_size, args.repeats)
    print(f"Ray run_score, {args.shards} shards x{args.repeats} ...", flush=True)
    ray_1x = ray_run("1x", shards, images, args.batch_size, args.repeats, resources)
    print(f"Ray run_score, {args.shards * args.scale} shards ...", flush=True)
    ray_large = ray_run(f"{args.scale}x", large, images * args.scale, args.batch_size, 1, resources)

    import ray

    actor_threads = ray.get(ray.remote(num_cpus=1)(lambda: (os.environ.get("OMP_NUM_THREADS"),
                                                             __import__("torch").get_num_threads())).remote())
    ray.shutdown()

    ratio = ray_1x.rate / plain.rate
    memory_ratio = ray_large.peak_rss / ray_1x.peak_rss
    info = machine()
    total = time.perf_counter() - started
    print()
    print("=" * 100)
    print(f"make bench (CPU) -- {info['date']}")
    print(f"machine: nproc={info['nproc']}, {info['cpu']}, {info['memory']} RAM, GPU: {info['gpu']}")
    print(f"software: python {info['python']}, torch {info['torch']}, ray {info['ray']}; a Ray task/actor with "
          f"num_cpus=1 sees OMP_NUM_THREADS={actor_threads[0]}, torch threads {actor_threads[1]}")
    print(f"input: {args.shards} img2dataset shards x {args.per_shard} samples, {args.image_size} px short side: "
          f"{images} images + {n_failed} failed URLs; {args.scale}x = the same shards copied to "
          f"{args.shards * args.scale} numbers")
    print(f"model: tiny-random fp32 (224 px input), head {config.heads[0].name}; batch size {args.batch_size} "
          f"(decode and embed); shards_per_unit {config.shards_per_unit}; Ray resources: "
          f"{'defaults' if not resources else resources}")
    print()
    rows = [
        ("decode, Decode stage alone (1 process, 1 thread)", f"{decode_rate:,.0f} img/s", "", ""),
        (f"model only, EmbedScore on decoded pixels ({torch_threads} threads)", f"{model_rate:,.0f} img/s", "", ""),
        ("model only, EmbedScore on decoded pixels (1 thread, as in the actor)", f"{model_rate_1:,.0f} img/s", "", ""),
        (f"end to end, plain loop, 1 process, {args.shards} shards",
         f"{plain.rate:,.1f} img/s ({plain.best_s:.2f} s)", "", ""),
        (f"end to end, Ray run_score, {args.shards} shards (start-up excluded)",
         f"{ray_1x.rate:,.1f} img/s ({ray_1x.best_s:.2f} s)", "", ""),
        (f"Ray / plain throughput at {args.shards} shards", f"{ratio:.2f}x", f">= {GOAL_RATIO}x",
         verdict(ratio >= GOAL_RATIO)),
        ("", "", f">= {ISSUE5_RATIO}x (issue 5)", verdict(ratio >= ISSUE5_RATIO)),
        (f"end to end, Ray run_score, {args.shards * args.scale} shards",
         f"{ray_large.rate:,.1f} img/s ({ray_large.best_s:.2f} s)", "", ""),
        (f"peak RSS, driver + Ray workers, {args.shards} shards",
         f"{mib(ray_1x.peak_rss)} ({ray_1x.peak_workers} workers)", "", ""),
        (f"peak RSS, driver + Ray workers, {args.shards * args.scale} shards",
         f"{mib(ray_large.peak_rss)} ({ray_large.peak_workers} workers)", "", ""),
        (f"peak memory ratio {args.scale}x / 1x (RSS)", f"{memory_ratio:.2f}x", f"< {GOAL_MEMORY_RATIO}x",
         verdict(memory_ratio < GOAL_MEMORY_RATIO)),
        (f"  same, PSS (shared pages counted once): {mib(ray_1x.peak_pss)} -> {mib(ray_large.peak_pss)}",
         f"{ray_large.peak_pss / ray_1x.peak_pss:.2f}x", "", ""),
        (f"  Ray daemons (raylet, GCS, agents) RSS, not counted above",
         f"{mib(ray_1x.peak_daemons_rss)} / {mib(ray_large.peak_daemons_rss)}", "", ""),
        ("  plain loop peak RSS (one process)", mib(plain.peak_rss), "", ""),
    ]
    print_table(rows)
    print()
    print(f"timed runs (s): plain {[round(t, 2) for t in plain.times]}, Ray {[round(t, 2) for t in ray_1x.times]}, "
          f"Ray {args.scale}x {[round(t, 2) for t in ray_large.times]}")
    print(f"plain loop's time by stage (s, last run): {plain.stage_s}")
    print(f"bench wall time: {total:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
