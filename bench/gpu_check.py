"""`make gpu-check`: the scoring job's own stages on one GPU, without Ray, in one table.

    bash bench/gpu_check.sh [--models ViT-L-14-quickgelu ViT-B-32-quickgelu] [--precisions fp16 bf16]
        [--batch-sizes 256 1024] [--compile-batch-sizes 1024] [--image-px 256 512] [--e2e-images 6144]
        [--budget-s 270] [--workers N]
    bash bench/gpu_check.sh --smoke-test-on-cpu     # every code path on the CPU, tiny shapes; figures mean nothing

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
* per row (model, precision, compiled, batch size, image px):
  - model img/s: ``EmbedScore`` (pipeline/stages/embed.py: host-to-device copy, normalisation,
    encode_image, L2 norm, heads) on one decoded batch, again and again;
  - e2e img/s: tar bytes to scores: the pool reads and decodes while this process runs ``EmbedScore`` on
    each full batch as soon as its rows are decoded;
  - GPU busy: time the GPU spends inside encode_image (CUDA events around each call) over the e2e wall
    time; NVML util: mean of torch.cuda.utilization sampled during the e2e run;
  - decode img/s: the pool alone (read + decode, no model) at that px;
  - bound by: GPU when e2e comes within 15% of model only and nearer it than to decode, decode in the
    opposite case, "neither" when e2e falls well short of both (this process cannot feed the GPU);
  - max |score diff|: the GPU scores of the first ``--reference-images`` images of the e2e run against
    the same model in fp32 on the CPU, on the same decoded pixels.
* models: the real open_clip architectures with seeded random weights
  (``pipeline.models.clip.build_random_init_clip_for_benchmark``; no hub). The CPU reference model has
  the same seed, so the same weights. Heads: the published LAION file for each architecture
  (bench.run_gpu.REAL_HEAD_FOR) from bench/gpu_wheels/heads/, ./shared or ../shared, else a seeded random
  head of the same shape.
* order: every eager row first (model by model), then the compiled rows (precision by precision), so a
  run cut short by ``--budget-s`` loses compiled rows first. Before each step the time it is expected to
  take is checked against what is left of the budget; a step that does not fit is skipped with a note.

The table goes to stdout, and as gpu_check.json and gpu_check.md to $OUT when that is set (the device
tool brings back what is written there), else to bench-output/gpu_check/; both files are rewritten after
every row, so a run stopped early still leaves its rows. Scratch shards go to bench-output/gpu_check/.

On this project's device tool (an H200 machine with 16 cores). The default run stops starting steps once
--budget-s 270 would be overrun, so it ends in about 5 minutes, leaving device time for one rerun; the
timeout is there for a step that runs far past its estimate (a compile), and the tee keeps the whole log:

    run(command="set -o pipefail; bash bench/gpu_check.sh 2>&1 | tee $OUT/gpu_check.log",
        carry=["bench/gpu_wheels"], timeout_s=360)

For a rerun after a cut-short first run, add --budget-s 180, or drop the compiled rows with a bare
--compile-batch-sizes (no values).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import multiprocessing
import os
import sys
import tarfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

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
BOUND_SHARE = 0.85  # e2e at least this share of a stage's own rate: that stage is the limit
RING_BATCHES = 3  # the decoded-pixel ring holds this many of the largest batches (decode runs ahead)

# First-time guesses for the budget (seconds); each is replaced by what the run measures.
GUESS_BUILD_S = 20.0
GUESS_REFERENCE_S = 20.0
GUESS_COMPILE_S = 75.0

NO_CUDA_MESSAGE = (
    "bench.gpu_check needs a CUDA GPU, and torch sees none here (torch {torch}, built for CUDA {cuda}). "
    "`bash bench/gpu_check.sh --smoke-test-on-cpu` checks the script itself without a GPU.")


# Arguments ---------------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="open_clip architectures")
    parser.add_argument("--precisions", nargs="+", default=["fp16", "bf16"], choices=("fp32", "fp16", "bf16"))
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[256, 1024], help="embed batch sizes")
    parser.add_argument("--compile-batch-sizes", nargs="*", type=int, default=[1024],
                        help="batch sizes that also get torch.compile'd rows (none: no compiled rows); each "
                             "compiles the image tower once per model and precision")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend")
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
                        help="every code path on the CPU: the tiny model, tiny inputs, the eager compile backend")
    args = parser.parse_args(argv)
    if args.smoke_test_on_cpu:
        args.models, args.precisions = ["tiny-random"], ["bf16"]
        args.batch_sizes, args.compile_batch_sizes = [8, 16], [16]
        if args.compile_backend == "inductor":  # inductor would build C++ kernels for minutes on a small CPU
            args.compile_backend = "eager"
        args.e2e_images, args.decode_images, args.per_shard, args.shards = 32, 32, 8, 4
        args.unique_images, args.reference_images, args.model_seconds = 8, 4, 0.2
    positive = ("e2e_images", "decode_images", "per_shard", "shards", "unique_images", "reference_images",
                "workers", "budget_s", "model_seconds")
    if any(getattr(args, name) <= 0 for name in positive) or min(args.batch_sizes + args.image_px) <= 0:
        parser.error("sizes, counts and seconds must be positive")
    if any(b % args.per_shard for b in args.batch_sizes):
        parser.error(f"each batch size must be a multiple of --per-shard ({args.per_shard}): a batch is whole shards")
    if not set(args.compile_batch_sizes) <= set(args.batch_sizes):
        parser.error("--compile-batch-sizes must be among --batch-sizes")
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


def _numpy_columns(table: Any) -> dict[str, np.ndarray]:
    """An Arrow table as the numpy batch Ray Data hands a batch_format="numpy" UDF (bench.plain_loop's
    numpy_batch, which is not imported: plain_loop imports pipeline.runner, and with it Ray)."""
    import pyarrow as pa

    out = {}
    for name in table.column_names:
        column = table.column(name)
        values = column.to_numpy(zero_copy_only=False)
        if (pa.types.is_string(column.type) or pa.types.is_binary(column.type)) and values.dtype != object:
            values = values.astype(object)
        out[name] = values
    return out


def _read_and_decode(tar: str, sidecar: str, offset: int) -> tuple[dict[str, np.ndarray], float, float]:
    """One pool task: read and join a shard as the read stage does, decode it, pixels into the ring at
    ``offset``. (the small columns, read seconds, decode seconds)."""
    from pipeline import schema as S
    from pipeline.stages.read import read_shard_rows, to_table

    started = time.perf_counter()
    batch = _numpy_columns(to_table(read_shard_rows(tar, sidecar), tar, "gpu-check"))
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
               consume: Callable[[int, dict[str, np.ndarray]], None] | None = None) -> StreamStats:
        """Read + decode ``n_images`` (cycling over ``shards``) and hand each full batch of ``batch_size``
        rows to ``consume`` in order, its pixels a view of the ring. A task is sent as soon as the rows it
        will write have been consumed, so decode runs up to a ring's worth ahead of the model."""
        from pipeline import schema as S

        per_shard, ring_rows = self.per_shard, self.rows - self.rows % batch_size
        n_batches = n_images // batch_size
        n_tasks = n_batches * batch_size // per_shard
        futures: dict[int, concurrent.futures.Future] = {}
        stats, sent = StreamStats(images=n_batches * batch_size), 0
        started = time.perf_counter()
        for k in range(n_batches):
            while sent < n_tasks and (sent + 1) * per_shard <= k * batch_size + ring_rows:
                tar, sidecar = shards[sent % len(shards)]
                futures[sent] = self.executor.submit(_read_and_decode, tar, sidecar, (sent * per_shard) % ring_rows)
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
            if consume is not None:
                consume(k, batch)
        stats.wall_s = time.perf_counter() - started
        return stats


