"""`make bench` (part): does the Ray pipeline keep a fast accelerator fed?

    .venv/bin/python -m bench.bench_feed [--shards 8 --copies 10] [--fractions 0.5 2] [--batch-size 256]

A GPU scores faster than two CPU cores decode, so on this machine the question is asked of a simulated
accelerator (bench.simulated_accelerator, injected through run_score's loader seam): it takes a fixed time
per image and releases the CPU meanwhile. What the cores can feed is measured first, in two ways: the Decode
stage alone (one process, one thread, times the Ray CPUs), and the whole pipeline with an accelerator that
takes no time at all (read, decode, the stage's host work, staging and commits on the same cores). The
accelerator's rate is then set as a fraction of the pipeline's capacity: at 0.5 the cores have capacity to
spare and the accelerator should be busy at least 90% of the time; at 2 they cannot keep up, and the
figures say by how much. For each rate it prints the accelerator's busy fraction (busy time over the span
from its first batch to its last), how often and how long it waited between batches (that time includes the
stage's own host work, which a GPU waits for too), and end-to-end images/s. The embed actor asks for 0.25
CPU, as a GPU actor holds little CPU; its pixels are normalised on the host here, on the device on a GPU.
Each rate runs with the actor working on one batch at a time and on two (in threads, one of them holding
the accelerator while the other is prepared: the job's default on a GPU).
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import time
from pathlib import Path
from typing import Sequence

from bench.run_cpu import copied_shards, fresh_output, make_config, read_batches, sample_shards
from bench.simulated_accelerator import accelerator_use, simulated_loader
from bench.table import text_table

GOAL_BUSY = 0.90  # at half the pipeline's capacity
RAY_CPUS = 2
ACTOR_CPUS = 0.25


def decode_rate_per_core(shards: Path, batch_size: int) -> float:
    """Images/s of the Decode stage alone, one process, one thread (the best of a few passes)."""
    import torch

    from pipeline import schema as S
    from pipeline.models.clip import image_geometry
    from pipeline.stages.decode import Decode

    torch.set_num_threads(1)
    config = make_config(str(shards), fresh_output("feed-unused"), batch_size)
    size, interpolation = image_geometry(config.model)
    decode = Decode(config.decode, image_size=size, interpolation=interpolation)
    batches = read_batches(shards, batch_size)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        decoded = [decode(batch) for batch in batches]
        best = min(best, time.perf_counter() - start)
    images = sum(int((b[S.STATUS] == S.Status.OK.value).sum()) for b in decoded)
    return images / best


def run_at(shards: Path, rate: float, batch_size: int, name: str, concurrent: int = 1) -> dict:
    from pipeline.runner import run_score

    output = fresh_output(name)
    config = make_config(str(shards), output, batch_size, cpus_per_actor=ACTOR_CPUS,
                         min_actors=1, max_actors=1, concurrent_batches_per_actor=concurrent)
    config = config.replace(caption_similarity=False)  # the simulated accelerator is an image tower only
    log = Path(f"{output}-accelerator.log")
    log.write_text("")
    loader = functools.partial(simulated_loader, config.model, config.heads, config.weights_dirs, rate, str(log))
    start = time.perf_counter()
    summary = run_score(config, embed_loader=loader)
    seconds = time.perf_counter() - start
    if not summary.ok:
        raise RuntimeError(f"run at {rate:.0f}/s failed: {summary.units_failed}")
    return {"seconds": seconds, "scored": summary.scored, "use": accelerator_use(str(log))}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--per-shard", type=int, default=100)
    parser.add_argument("--image-size", type=int, default=256, help="img2dataset's short side, px")
    parser.add_argument("--copies", type=int, default=10, help="the timed input is this many copies of the shards")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5, 2.0],
                        help="accelerator rates, as fractions of what the pipeline feeds a free accelerator")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--concurrent", type=int, nargs="+", default=[1, 2],
                        help="batches the embed actor works on at once (2 is the job's default on a GPU)")
    args = parser.parse_args(argv)

    import ray

    from pipeline.ray_session import start_local_ray

    shards, _ = sample_shards(args.shards, args.per_shard, args.image_size)
    timed = copied_shards(shards, f"x{args.copies}", args.copies)
    warm = copied_shards(shards, "warm", 1, first=1)
    per_core = decode_rate_per_core(shards, args.batch_size)
    capacity = per_core * RAY_CPUS
    print(f"decode: {per_core:.0f} images/s on one core; capacity of {RAY_CPUS} cores {capacity:.0f} images/s",
          flush=True)

    start_local_ray(num_cpus=RAY_CPUS, log_to_driver=False, configure_logging=False)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    run_at(warm, capacity, args.batch_size, "feed-warm")  # workers' imports and Ray's start-up, not timed
    print("pipeline capacity: an accelerator that takes no time ...", flush=True)
    free = run_at(timed, float("inf"), args.batch_size, "feed-free")
    # The rate batches reached the actor, first to last: start-up and the last commits left out.
    pipeline_capacity = free["use"].images / free["use"].span_s
    print(f"pipeline: {pipeline_capacity:.0f} images/s reach a free accelerator "
          f"({pipeline_capacity / capacity:.0%} of decode-alone capacity; "
          f"{free['scored'] / free['seconds']:.0f} images/s end to end, start-up included)", flush=True)

    rows, verdicts = [], []
    for fraction in args.fractions:
        rate = fraction * pipeline_capacity
        for concurrent in args.concurrent:
            print(f"accelerator at {rate:.0f} images/s ({fraction:g} x pipeline capacity), {concurrent} batch(es) "
                  f"at once in the actor ...", flush=True)
            result = run_at(timed, rate, args.batch_size, f"feed-{fraction:g}-{concurrent}", concurrent)
            use = result["use"]
            end_to_end = result["scored"] / result["seconds"]
            rows.append([f"{fraction:g}x", f"{rate:.0f}", f"{concurrent}", f"{use.images}", f"{result['seconds']:.1f}",
                         f"{end_to_end:.0f}", f"{use.images / use.span_s:.0f}", f"{use.busy_fraction:.1%}",
                         f"{use.starved_batches}/{use.batches}", f"{use.mean_wait_ms:.0f}", f"{use.p95_wait_ms:.0f}"])
            if fraction <= 0.5:
                verdicts.append(f"busy {use.busy_fraction:.1%} at {fraction:g}x pipeline capacity, {concurrent} "
                                f"batch(es) at once (goal >= {GOAL_BUSY:.0%}): "
                                + ("met" if use.busy_fraction >= GOAL_BUSY else "MISSED"))
    ray.shutdown()

    print()
    print(f"Keeping an accelerator fed ({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"batch {args.batch_size}, {args.shards * args.copies} shards, embed actor {ACTOR_CPUS} CPU)")
    print(text_table(["rate", "images/s set", "batches at once", "images", "wall s", "e2e images/s", "accelerator images/s",
                      "busy", "batches that waited", "mean wait ms", "p95 wait ms"], rows))
    for line in verdicts:
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
