"""`make gpu-check`: the scoring job's own stages on one GPU, without Ray, in one table.

    bash bench/gpu_check.sh [--models ViT-L-14-quickgelu ViT-B-32-quickgelu] [--precisions fp16 bf16 amp_bf16]
        [--batch-sizes 256 1024] [--image-px 256 512] [--compile-batch-sizes 256] [--compile-precisions P ...]
        [--compile-backend inductor] [--concurrent-batches 2] [--no-channels-last] [--every-px]
        [--compiled-only] [--e2e-images 6144] [--budget-s 270] [--workers N]
    bash bench/gpu_check.sh --smoke-test-on-cpu     # every row kind on the CPU, tiny shapes; figures mean nothing

For a GPU machine that has torch but not Ray (bench.run_gpu needs Ray). bench/gpu_check.sh installs what
this module needs beyond torch (open_clip, ftfy, wcwidth, simplejpeg) from bench/gpu_wheels/, made here
with `bash bench/gpu_check.sh --prepare`, which also copies the LAION head files there. Nothing here
imports Ray, directly or through pipeline modules; the end of the run checks that.

What one run does:

* shards: img2dataset's layout (``NNNNN.tar`` with ``<key>.jpg/.txt/.json``, ``NNNNN.parquet``,
  ``NNNNN_stats.json``), written with Pillow and tarfile at each ``--image-px`` (shortest side, several
  aspect ratios), a few distinct photo-like JPEGs repeated under new keys; end-to-end runs cycle over them.
* decode pool: ``--workers`` spawned processes, each reading whole shards with the read stage's own
  ``read_shard_rows`` and decoding them with the ``Decode`` stage, writing the pixels into one shared
  ring of rows (``/dev/shm``, else a file), so only keys and statuses travel through pipes, as Ray's
  object store spares its tasks the copies.
* the stage under test is the job's own: ``ModelConfig(name, precision, compile=, channels_last=)``, a
  model built from it (seeded random weights, below) and ``EmbedScore`` around it, one instance per
  (model, precision, variant), each with a model of its own, as each Ray actor has. Variants:
  - eager: ``ModelConfig(precision=P)``; fp16/bf16 cast the weights, ``amp_bf16`` keeps them fp32 and
    runs the tower under bf16 autocast;
  - compiled: ``ModelConfig(compile=True)``: EmbedScore wraps ``encode_image`` in ``torch.compile`` and pads
    each batch to a power-of-two bucket (the batch sizes here are powers of two: no padding is timed);
    the first call's seconds (the compile) are ``first_call_s`` in gpu_check.json; dynamo is reset before
    each compiled stage is made, so each compiles as in a fresh actor process;
  - channels-last: ``ModelConfig(channels_last=True)``: the tower's conv weights in NHWC order.
* per row (model, precision, variant, batch size, batches at once, image px):
  - model img/s: the EmbedScore instance (host-to-device copy, normalisation, encode_image, L2 norm,
    heads) on one decoded batch, again and again, from one thread;
  - e2e img/s: tar bytes to scores: the pool reads and decodes while this process runs ``EmbedScore`` on
    each full batch as soon as its rows are decoded; "at once" 1: one thread calls it batch after batch;
    2: two threads call the same instance, each taking the next decoded batch as soon as it is free, as a
    Ray GPU actor does by default (``ResourcesConfig.concurrent_batches_per_actor``): one batch is copied
    and normalised while the other holds the model (EmbedScore's lock);
  - GPU busy: time the GPU spends inside encode_image (CUDA events around each call) over the e2e wall
    time; NVML util: mean of torch.cuda.utilization sampled during the e2e run;
  - decode img/s: the pool alone (read + decode, no model) at that px;
  - bound by: GPU when e2e comes within 15% of model only and nearer it than to decode, decode in the
    opposite case, "neither" when e2e falls well short of both (this process cannot feed the GPU);
  - max |score diff|: the scores of the first ``--reference-images`` images of the e2e run (every row has
    one) against the same model in fp32 on the CPU, on the same decoded pixels: the same for every
    precision and variant, amp_bf16 and compiled included.
* models: the real open_clip architectures with seeded random weights
  (``pipeline.models.clip.build_random_init_clip_for_benchmark``; no hub). The CPU reference model has
  the same seed, so the same weights. Heads: the published LAION file for each architecture
  (bench.run_gpu.REAL_HEAD_FOR) from bench/gpu_wheels/heads/, ./shared or ../shared, else a seeded random
  head of the same shape.
* the default matrix (2 models x 3 precisions x 2 batch sizes, 2 px) and why it is not the full product:
  model img/s depends on (model, precision, variant, batch size), not on px, so each of those gets one
  row, its e2e at the first px; e2e depends on px (decode) and on batches at once, so only each model's
  lead configuration (its first precision and batch size: fp16, 256, the job's defaults) runs e2e at
  every px, once 1 and once 2 at once (--every-px: every configuration at every px); the channels-last
  row is the first model's lead configuration at the first px (in a ViT only the patch embedding is a
  convolution: one row says whether it matters); compiled rows are one per precision in
  --compile-precisions (default: all) and model, at --compile-batch-sizes (default 256, the job's batch:
  each compiles one shape) and the first px. That is 19 eager rows (per model: 6 at the first px, the
  lead configuration at the second px, and 2 at once at both; then channels-last) and 6 compiled ones,
  against 16 eager and 8 compiled before; builds and compiles, not rows, take most of the time.
* order: model by model, every eager row (the lead configuration first, then its 2-at-once twin, then
  the other precisions and batch sizes, then channels-last), then the compiled rows precision by
  precision, model by model (fp16 L/14, fp16 B/32, bf16 L/14, ...), so a run cut short by ``--budget-s``
  loses the compiled rows of the later precisions first. Before each step the time it is expected to
  take (compiles scaled by the tower's depth from the last one measured) is checked against what is left
  of the budget; a step that does not fit is skipped with a note.
* compile backend: ``--compile-backend`` inductor (the default, and what the job's EmbedScore uses:
  ``torch.compile`` with no backend argument) leaves torch alone. Any other backend (the smoke test's
  aot_eager) is set for the whole run with ``torch.compiler.set_stance(force_backend=...)``: EmbedScore's
  ``torch.compile`` call stays as the job makes it, dynamo still traces, guards and recompiles as it
  would, and only the backend its graphs go to changes (inductor builds C++ kernels on a CPU: 20-80 s for
  the tiny model on 2 cores, per precision).
* --smoke-test-on-cpu: tiny-random, bf16 and amp_bf16, batch 8 (lead) and 16 (compiled), every row kind,
  aot_eager: 30-60 s on 2 cores; with --compile-backend inductor, the job's own compile: about 2 minutes.

The table goes to stdout, and as gpu_check.json and gpu_check.md to $OUT when that is set (the device
tool brings back what is written there), else to bench-output/gpu_check/; both files are rewritten after
every row, so a run stopped early still leaves its rows. Scratch shards go to bench-output/gpu_check/.

On this project's device tool (an H200 machine with 16 cores). The default run stops starting steps once
--budget-s 270 would be overrun, so it ends in about 5 minutes, leaving device time for one rerun; the
timeout is there for a step that runs far past its estimate (a compile), and the tee keeps the whole log:

    run(command="set -o pipefail; bash bench/gpu_check.sh 2>&1 | tee $OUT/gpu_check.log",
        carry=["bench/gpu_wheels"], timeout_s=360)

Expected there (not measured: guesses from CPU timings here and the H200's rates): start-up, shards,
pool and decode rates ~25 s; ViT-L/14's 10 eager rows ~70 s (4 builds of ~5 s, the CPU reference ~10 s,
6 model-only figures ~2.5 s each, 10 e2e runs of 6144 images at ~3,000 img/s); ViT-B/32's 9 ~30 s; so
the eager part ends near 2 minutes, and the compiled rows get the rest of the budget: fp16 L/14 (a
compile of ~40-90 s) and fp16 B/32 (about half that) fit; the bf16 and amp_bf16 compiles fit only if
compiles are fast, else the budget skips them with a note. The compile seconds each row took are in the
notes and gpu_check.json (first_call_s, info.costs_s).

For a rerun: --compiled-only --compile-precisions bf16 amp_bf16 (about 2 x (L/14 + B/32) compiles: ~3-4
minutes) for the compiled rows a first run's budget cut; after a first run cut short for another reason,
add --budget-s 180, or drop the compiled rows with a bare --compile-batch-sizes (no values).
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import json
import math
import multiprocessing
import os
import sys
import tarfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from bench.batches import numpy_batch

ROOT = Path(__file__).resolve().parents[1]
SCRATCH = ROOT / "bench-output" / "gpu_check"
DEFAULT_MODELS = ("ViT-L-14-quickgelu", "ViT-B-32-quickgelu")
# Where the LAION head files may be: carried beside the wheels, a shared/ inside the checkout (which
# travels to the device), or the ../shared beside it (which does not).
HEAD_DIRS = (ROOT / "bench" / "gpu_wheels" / "heads",
             ROOT / "shared" / "reference" / "laion-aesthetics" / "heads",
             ROOT.parent / "shared" / "reference" / "laion-aesthetics" / "heads")
# tiny-random has ViT-L/14's embedding width, so the smoke test loads the real L/14 head when it is here.
TINY_HEAD = "sac+logos+ava1-l14-linearMSE"
EAGER, COMPILED, CHANNELS_LAST = "eager", "compiled", "channels-last"  # a row's variant
BOUND_SHARE = 0.85  # e2e at least this share of a stage's own rate: that stage is the limit
RING_BATCHES = 3  # the decoded-pixel ring holds this many of the largest batches (decode runs ahead)

# First-time guesses for the budget (seconds); each is replaced by what the run measures.
GUESS_S = {"build": 20.0, "reference": 20.0, "compile": 75.0}

NO_CUDA_MESSAGE = (
    "bench.gpu_check needs a CUDA GPU, and torch sees none here (torch {torch}, built for CUDA {cuda}). "
    "`bash bench/gpu_check.sh --smoke-test-on-cpu` checks the script itself without a GPU.")


# Arguments ---------------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from pipeline.config import PRECISIONS

    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="open_clip architectures")
    parser.add_argument("--precisions", nargs="+", default=["fp16", "bf16", "amp_bf16"], choices=PRECISIONS,
                        help="the first is the lead configuration's (with the first batch size)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[256, 1024], help="embed batch sizes")
    parser.add_argument("--compile-batch-sizes", nargs="*", type=int, default=[256],
                        help="batch sizes that also get ModelConfig(compile=True) rows (none: no compiled rows); "
                             "each compiles the image tower once per model and precision")
    parser.add_argument("--compile-precisions", nargs="*", choices=PRECISIONS, default=None,
                        help="precisions of the compiled rows (default: --precisions)")
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile backend: inductor (default on a GPU; EmbedScore's own) leaves torch "
                             "as it is, another is forced with torch.compiler.set_stance (smoke test: aot_eager)")
    parser.add_argument("--concurrent-batches", type=int, default=2,
                        help="batches at once in the lead configuration's twin e2e rows (1: no twin rows)")
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                        help="no ModelConfig(channels_last=True) row")
    parser.add_argument("--compiled-only", action="store_true",
                        help="only the compiled rows (a rerun for those a first run's budget cut)")
    parser.add_argument("--every-px", action="store_true",
                        help="e2e at every --image-px for every configuration (default: the lead one only)")
    parser.add_argument("--image-px", nargs="+", type=int, default=[256, 512],
                        help="shortest side of the shards' JPEGs (img2dataset's image_size)")
    parser.add_argument("--e2e-images", type=int, default=6144, help="images per end-to-end row")
    parser.add_argument("--decode-images", type=int, default=4096, help="images for the decode-only rate")
    parser.add_argument("--per-shard", type=int, default=64, help="samples per shard (one pool task)")
    parser.add_argument("--shards", type=int, default=32, help="distinct shards made per image size")
    parser.add_argument("--unique-images", type=int, default=64, help="distinct JPEGs per image size")
    parser.add_argument("--reference-images", type=int, default=8, help="images scored on the CPU in fp32")
    parser.add_argument("--model-seconds", type=float, default=1.0, help="timed seconds per model-only figure")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                        help="decode processes (default: one per core but the one feeding the GPU)")
    parser.add_argument("--budget-s", type=float, default=270.0,
                        help="wall seconds for the whole run, start-up included; steps that would not fit "
                             "are skipped with a note")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(SCRATCH),
                        help="folder for gpu_check.json and gpu_check.md (default: $OUT, else bench-output/gpu_check)")
    parser.add_argument("--smoke-test-on-cpu", action="store_true",
                        help="every row kind on the CPU: the tiny model, tiny inputs, the aot_eager compile backend")
    args = parser.parse_args(argv)
    if args.smoke_test_on_cpu:
        args.models, args.precisions = ["tiny-random"], ["bf16", "amp_bf16"]
        args.batch_sizes, args.compile_batch_sizes = [8, 16], [16]
        args.e2e_images, args.decode_images, args.per_shard, args.shards = 32, 32, 8, 4
        args.unique_images, args.reference_images, args.model_seconds = 8, 4, 0.2
    if args.compile_backend is None:  # inductor would build C++ kernels for a minute per compile on a small CPU
        args.compile_backend = "aot_eager" if args.smoke_test_on_cpu else "inductor"
    if args.compile_precisions is None:
        args.compile_precisions = list(args.precisions)
    positive = ("e2e_images", "decode_images", "per_shard", "shards", "unique_images", "reference_images",
                "workers", "budget_s", "model_seconds", "concurrent_batches")
    if any(getattr(args, name) <= 0 for name in positive) or min(args.batch_sizes + args.image_px) <= 0:
        parser.error("sizes, counts and seconds must be positive")
    if any(b % args.per_shard for b in args.batch_sizes):
        parser.error(f"each batch size must be a multiple of --per-shard ({args.per_shard}): a batch is whole shards")
    if not set(args.compile_batch_sizes) <= set(args.batch_sizes):
        parser.error("--compile-batch-sizes must be among --batch-sizes")
    if args.compiled_only and not (args.compile_batch_sizes and args.compile_precisions):
        parser.error("--compiled-only needs --compile-batch-sizes and --compile-precisions")
    if args.reference_images > args.per_shard:
        parser.error("--reference-images must fit in the first shard (--per-shard)")
    if max(args.batch_sizes) > min(args.e2e_images, args.decode_images):
        parser.error("--e2e-images and --decode-images must be at least the largest batch size")
    return args


# Shards ------------------------------------------------------------------------------------------

ASPECTS = ((1, 1), (4, 3), (3, 4), (3, 2), (5, 4), (1, 1))  # img2dataset keeps the aspect ratio


def photo_like_jpeg(rng: np.random.Generator, shortest: int, aspect: tuple[int, int]) -> tuple[bytes, int, int]:
    """A JPEG that compresses and decodes about as a photo does: smooth colour fields plus fine grain
    (pure noise would be several times larger and slower to decode). (bytes, width, height)."""
    import io

    from PIL import Image

    long = shortest * max(aspect) // min(aspect)
    width, height = (long, shortest) if aspect[0] >= aspect[1] else (shortest, long)
    fields = Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)).resize((width, height),
                                                                                      Image.Resampling.BICUBIC)
    pixels = np.asarray(fields, dtype=np.int16) + rng.normal(0, 3, (height, width, 1)).astype(np.int16)
    buffer = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=95)  # img2dataset's
    return buffer.getvalue(), width, height


def make_shards(folder: Path, px: int, n_shards: int, per_shard: int, unique: int) -> list[tuple[str, str]]:
    """``n_shards`` img2dataset-layout shards of ``per_shard`` successful samples; (tar, sidecar) paths."""
    import hashlib
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    marker = folder / "MADE.json"
    spec = {"px": px, "shards": n_shards, "per_shard": per_shard, "unique": unique}
    pairs = [(str(folder / f"{i:05d}.tar"), str(folder / f"{i:05d}.parquet")) for i in range(n_shards)]
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return pairs
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.iterdir():
        stale.unlink()
    rng = np.random.default_rng(px)
    images = [photo_like_jpeg(rng, px, ASPECTS[i % len(ASPECTS)]) for i in range(unique)]
    digits = max(1, math.ceil(math.log10(per_shard)))  # img2dataset's key: shard id, then row, zero-padded
    for shard in range(n_shards):
        records = []
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
            for row in range(per_shard):
                key = f"{shard:05d}{row:0{digits}d}"
                jpeg, width, height = images[(shard * per_shard + row) % unique]
                record = {"caption": f"synthetic photo {key}", "url": f"http://127.0.0.1/{key}.jpg", "key": key,
                          "status": "success", "error_message": None, "width": width, "height": height,
                          "original_width": width, "original_height": height, "exif": "{}",
                          "sha256": hashlib.sha256(jpeg).hexdigest()}
                records.append(record)
                for suffix, data in (("jpg", jpeg), ("txt", record["caption"].encode()),
                                     ("json", json.dumps(record).encode())):
                    info = tarfile.TarInfo(f"{key}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        pq.write_table(pa.Table.from_pylist(records), folder / f"{shard:05d}.parquet")
        (folder / f"{shard:05d}_stats.json").write_text(json.dumps(
            {"count": per_shard, "successes": per_shard, "failed_to_download": 0, "failed_to_resize": 0,
             "status_dict": {"success": per_shard}}))
    marker.write_text(json.dumps(spec))
    return pairs


# Decode pool -------------------------------------------------------------------------------------

_WORKER: dict[str, Any] = {}


def _worker_start(ring_path: str, rows: int, size: int, interpolation: str) -> None:
    """Each pool process: one torch thread (a Ray decode task gets OMP_NUM_THREADS=1), the Decode stage,
    and the shared ring mapped in."""
    import torch

    from pipeline.config import DecodeConfig
    from pipeline.stages.decode import Decode

    torch.set_num_threads(1)
    _WORKER["ring"] = np.memmap(ring_path, dtype=np.uint8, mode="r+", shape=(rows, size, size, 3))
    _WORKER["decode"] = Decode(DecodeConfig(), image_size=size, interpolation=interpolation)


def _worker_ready(_: int) -> int:
    time.sleep(0.2)  # long enough that every worker takes one of these and has started
    return os.getpid()


def _read_and_decode(tar: str, sidecar: str, offset: int) -> tuple[dict[str, np.ndarray], float, float]:
    """One pool task: read and join a shard as the read stage does, decode it, pixels into the ring at
    ``offset``. (the small columns, read seconds, decode seconds)."""
    from pipeline import schema as S
    from pipeline.stages.read import read_shard_rows, to_table

    started = time.perf_counter()
    batch = numpy_batch(to_table(read_shard_rows(tar, sidecar), tar, "gpu-check"))
    read_s = time.perf_counter() - started
    out = _WORKER["decode"](batch)
    _WORKER["ring"][offset:offset + len(out[S.PIXELS])] = out[S.PIXELS]
    return ({S.KEY: out[S.KEY], S.STATUS: out[S.STATUS], S.ERROR: out[S.ERROR]}, read_s,
            time.perf_counter() - started - read_s)


def _ring_path(nbytes: int) -> Path:
    """Memory (/dev/shm) when it has room to spare, else a file in the scratch folder (page cache)."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        stat = os.statvfs(shm)
        if stat.f_bavail * stat.f_frsize > 2 * nbytes:
            return shm / f"gpu_check-{os.getpid()}.ring"
    SCRATCH.mkdir(parents=True, exist_ok=True)
    return SCRATCH / f"ring-{os.getpid()}"