# Models and heads --------------------------------------------------------------------------------

class EncodeTimer:
    """Time spent inside the model's encode_image: on the GPU, CUDA events around each call, so the GPU's own
    clock from its first kernel (once the copy and normalisation queued before it are done) to its last;
    host work between calls (the pinned copy, waiting for decode) is left out. On the CPU, the call's wall time."""

    def __init__(self, model: Any, device: Any) -> None:
        self._encode = model.encode_image
        self.cuda = device.type == "cuda"
        self._events: list[tuple[Any, Any]] = []
        self._cpu_s = 0.0
        model.encode_image = self  # EmbedScore calls clip.model.encode_image: the instance attribute wins

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
        self._cpu_s += time.perf_counter() - started
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


def embed_stage(name: str, precision: str, device: str, clip: Any, specs: tuple, bank: Any) -> Any:
    """The job's EmbedScore around an already built model and head bank."""
    from pipeline.config import ModelConfig
    from pipeline.stages.embed import EmbedScore

    return EmbedScore(ModelConfig(name=name, precision=precision, device=device), specs, loader=lambda: (clip, bank))


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
    out = Decode(DecodeConfig(), image_size=size, interpolation=interpolation)(_numpy_columns(table))
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
    compiled: bool
    batch_size: int
    px: int


def plan_rows(args: argparse.Namespace) -> list[RowKey]:
    """Eager rows model by model, then compiled rows precision by precision (the costly, optional part)."""
    rows = [RowKey(m, p, False, b, px) for m in args.models for p in args.precisions
            for b in args.batch_sizes for px in args.image_px]
    rows += [RowKey(m, p, True, b, px) for p in args.precisions for m in args.models
             for b in args.compile_batch_sizes for px in args.image_px]
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
    """Holds what rows share: shards, the pool, built models, CPU reference scores, measured costs."""

    def __init__(self, run: Run, size: int, interpolation: str) -> None:
        self.run, self.args, self.device = run, run.args, run.device
        self.size, self.interpolation = size, interpolation
        self.shards: dict[int, list[tuple[str, str]]] = {}
        self.pool: DecodePool | None = None
        self.model_pixels: np.ndarray | None = None
        self.clips: dict[tuple[str, str], Any] = {}
        self.timers: dict[tuple[str, str], EncodeTimer] = {}
        self.banks: dict[str, tuple[tuple, Any, str]] = {}
        self.references: dict[tuple[str, int], tuple[list[str], np.ndarray, np.ndarray]] = {}
        self.model_only: dict[tuple[str, str, bool, int], dict[str, float]] = {}
        self.compiled: set[tuple[str, str]] = set()
        scale = 0.1 if self.args.smoke_test_on_cpu else 1.0  # the tiny model builds and compiles in seconds
        self.cost = {"build": GUESS_BUILD_S * scale, "reference": GUESS_REFERENCE_S * scale,
                     "compile": GUESS_COMPILE_S * scale}

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
        rows = max(RING_BATCHES * largest, 4 * args.workers * args.per_shard)
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
            clip = build_random_init_clip_for_benchmark(ModelConfig(name=name, precision="fp32", device="cpu"))
            specs, bank, _ = self.bank(name, clip.embed_dim)
            stage = embed_stage(name, "fp32", "cpu", clip, specs, bank)
            for each in self.args.image_px:
                keys, pixels = decode_first_rows(self.shards[each][0], self.args.reference_images, self.size,
                                                 self.interpolation)
                scores = stage(ok_batch(pixels, keys))[S.AESTHETIC_SCORE]
                self.references[(name, each)] = (keys, pixels, scores)
            del stage, clip
            self.cost["reference"] = time.perf_counter() - started
        return self.references[(name, px)]

    def clip(self, name: str, precision: str) -> tuple[Any, EncodeTimer]:
        if (name, precision) not in self.clips:
            from pipeline.config import ModelConfig
            from pipeline.models.clip import build_random_init_clip_for_benchmark

            started = time.perf_counter()
            clip = build_random_init_clip_for_benchmark(ModelConfig(name=name, precision=precision, device=self.device))
            self.clips[(name, precision)] = clip
            self.timers[(name, precision)] = EncodeTimer(clip.model, clip.device)
            self.cost["build"] = time.perf_counter() - started
        return self.clips[(name, precision)], self.timers[(name, precision)]

    def compile(self, name: str, precision: str) -> None:
        """Swap in a torch.compile'd image tower, as bench.bench_model does (static shapes: one graph per
        batch size, compiled on its first call)."""
        import torch

        if (name, precision) not in self.compiled:
            clip, _ = self.clip(name, precision)
            clip.model.visual = torch.compile(clip.model.visual, backend=self.args.compile_backend, dynamic=False)
            self.compiled.add((name, precision))

    # rows ----------------------------------------------------------------------------------------
    def estimate(self, key: RowKey) -> float:
        """Seconds the row is expected to take, first-time costs included."""
        seconds = 0.0
        if not any(m == key.model for m, _ in self.references):
            seconds += self.cost["reference"]
        if (key.model, key.precision) not in self.clips:
            seconds += self.cost["build"]
        group = (key.model, key.precision, key.compiled, key.batch_size)
        model = self.model_only.get(group)
        if model is None:
            seconds += self.args.model_seconds + 2.0 + (self.cost["compile"] if key.compiled else 0.0)
        rate = min((model or {}).get("images_per_s", float("inf")), self.run.decode[key.px]["images_per_s"])
        return seconds + self.args.e2e_images / rate + 2.0

    def measure_model_only(self, key: RowKey) -> dict[str, float]:
        group = (key.model, key.precision, key.compiled, key.batch_size)
        if group not in self.model_only:
            clip, timer = self.clip(key.model, key.precision)
            if key.compiled:
                self.compile(key.model, key.precision)
            specs, bank, _ = self.bank(key.model, clip.embed_dim)
            stage = embed_stage(key.model, key.precision, self.device, clip, specs, bank)
            batch = ok_batch(self.model_pixels[:key.batch_size])
            started = time.perf_counter()
            stage(batch)  # warm-up: kernels, cuDNN/cuBLAS choices, and the compile on a compiled row
            first_s = time.perf_counter() - started
            if key.compiled:
                self.cost["compile"] = first_s
                stage(batch)
            timer.take()
            n, started = 0, time.perf_counter()
            while n < 3 or time.perf_counter() - started < self.args.model_seconds:
                stage(batch)
                n += 1
            wall = time.perf_counter() - started
            self.model_only[group] = {"images_per_s": n * key.batch_size / wall, "gpu_busy": timer.take() / wall,
                                      "first_call_s": first_s}
        return self.model_only[group]

    def e2e(self, key: RowKey) -> dict[str, Any]:
        from bench.run_gpu import GpuSampler
        from pipeline import schema as S

        clip, timer = self.clip(key.model, key.precision)
        specs, bank, _ = self.bank(key.model, clip.embed_dim)
        stage = embed_stage(key.model, key.precision, self.device, clip, specs, bank)
        ref_keys, ref_pixels, ref_scores = self.reference(key.model, key.px)
        n_ref = len(ref_keys)
        first: dict[str, Any] = {}

        def consume(k: int, batch: dict[str, np.ndarray]) -> None:
            if k == 0:  # the reference images lead the first shard, so the first batch
                first["pixels"] = np.array(batch[S.PIXELS][:n_ref])
            out = stage(batch)
            if k == 0:
                first["keys"], first["scores"] = list(out[S.KEY][:n_ref]), out[S.AESTHETIC_SCORE][:n_ref]

        n_images = self.args.e2e_images - self.args.e2e_images % key.batch_size
        timer.take()
        with GpuSampler(interval=0.2) as sampler:
            stats = self.pool.stream(self.shards[key.px], n_images, key.batch_size, consume)
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