@dataclass
class StreamStats:
    images: int = 0
    wall_s: float = 0.0
    wait_s: float = 0.0  # this process blocked on decode results
    worker_s: float = 0.0  # read + decode seconds summed over tasks

    @property
    def rate(self) -> float:
        return self.images / self.wall_s

    @property
    def per_core(self) -> float:
        return self.images / self.worker_s if self.worker_s else float("nan")


class DecodePool:
    """Spawned processes that read + decode whole shards into a ring of S x S x 3 rows shared with this one."""

    def __init__(self, workers: int, per_shard: int, rows: int, size: int, interpolation: str) -> None:
        self.workers, self.per_shard, self.rows, self.size = workers, per_shard, rows, size
        self.path = _ring_path(rows * size * size * 3)
        self.ring = np.memmap(self.path, dtype=np.uint8, mode="w+", shape=(rows, size, size, 3))
        # spawn, not fork: this process will hold a CUDA context and torch's threads.
        self.executor = concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_start,
            initargs=(str(self.path), rows, size, interpolation))
        list(self.executor.map(_worker_ready, range(workers)))  # start and import in every worker now

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)
        del self.ring
        self.path.unlink(missing_ok=True)

    def stream(self, shards: Sequence[tuple[str, str]], n_images: int, batch_size: int,
               consume: Callable[[int, dict[str, np.ndarray]], None] | None = None,
               threads: concurrent.futures.Executor | None = None, at_once: int = 1) -> StreamStats:
        """Read + decode ``n_images`` (cycling over ``shards``) and hand each full batch of ``batch_size``
        rows to ``consume`` in order, its pixels a view of the ring. A task is sent as soon as the rows it
        will write have been consumed, so decode runs up to a ring's worth ahead of the model.

        With ``threads``, ``consume`` runs there, up to ``at_once`` batches at a time, each batch handed out
        as soon as it is decoded and a call has finished (Ray Data's concurrent batches in one actor); a
        batch's ring rows are written again only once its call has returned."""
        from pipeline import schema as S

        per_shard, ring_rows = self.per_shard, self.rows - self.rows % batch_size
        if threads is not None and ring_rows < (at_once + 1) * batch_size:
            raise ValueError(f"a ring of {ring_rows} rows cannot hold {at_once} batches of {batch_size} being "
                             f"scored and the next being decoded")
        n_batches = n_images // batch_size
        n_tasks = n_batches * batch_size // per_shard
        futures: dict[int, concurrent.futures.Future] = {}
        calls: collections.deque[concurrent.futures.Future] = collections.deque()  # in batch order
        stats, sent = StreamStats(images=n_batches * batch_size), 0
        started = time.perf_counter()
        try:
            for k in range(n_batches):
                while calls and (calls[0].done() or len(calls) >= at_once):
                    calls.popleft().result()  # raises what the call raised
                in_use = k - len(calls)  # the oldest batch whose rows a call may still read
                while sent < n_tasks and (sent + 1) * per_shard <= in_use * batch_size + ring_rows:
                    tar, sidecar = shards[sent % len(shards)]
                    futures[sent] = self.executor.submit(_read_and_decode, tar, sidecar,
                                                         (sent * per_shard) % ring_rows)
                    sent += 1
                first = k * batch_size // per_shard
                waited = time.perf_counter()
                parts = []
                for task in range(first, first + batch_size // per_shard):
                    columns, read_s, decode_s = futures.pop(task).result()
                    stats.worker_s += read_s + decode_s
                    if len(columns[S.KEY]) != per_shard or (columns[S.STATUS] != S.Status.OK.value).any():
                        raise RuntimeError(f"a shard gave {len(columns[S.KEY])} rows, statuses "
                                           f"{sorted(set(columns[S.STATUS]))}: expected {per_shard} decoded images")
                    parts.append(columns)
                stats.wait_s += time.perf_counter() - waited
                start = (k * batch_size) % ring_rows
                batch = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
                batch[S.PIXELS] = self.ring[start:start + batch_size]
                if consume is not None and threads is not None:
                    calls.append(threads.submit(consume, k, batch))
                elif consume is not None:
                    consume(k, batch)
            while calls:
                calls.popleft().result()
        finally:
            concurrent.futures.wait(calls)  # after a failed call: the others end before the ring is reused
        stats.wall_s = time.perf_counter() - started
        return stats


# Models and heads --------------------------------------------------------------------------------

class EncodeTimer:
    """Time spent inside the model's encode_image: on the GPU, CUDA events around each call, so the GPU's own
    clock from its first kernel (once the copy and normalisation queued before it are done) to its last;
    host work between calls (the pinned copy, waiting for decode) is left out. On the CPU, the call's wall time.

    It takes the place of ``owner.<attribute>``: ``clip.model.encode_image`` for an eager EmbedScore (which
    calls it; the instance attribute wins over the method), the stage's ``_compiled`` for a compiled one
    (EmbedScore compiled the model's own method before this wraps the result, so the compile sees the
    method as the job's does). EmbedScore's lock lets one call in at a time, so the calls never overlap."""

    def __init__(self, owner: Any, attribute: str, device: Any) -> None:
        self._encode = getattr(owner, attribute)
        if self._encode is None:
            raise ValueError(f"{type(owner).__name__}.{attribute} is None: nothing to time")
        self.cuda = device.type == "cuda"
        self._events: list[tuple[Any, Any]] = []
        self._cpu_s = 0.0
        setattr(owner, attribute, self)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        import torch

        if self.cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            out = self._encode(*args, **kwargs)
            end.record()
            self._events.append((begin, end))
            return out
        started = time.perf_counter()
        out = self._encode(*args, **kwargs)
        self._cpu_s += time.perf_counter() - started  # under EmbedScore's lock: no other call adds meanwhile
        return out

    def take(self) -> float:
        """Seconds inside the model since the last take."""
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            seconds = sum(begin.elapsed_time(end) for begin, end in self._events) / 1e3
        else:
            seconds = self._cpu_s
        self._events, self._cpu_s = [], 0.0
        return seconds


def head_bank_for(name: str, embed_dim: int) -> tuple[tuple[Any, ...], Any, str]:
    """(head specs, HeadBank on the CPU, label): the LAION file for the architecture when one of HEAD_DIRS
    has it, else a seeded random head with that file's layer shapes."""
    import torch

    from bench.run_gpu import REAL_HEAD_FOR
    from pipeline.config import KNOWN_HEADS, HeadSpec, WeightsSpec
    from pipeline.models.heads import Head, HeadBank, load_head_bank
    from pipeline.models.weights import file_name_of

    real = REAL_HEAD_FOR.get(name, TINY_HEAD if name == "tiny-random" else None)
    if real:
        spec = KNOWN_HEADS[real]
        for folder in HEAD_DIRS:
            if (folder / file_name_of(spec.weights.uri)).exists():
                bank = load_head_bank((spec,), (str(folder),))  # checks the file's sha256
                if bank.input_dim == embed_dim:
                    return (spec,), bank, f"{real} (LAION file from {folder})"
    generator = torch.Generator().manual_seed(0)
    if real and real.endswith("_linear"):  # V1: one linear layer
        widths, indices = [embed_dim, 1], [None]
    else:  # V2: the improved predictor's linear MLP
        widths, indices = [embed_dim, 1024, 128, 64, 16, 1], [0, 2, 4, 6, 7]
    state = {}
    for index, (fan_in, fan_out) in zip(indices, zip(widths, widths[1:])):
        prefix = "" if index is None else f"layers.{index}."
        state[prefix + "weight"] = torch.randn(fan_out, fan_in, generator=generator) / fan_in ** 0.5
        state[prefix + "bias"] = torch.zeros(fan_out)
    state[prefix + "bias"] = torch.tensor([5.0])  # centre the meaningless scores where LAION's are
    head_name = f"random-{real or embed_dim}"
    bank = HeadBank([Head.from_state_dict(head_name, state)])
    return (HeadSpec(head_name, WeightsSpec("seeded-random")),), bank, f"seeded random head shaped like {real or 'V2'}"


def embed_stage(config: Any, clip: Any, specs: tuple, bank: Any) -> Any:
    """The job's EmbedScore for ``config`` (a ModelConfig: precision, compile, channels_last) around a model
    already built from it and a head bank."""
    from pipeline.stages.embed import EmbedScore

    return EmbedScore(config, specs, loader=lambda: (clip, bank))


def tower_depth(clip: Any) -> int:
    """Residual blocks in the image tower (what a compile's time grows with); 1 when it has none."""
    return len(getattr(getattr(clip.model.visual, "transformer", None), "resblocks", ())) or 1


def warm_threads(threads: concurrent.futures.Executor, n: int, call: Callable[[], Any]) -> None:
    """Run ``call`` once on each of the ``n`` threads (a barrier keeps one thread from taking two), so that
    what each keeps for itself (EmbedScore's pinned buffer per thread) exists before the timing."""
    barrier = threading.Barrier(n)

    def once() -> None:
        barrier.wait(timeout=120)
        call()

    for future in [threads.submit(once) for _ in range(n)]:
        future.result()


def ok_batch(pixels: np.ndarray, keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    from pipeline import schema as S

    n = len(pixels)
    return {S.KEY: np.array(keys if keys is not None else [str(i) for i in range(n)], dtype=object),
            S.STATUS: np.full(n, S.Status.OK.value, dtype=object), S.ERROR: np.full(n, None, dtype=object),
            S.PIXELS: pixels}


def decode_first_rows(shard: tuple[str, str], n: int, size: int, interpolation: str) -> tuple[list[str], np.ndarray]:
    """The first ``n`` images of a shard, read and decoded here (the CPU reference's input)."""
    from pipeline import schema as S
    from pipeline.config import DecodeConfig
    from pipeline.stages.decode import Decode
    from pipeline.stages.read import read_shard_rows, to_table

    table = to_table(read_shard_rows(*shard), shard[0], "gpu-check").slice(0, n)
    out = Decode(DecodeConfig(), image_size=size, interpolation=interpolation)(numpy_batch(table))
    return list(out[S.KEY]), np.ascontiguousarray(out[S.PIXELS])


# Budget ------------------------------------------------------------------------------------------

class Budget:
    """The wall-clock budget of the whole run, counted from the start of the process."""

    def __init__(self, seconds: float, started: float) -> None:
        self.deadline = started + seconds
        self.notes: list[str] = []

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def fits(self, what: str, estimate: float) -> bool:
        left = self.left()
        if estimate <= left:
            return True
        note = f"skipped {what}: needs about {estimate:.0f} s, {max(left, 0):.0f} s of --budget-s left"
        print(note, flush=True)
        self.notes.append(note)
        return False


# The run -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RowKey:
    model: str
    precision: str
    variant: str  # EAGER, COMPILED or CHANNELS_LAST
    batch_size: int
    px: int
    at_once: int = 1  # batches EmbedScore works on at once in the e2e run (threads)

    @property
    def stage_key(self) -> tuple[str, str, str]:
        """One EmbedScore (and its own model) per stage key."""
        return self.model, self.precision, self.variant

    @property
    def group(self) -> tuple[str, str, str, int]:
        """Rows of one group share the model-only figure."""
        return self.model, self.precision, self.variant, self.batch_size

    @property
    def label(self) -> str:
        variant = "" if self.variant == EAGER else f" {self.variant}"
        at_once = f" {self.at_once} at once" if self.at_once > 1 else ""
        return f"{self.model} {self.precision}{variant} batch {self.batch_size} {self.px} px{at_once}"


def plan_rows(args: argparse.Namespace) -> list[RowKey]:
    """Model by model: the lead configuration (first precision, first batch size) at every px, each 1 and
    ``--concurrent-batches`` at once; every other precision x batch size at the first px (model img/s does
    not depend on px; --every-px: at every px); the channels-last row (first model). Then the compiled rows,
    precision by precision, model by model (the costly, optional part, which the budget cuts first)."""
    lead = (args.precisions[0], args.batch_sizes[0])
    first_px = args.image_px[:1]
    rows = []
    for m in [] if args.compiled_only else args.models:
        for p in args.precisions:
            for b in args.batch_sizes:
                is_lead = (p, b) == lead
                for px in args.image_px if is_lead or args.every_px else first_px:
                    rows.append(RowKey(m, p, EAGER, b, px))
                    if is_lead and args.concurrent_batches > 1:
                        rows.append(RowKey(m, p, EAGER, b, px, args.concurrent_batches))
        if args.channels_last and m == args.models[0]:
            rows.append(RowKey(m, lead[0], CHANNELS_LAST, lead[1], first_px[0]))
    rows += [RowKey(m, p, COMPILED, b, px) for p in args.compile_precisions for m in args.models
             for b in args.compile_batch_sizes for px in first_px]
    return rows


@dataclass
class Run:
    args: argparse.Namespace
    device: str
    budget: Budget
    started: float
    rows: list[dict[str, Any]] = field(default_factory=list)
    heads: dict[str, str] = field(default_factory=dict)
    decode: dict[int, dict[str, float]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


class Bench:
    """Holds what rows share: shards, the pool, EmbedScore instances, CPU reference scores, measured costs."""

    def __init__(self, run: Run, size: int, interpolation: str) -> None:
        self.run, self.args, self.device = run, run.args, run.device
        self.size, self.interpolation = size, interpolation
        self.shards: dict[int, list[tuple[str, str]]] = {}
        self.pool: DecodePool | None = None
        self.model_pixels: np.ndarray | None = None
        self.stages: dict[tuple[str, str, str], tuple[Any, EncodeTimer]] = {}
        self.depth: dict[str, int] = {}  # model -> residual blocks in its image tower
        self.banks: dict[str, tuple[tuple, Any, str]] = {}
        self.references: dict[tuple[str, int], tuple[list[str], np.ndarray, np.ndarray]] = {}
        self.model_only: dict[tuple[str, str, str, int], dict[str, float]] = {}
        self.threads: dict[int, concurrent.futures.ThreadPoolExecutor] = {}  # at once -> its threads
        self.cost: dict[tuple[str, str], float] = {}  # (build|reference|compile, model) -> seconds measured
        self.scale = 0.1 if self.args.smoke_test_on_cpu else 1.0  # the tiny model builds in a second

    # set-up --------------------------------------------------------------------------------------
    def prepare(self) -> None:
        args = self.args
        started = time.perf_counter()
        for px in args.image_px:
            self.shards[px] = make_shards(SCRATCH / f"shards-{px}px-{args.per_shard}x{args.shards}", px,
                                          args.shards, args.per_shard, args.unique_images)
        made = time.perf_counter()
        largest = max(args.batch_sizes)
        lcm = math.lcm(*args.batch_sizes)
        rows = max(RING_BATCHES * largest, 4 * args.workers * args.per_shard, (args.concurrent_batches + 1) * largest)
        self.pool = DecodePool(args.workers, args.per_shard, -(-rows // lcm) * lcm, self.size, self.interpolation)
        pooled = time.perf_counter()
        print(f"shards made in {made - started:.1f} s; {args.workers} decode workers started in {pooled - made:.1f} s "
              f"(ring of {self.pool.rows} rows in {self.pool.path.parent})", flush=True)
        for px in args.image_px:
            n = args.decode_images - args.decode_images % largest
            self.pool.stream(self.shards[px], min(n, largest), largest)  # warm: page cache, first decodes
            stats = self.pool.stream(self.shards[px], n, largest)
            self.run.decode[px] = {"images_per_s": stats.rate, "per_core": stats.per_core, "images": stats.images}
            print(f"decode pool at {px} px: {stats.rate:,.0f} img/s ({stats.per_core:,.0f} per core)", flush=True)
            if self.model_pixels is None:
                self.model_pixels = np.array(self.pool.ring[:largest])
        self.run.info.update(workers=args.workers, ring_rows=self.pool.rows, ring=str(self.pool.path.parent),
                             setup_s=time.perf_counter() - started)

    def close(self) -> None:
        for threads in self.threads.values():
            threads.shutdown(wait=True, cancel_futures=True)
        if self.pool is not None:
            self.pool.close()

    # models --------------------------------------------------------------------------------------
    def bank(self, name: str, embed_dim: int) -> tuple[tuple, Any, str]:
        if name not in self.banks:
            self.banks[name] = head_bank_for(name, embed_dim)
            self.run.heads[name] = self.banks[name][2]
        return self.banks[name]

    def reference(self, name: str, px: int) -> tuple[list[str], np.ndarray, np.ndarray]:
        """(keys, pixels, fp32 CPU scores) of the first reference images at ``px``, for every px at once."""
        if (name, px) not in self.references:
            from pipeline import schema as S
            from pipeline.config import ModelConfig
            from pipeline.models.clip import build_random_init_clip_for_benchmark

            started = time.perf_counter()
            config = ModelConfig(name=name, precision="fp32", device="cpu")
            clip = build_random_init_clip_for_benchmark(config)
            specs, bank, _ = self.bank(name, clip.embed_dim)
            stage = embed_stage(config, clip, specs, bank)
            for each in self.args.image_px:
                keys, pixels = decode_first_rows(self.shards[each][0], self.args.reference_images, self.size,
                                                 self.interpolation)
                scores = stage(ok_batch(pixels, keys))[S.AESTHETIC_SCORE]
                self.references[(name, each)] = (keys, pixels, scores)
            self.depth.setdefault(name, tower_depth(clip))
            del stage, clip
            self.cost[("reference", name)] = time.perf_counter() - started
        return self.references[(name, px)]

    def stage(self, key: RowKey) -> tuple[Any, EncodeTimer]:
        """The EmbedScore of the row's (model, precision, variant), made once as the job makes it:
        ModelConfig -> a model of its own -> EmbedScore (which compiles, or turns the weights channels-last,
        in its __init__), then the timer around what it calls."""
        if key.stage_key not in self.stages:
            from pipeline.config import ModelConfig
            from pipeline.models.clip import build_random_init_clip_for_benchmark

            if key.variant == COMPILED:
                import torch

                # Each compiled stage starts from dynamo's state in a fresh process, as each actor's does:
                # no recompile-limit count, and no automatic-dynamic shape marks, left by the other models'
                # compiles of the same encode_image (compiled rows of one stage come one after another).
                torch._dynamo.reset()
            started = time.perf_counter()
            config = ModelConfig(name=key.model, precision=key.precision, device=self.device,
                                 compile=key.variant == COMPILED, channels_last=key.variant == CHANNELS_LAST)
            clip = build_random_init_clip_for_benchmark(config)
            specs, bank, _ = self.bank(key.model, clip.embed_dim)
            stage = embed_stage(config, clip, specs, bank)
            owner, attribute = (stage, "_compiled") if config.compile else (clip.model, "encode_image")
            self.stages[key.stage_key] = (stage, EncodeTimer(owner, attribute, clip.device))
            self.depth.setdefault(key.model, tower_depth(clip))
            self.cost[("build", key.model)] = time.perf_counter() - started
        return self.stages[key.stage_key]

    def consumers(self, at_once: int) -> concurrent.futures.ThreadPoolExecutor:
        """The threads that call EmbedScore in an ``at_once`` e2e run, kept for the whole run (as an actor's are)."""
        if at_once not in self.threads:
            self.threads[at_once] = concurrent.futures.ThreadPoolExecutor(at_once, thread_name_prefix="embed")
        return self.threads[at_once]

    # rows ----------------------------------------------------------------------------------------
    def expected(self, kind: str, model: str) -> float:
        """Seconds a build, reference or compile of ``model`` is expected to take: measured for it, else the
        last one measured for another model scaled by tower depth, else a first-time guess."""
        if (kind, model) in self.cost:
            return self.cost[(kind, model)]
        measured = [(m, seconds) for (k, m), seconds in self.cost.items() if k == kind]
        if measured:
            other, seconds = measured[-1]
            return seconds * self.depth.get(model, 1) / self.depth.get(other, 1)
        return GUESS_S[kind] * self.scale

    def estimate(self, key: RowKey) -> float:
        """Seconds the row is expected to take, first-time costs included."""
        seconds = 0.0
        if not any(m == key.model for m, _ in self.references):
            seconds += self.expected("reference", key.model)
        if key.stage_key not in self.stages:
            seconds += self.expected("build", key.model)
        model = self.model_only.get(key.group)
        if model is None:
            seconds += self.args.model_seconds + 2.0
            if key.variant == COMPILED:
                seconds += self.expected("compile", key.model)
        model_rate = (model or {}).get("images_per_s", float("inf"))
        if key.at_once > 1:  # one warm-up call per thread
            seconds += key.at_once * key.batch_size / model_rate
        rate = min(model_rate, self.run.decode[key.px]["images_per_s"])
        return seconds + self.args.e2e_images / rate + 2.0

    def measure_model_only(self, key: RowKey) -> dict[str, float]:
        if key.group not in self.model_only:
            stage, timer = self.stage(key)
            batch = ok_batch(self.model_pixels[:key.batch_size])
            started = time.perf_counter()
            stage(batch)  # warm-up: kernels, cuDNN/cuBLAS choices, the compile on a compiled row, pinned memory
            first_s = time.perf_counter() - started
            if key.variant == COMPILED:
                self.cost[("compile", key.model)] = first_s
            stage(batch)  # a second, untimed: some first-use costs (a CPU's bf16 kernels) last beyond one call
            timer.take()
            n, started = 0, time.perf_counter()
            while n < 3 or time.perf_counter() - started < self.args.model_seconds:
                stage(batch)
                n += 1
            wall = time.perf_counter() - started
            self.model_only[key.group] = {"images_per_s": n * key.batch_size / wall,
                                          "gpu_busy": timer.take() / wall, "first_call_s": first_s}
        return self.model_only[key.group]

    def e2e(self, key: RowKey) -> dict[str, Any]:
        from bench.run_gpu import GpuSampler
        from pipeline import schema as S

        stage, timer = self.stage(key)
        ref_keys, ref_pixels, ref_scores = self.reference(key.model, key.px)
        n_ref = len(ref_keys)
        first: dict[str, Any] = {}

        def consume(k: int, batch: dict[str, np.ndarray]) -> None:
            if k == 0:  # the reference images lead the first shard, so the first batch
                first["pixels"] = np.array(batch[S.PIXELS][:n_ref])
            out = stage(batch)
            if k == 0:
                first["keys"], first["scores"] = list(out[S.KEY][:n_ref]), out[S.AESTHETIC_SCORE][:n_ref]

        threads = None
        if key.at_once > 1:
            threads = self.consumers(key.at_once)
            warm_batch = ok_batch(self.model_pixels[:key.batch_size])
            warm_threads(threads, key.at_once, lambda: stage(warm_batch))
        n_images = self.args.e2e_images - self.args.e2e_images % key.batch_size
        timer.take()
        with GpuSampler(interval=0.2) as sampler:
            stats = self.pool.stream(self.shards[key.px], n_images, key.batch_size, consume, threads, key.at_once)
        if first["keys"] != ref_keys:
            raise RuntimeError(f"the first batch starts with keys {first['keys']}, expected {ref_keys}")
        return {"e2e_images": stats.images, "e2e_seconds": stats.wall_s, "e2e_images_per_s": stats.rate,
                "gpu_busy": timer.take() / stats.wall_s, "nvml_util": sampler.mean, "nvml_source": sampler.source,
                "wait_share": stats.wait_s / stats.wall_s,
                "max_abs_score_diff": float(np.max(np.abs(first["scores"] - ref_scores))),
                "reference_pixels_equal": bool(np.array_equal(first["pixels"], ref_pixels))}

    def row(self, key: RowKey) -> dict[str, Any]:
        model = self.measure_model_only(key)
        result = self.e2e(key)
        decode = self.run.decode[key.px]
        gpu_share = result["e2e_images_per_s"] / model["images_per_s"]
        decode_share = result["e2e_images_per_s"] / decode["images_per_s"]
        if max(gpu_share, decode_share) < BOUND_SHARE:
            bound = "neither"
        else:
            bound = "GPU" if gpu_share >= decode_share else "decode"
        return {**asdict(key), "model_images_per_s": model["images_per_s"], "model_gpu_busy": model["gpu_busy"],
                "first_call_s": model["first_call_s"], **result, "decode_images_per_s": decode["images_per_s"],
                "decode_per_core": decode["per_core"], "e2e_over_model": gpu_share,
                "e2e_over_decode": decode_share, "bound_by": bound, "head": self.run.heads[key.model]}


# Report ------------------------------------------------------------------------------------------

HEADER = ("model", "precision", "variant", "batch", "at once", "px", "model img/s", "e2e img/s", "e2e/model",
          "GPU busy", "NVML util", "decode img/s", "bound by", "max abs score diff")


def table_rows(rows: Sequence[dict[str, Any]]) -> list[tuple[str, ...]]:
    out = []
    for r in rows:
        head = (r["model"], r["precision"], r["variant"], str(r["batch_size"]), str(r["at_once"]), str(r["px"]))
        if "skipped" in r or "failed" in r:
            out.append(head + ("-",) * 6 + ("skipped: " + r["skipped"] if "skipped" in r else "FAILED", "-"))
            continue
        util = r.get("nvml_util")
        out.append(head + (f"{r['model_images_per_s']:,.0f}", f"{r['e2e_images_per_s']:,.0f}",
                           f"{r['e2e_over_model']:.2f}", f"{r['gpu_busy']:.0%}",
                           f"{util:.0f}%" if util is not None else "n/a", f"{r['decode_images_per_s']:,.0f}",
                           r["bound_by"], f"{r['max_abs_score_diff']:.2g}"))
    return out


def notes(run: Run) -> list[str]:
    args = run.args
    lines = [
        f"each row: model only = EmbedScore on one decoded batch, repeated {args.model_seconds:g} s; e2e = "
        f"{args.e2e_images} images (whole batches) from tar bytes to scores, {args.workers} decode processes "
        f"feeding this one; at once = threads calling the one EmbedScore in the e2e run (2: Ray's "
        f"concurrent_batches_per_actor default on a GPU); GPU busy = time inside encode_image (CUDA events) / e2e "
        f"wall; NVML util = mean torch.cuda.utilization; decode = the pool alone (read_shard_rows + Decode) at that "
        f"px; bound by: GPU or decode, whichever rate e2e comes nearer, reaching {BOUND_SHARE:.0%} of it (neither: "
        f"short of both); max |score diff| = the e2e run's scores vs CPU fp32 on its first "
        f"{args.reference_images} images",
        f"models: random init in the real architecture (build_random_init_clip_for_benchmark), one per variant; "
        f"variants = ModelConfig options into EmbedScore: compiled = compile=True (torch.compile(encode_image), "
        f"batches padded to a power of two; backend {args.compile_backend}"
        + ("" if args.compile_backend == "inductor" else " forced by torch.compiler.set_stance")
        + "), channels-last = channels_last=True; amp_bf16 = fp32 weights under bf16 autocast",
        "heads: " + ("; ".join(f"{m}: {label}" for m, label in run.heads.items()) or "none loaded"),
        "decode: " + ", ".join(f"{px} px {d['per_core']:,.0f} img/s per core" for px, d in run.decode.items()),
    ]
    compiles = [f"{r['model']} {r['precision']} {r['first_call_s']:.0f} s" for r in run.rows
                if r.get("variant") == COMPILED and "first_call_s" in r]
    if compiles:
        dynamo = run.info.get("dynamo") or {}
        lines.append("compile (the compiled stage's first call): " + ", ".join(dict.fromkeys(compiles))
                     + "; dynamo: " + ", ".join(f"{n} {what}" for what, n in dynamo.items()))
    equal = [r["reference_pixels_equal"] for r in run.rows if "reference_pixels_equal" in r]
    if equal:
        lines.append("reference pixels (pool vs this process): " + ("identical" if all(equal) else "DIFFER"))
    return lines + run.budget.notes


def write_outputs(run: Run, title: str) -> None:
    out = Path(run.args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"title": title, "args": vars(run.args), "device": run.device, "rows": run.rows,
               "decode": {str(px): d for px, d in run.decode.items()}, "heads": run.heads, "info": run.info,
               "notes": notes(run), "wall_s": time.perf_counter() - run.started}
    (out / "gpu_check.json").write_text(json.dumps(payload, indent=2, default=str))
    lines = [f"# {title}", "", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(run.rows)]
    lines += [""] + [f"- {line}" for line in notes(run)]
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")


def dynamo_counts() -> dict[str, int]:
    """Graphs dynamo compiled (a recompile is one more), graph breaks, frames it traced: for a compiled
    EmbedScore one graph per compile and no breaks is the case that pays."""
    if "torch._dynamo" not in sys.modules:
        return {}
    from torch._dynamo.utils import counters

    return {"graphs": counters["stats"]["unique_graphs"], "graph breaks": sum(counters["graph_break"].values()),
            "frames traced": counters["frames"]["total"]}


def require_cuda() -> None:
    import torch

    from bench.run_gpu import NoCuda

    if not torch.cuda.is_available():
        raise NoCuda(NO_CUDA_MESSAGE.format(torch=torch.__version__, cuda=torch.version.cuda))


def main(argv: Sequence[str] | None = None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    device = "cpu" if args.smoke_test_on_cpu else "cuda"
    from bench.run_gpu import NoCuda, machine_line
    from bench.table import text_table
    from pipeline.config import ModelConfig
    from pipeline.models.clip import image_geometry

    if device == "cuda":
        try:
            require_cuda()
        except NoCuda as error:
            print(error.code, file=sys.stderr)
            return 2
    geometries = {image_geometry(ModelConfig(name=m)) for m in args.models}
    if len(geometries) != 1:
        print(f"the models take different inputs {sorted(geometries)}: run them separately", file=sys.stderr)
        return 2
    size, interpolation = geometries.pop()
    title = f"gpu_check: {machine_line(device)}"
    if args.compile_backend != "inductor" and args.compile_batch_sizes and args.compile_precisions:
        import torch

        # EmbedScore calls torch.compile without a backend (inductor); this routes the graphs dynamo traces
        # from it to another backend, leaving the call and everything dynamo does as they are.
        torch.compiler.set_stance("default", force_backend=args.compile_backend)
        print(f"compiled rows: torch.compiler.set_stance(force_backend={args.compile_backend!r})", flush=True)
    run = Run(args, device, Budget(args.budget_s, started), started)
    bench = Bench(run, size, interpolation)
    failures: dict[tuple, str] = {}  # a set-up that failed once (a compile, say) is not tried again
    try:
        bench.prepare()
        for key in plan_rows(args):
            label = key.label
            group = (key.group, key.at_once)
            if group in failures:
                run.rows.append({**asdict(key), "failed": failures[group]})
                continue
            if not run.budget.fits(label, bench.estimate(key)):
                run.rows.append({**asdict(key), "skipped": "budget"})
                continue
            row_started = time.perf_counter()
            try:
                row = bench.row(key)
            except Exception as error:  # noqa: BLE001 - one failing row (a compile, memory) must not cost the rest
                traceback.print_exc()
                failures[group] = f"{type(error).__name__}: {error}"[:300]
                run.rows.append({**asdict(key), "failed": failures[group]})
                print(f"{label}: FAILED ({type(error).__name__}); the run goes on", flush=True)
            else:
                run.rows.append(row)
                print(f"{label}: model {row['model_images_per_s']:,.0f} img/s, e2e {row['e2e_images_per_s']:,.0f} "
                      f"img/s, GPU busy {row['gpu_busy']:.0%}, bound by {row['bound_by']} "
                      f"({time.perf_counter() - row_started:.1f} s)", flush=True)
            run.info["costs_s"] = {f"{kind} {model}": seconds for (kind, model), seconds in bench.cost.items()}
            run.info["dynamo"] = dynamo_counts()
            write_outputs(run, title)
    finally:
        bench.close()

    run.info["ray_imported"] = any(m == "ray" or m.startswith("ray.") for m in sys.modules)
    write_outputs(run, title)
    print()
    print(title)
    print(text_table(HEADER, table_rows(run.rows)))
    for line in notes(run):
        print(f"- {line}")
    print(f"- ray imported: {'YES' if run.info['ray_imported'] else 'no'}; written to {args.out}; "
          f"{time.perf_counter() - started:.0f} s in all")
    failed = [r for r in run.rows if "failed" in r]
    for r in failed:
        print(f"- FAILED {RowKey(**{f: r[f] for f in RowKey.__dataclass_fields__}).label}: {r['failed']}")
    if device == "cpu":
        print("SMOKE TEST ON CPU: every code path ran; the figures above mean nothing.")
    return 1 if run.info["ray_imported"] or failed else 0


if __name__ == "__main__":
    sys.exit(main())