HEADER = ("model", "precision", "compiled", "batch", "px", "model img/s", "e2e img/s", "e2e/model", "GPU busy",
          "NVML util", "decode img/s", "bound by", "max abs score diff")


def table_rows(rows: Sequence[dict[str, Any]]) -> list[tuple[str, ...]]:
    out = []
    for r in rows:
        head = (r["model"], r["precision"], "yes" if r["compiled"] else "no", str(r["batch_size"]), str(r["px"]))
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
        f"feeding this one; GPU busy = time inside encode_image (CUDA events) / e2e wall; NVML util = mean "
        f"torch.cuda.utilization; decode = the pool alone (read_shard_rows + Decode) at that px; bound by: GPU or "
        f"decode, whichever rate e2e comes nearer, reaching {BOUND_SHARE:.0%} of it (neither: short of both); "
        f"max |score diff| = GPU vs CPU fp32 on the first {args.reference_images} images",
        f"models: random init in the real architecture (build_random_init_clip_for_benchmark); compiled: "
        f"torch.compile(visual, backend={args.compile_backend!r}, dynamic=False)",
        "heads: " + ("; ".join(f"{m}: {label}" for m, label in run.heads.items()) or "none loaded"),
        "decode: " + ", ".join(f"{px} px {d['per_core']:,.0f} img/s per core" for px, d in run.decode.items()),
    ]
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
    run = Run(args, device, Budget(args.budget_s, started), started)
    bench = Bench(run, size, interpolation)
    failures: dict[tuple, str] = {}  # a model set-up that failed once (a compile, say) is not tried again
    try:
        bench.prepare()
        for key in plan_rows(args):
            label = (f"{key.model} {key.precision}{' compiled' if key.compiled else ''} batch {key.batch_size} "
                     f"{key.px} px")
            group = (key.model, key.precision, key.compiled, key.batch_size)
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
                      f"img/s, bound by {row['bound_by']} ({time.perf_counter() - row_started:.1f} s)", flush=True)
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
        print(f"- FAILED {r['model']} {r['precision']} compiled={r['compiled']} batch {r['batch_size']} "
              f"{r['px']} px: {r['failed']}")
    if device == "cpu":
        print("SMOKE TEST ON CPU: every code path ran; the figures above mean nothing.")
    return 1 if run.info["ray_imported"] or failed else 0


if __name__ == "__main__":
    sys.exit(main())
