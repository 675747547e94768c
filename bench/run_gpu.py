"""`make bench-gpu`: GPU figures of the scoring job, for a machine with CUDA.

    .venv/bin/python -m bench.run_gpu [--models ViT-L-14-quickgelu ViT-B-32-quickgelu]
        [--precisions fp16 bf16] [--batch-size 256] [--compile] [--shards 8 --per-shard 250 --copies 20]
        [--skip-e2e] [--resources '{"decode_cpus": 1}']

(a) model only: images/s of the embed + score stage (EmbedScore: host-to-device copy, normalisation,
    encode_image, L2 norm, heads) per model and precision, random-init weights in the real architecture
    (pipeline.models.clip.build_random_init_clip_for_benchmark), optionally torch.compile'd; plus the heads'
    share of that time (three synthetic heads with the real files' shapes, as bench.bench_model does).
(b) end to end: run_score (read -> decode -> embed -> stage -> Parquet committed) on img2dataset-made
    shards with the same model and precision. No real CLIP weights are needed: ``embed_loader`` builds the
    random-init model in the actor (``--random-init``, the default; ``--pretrained PATH`` scores with a
    real weights file instead). The heads are the real LAION files when ../shared has them (the L/14 V2
    head, the B/32 V1 head), else seeded random heads of the same format and width. Ray is started and
    warmed on one shard first, so start-up is not timed (each run's own actor start and model load are).
    While it runs, GPU utilisation is sampled (torch.cuda.utilization, else nvidia-smi); the per-core
    decode rate is measured on the same shards, so the table can say what bounds the job: the GPU (e2e
    near model-only, utilisation high) or decode (e2e near the decode capacity of the CPUs left to it).

Without CUDA it stops at once with a clear message. ``--smoke-test-on-cpu`` runs every code path on the
CPU with tiny shapes, to check the script on a machine without a GPU: its figures mean nothing.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Sequence

from bench.table import text_table

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench-output" / "gpu"
DEFAULT_MODELS = ("ViT-L-14-quickgelu", "ViT-B-32-quickgelu")
DEFAULT_PRECISIONS = ("fp16", "bf16")
# The published head that fits each architecture's embedding (file name under --weights-dir / ../shared).
REAL_HEAD_FOR = {"ViT-L-14-quickgelu": "sac+logos+ava1-l14-linearMSE", "ViT-L-14": "sac+logos+ava1-l14-linearMSE",
                 "ViT-B-32-quickgelu": "sa_0_4_vit_b_32_linear", "ViT-B-32": "sa_0_4_vit_b_32_linear",
                 "ViT-B-16": "sa_0_4_vit_b_16_linear"}

NO_CUDA_MESSAGE = (
    "bench.run_gpu needs a CUDA GPU, and torch sees none here (torch.cuda.is_available() is False; "
    "torch {torch} built for CUDA {cuda}). Run it on a GPU node (`make bench-gpu`), or `make bench` for the "
    "CPU figures. `python -m bench.run_gpu --smoke-test-on-cpu` checks the script itself without a GPU.")


class NoCuda(SystemExit):
    """Raised (exit status 2) when the machine has no CUDA device."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run_gpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="open_clip architectures")
    parser.add_argument("--precisions", nargs="+", default=list(DEFAULT_PRECISIONS), choices=("fp32", "fp16", "bf16"))
    parser.add_argument("--batch-size", type=int, default=256, help="embed batch size (model only and end to end)")
    parser.add_argument("--n-batches", type=int, default=20, help="timed batches per model-only row")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd image towers (model only)")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--random-init", action="store_true", default=True,
                         help="seeded random weights in the real architecture (the default; no download)")
    weights.add_argument("--pretrained", default=None,
                         help="score end to end with this weights file instead (path or URI; one model only)")
    parser.add_argument("--skip-e2e", action="store_true", help="model-only figures only")
    parser.add_argument("--e2e-precisions", nargs="+", default=None,
                        help="precisions for the end-to-end runs (default: the first of --precisions)")
    parser.add_argument("--shards", type=int, default=8, help="img2dataset shards to build")
    parser.add_argument("--per-shard", type=int, default=250, help="samples per built shard")
    parser.add_argument("--copies", type=int, default=20,
                        help="the end-to-end input is the built shards copied this many times under new numbers")
    parser.add_argument("--decode-batch-size", type=int, default=64)
    parser.add_argument("--resources", default="{}", help="JSON of ResourcesConfig overrides for run_score")
    parser.add_argument("--num-cpus", type=int, default=None, help="ray.init num_cpus (default: all)")
    parser.add_argument("--smoke-test-on-cpu", action="store_true",
                        help="run every code path on the CPU with the tiny model and tiny inputs (no GPU needed; "
                             "the figures mean nothing)")
    args = parser.parse_args(argv)
    if args.batch_size <= 0 or args.n_batches <= 0 or args.copies <= 0 or args.shards <= 0:
        parser.error("--batch-size, --n-batches, --shards and --copies must be positive")
    if args.pretrained and len(args.models) != 1:
        parser.error("--pretrained scores one model: give exactly one --models")
    json.loads(args.resources)  # a bad JSON fails here, before any work
    if args.smoke_test_on_cpu:
        args.models, args.precisions, args.batch_size, args.n_batches = ["tiny-random"], ["fp32"], 16, 2
        args.shards, args.per_shard, args.copies, args.compile = 2, 10, 2, False
    return args


def require_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        raise NoCuda(NO_CUDA_MESSAGE.format(torch=torch.__version__, cuda=torch.version.cuda))


# Model only ------------------------------------------------------------------------------------

def model_only(args: argparse.Namespace, device: str) -> list[dict[str, Any]]:
    import torch

    from bench.bench_model import bench_model
    from pipeline.config import ModelConfig

    rows = []
    for name in args.models:
        for precision in args.precisions:
            for compiled in ([False, True] if args.compile else [False]):
                config = ModelConfig(name=name, precision=precision, device=device)
                print(f"model only: {name} {precision}{' compiled' if compiled else ''} ...", flush=True)
                row = bench_model(config, args.batch_size, args.n_batches, random_init=True,
                                  compile_model=compiled, warmup_batches=3 if compiled else 1)
                row["name"] = name
                rows.append(row)
                if device == "cuda":
                    torch.cuda.empty_cache()
    return rows


# End to end ------------------------------------------------------------------------------------

def random_init_loader(model, heads, search_dirs=(), storage_options=None):
    """``embed_loader`` for run_score: the random-init architecture (no CLIP weights) + the real heads.

    Module-level so that it pickles by reference into the Ray actors."""
    from pipeline.models.clip import build_random_init_clip_for_benchmark
    from pipeline.models.heads import load_head_bank

    bank = load_head_bank(heads, search_dirs, storage_options)
    clip = build_random_init_clip_for_benchmark(model)
    bank.check_embedding_dim(clip.embed_dim, clip.identity)
    return clip, bank.to(clip.device)


def heads_for(name: str) -> tuple[tuple, tuple[str, ...], str]:
    """(head specs, weights dirs, label) for a model: the real published head when ../shared has it."""
    from pipeline.config import KNOWN_HEADS, HeadSpec, WeightsSpec
    from pipeline.demo import SHARED_HEADS, random_v2_head
    from pipeline.models.clip import _model_config
    from pipeline.models.weights import file_name_of

    real = REAL_HEAD_FOR.get(name)
    if real and (SHARED_HEADS / file_name_of(KNOWN_HEADS[real].weights.uri)).exists():
        return (KNOWN_HEADS[real],), (str(SHARED_HEADS),), real
    embed_dim = int(_model_config(name)["embed_dim"])
    path, digest = random_v2_head(OUT / "heads", embed_dim)
    return (HeadSpec(f"random-v2-{embed_dim}", WeightsSpec(path, digest)),), (), f"random V2-format head ({embed_dim}-d)"


def e2e_input(args: argparse.Namespace) -> tuple[Path, Path, int]:
    """(shards folder for the runs, 1-shard warm-up folder, images in the runs' input)."""
    from bench import run_cpu

    run_cpu.OUT = OUT  # make bench's helpers build and copy under bench-output/gpu
    shards, images = run_cpu.sample_shards(args.shards, args.per_shard, 256)
    big = run_cpu.copied_shards(shards, f"x{args.copies}", args.copies)
    warm = run_cpu.copied_shards(shards, "warm", 1, first=1)
    return big, warm, images * args.copies


class GpuSampler:
    """Mean and peak GPU utilisation (%) over a run: torch.cuda.utilization (pynvml), else nvidia-smi."""

    def __init__(self, interval: float = 0.5):
        self.interval = interval
        self.samples: list[float] = []
        self.source = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _read(self) -> float | None:
        import torch

        if self.source in (None, "torch"):
            try:
                value = float(torch.cuda.utilization())
                self.source = "torch.cuda.utilization"
                return value
            except Exception:  # noqa: BLE001 - no pynvml: try nvidia-smi
                self.source = "nvidia-smi"
        if self.source == "nvidia-smi" and shutil.which("nvidia-smi"):
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=5).stdout.split()
                return float(out[0]) if out else None
            except (OSError, ValueError, subprocess.SubprocessError):
                return None
        self.source = "unavailable"
        return None

    def _loop(self) -> None:
        while True:
            value = self._read()
            if value is not None:
                self.samples.append(value)
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> "GpuSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


def decode_rate_per_core(shards: Path, batch_size: int) -> float:
    from bench.run_cpu import best_pass, read_batches
    from pipeline import schema as S
    from pipeline.config import DecodeConfig
    from pipeline.stages.decode import Decode

    source = sorted(shards.glob("*.tar"))[:2]
    folder = OUT / "decode-sample"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for tar in source:
        shutil.copyfile(tar, folder / tar.name)
        shutil.copyfile(tar.with_suffix(".parquet"), folder / tar.with_suffix(".parquet").name)
    batches = read_batches(folder, batch_size)
    decode = Decode(DecodeConfig(batch_size=batch_size), image_size=224)
    images = sum(int((b[S.STATUS] == S.Status.OK.value).sum()) for b in batches)
    return images / best_pass(lambda: [decode(b) for b in batches])


def end_to_end(args: argparse.Namespace, device: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    import ray

    from pipeline.config import DecodeConfig, ModelConfig, ResourcesConfig, ScoreConfig
    from pipeline.ray_session import start_local_ray
    from pipeline.runner import run_score

    resources = json.loads(args.resources)
    shards, warm, images = e2e_input(args)
    per_core = decode_rate_per_core(shards, args.decode_batch_size)
    start_local_ray(num_cpus=args.num_cpus, log_to_driver=False, configure_logging=False)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    cpus = int(ray.cluster_resources().get("CPU", os.cpu_count() or 1))
    precisions = args.e2e_precisions or args.precisions[:1]
    rows = []
    try:
        for name in args.models:
            heads, weights_dirs, head_label = heads_for(name)
            for precision in precisions:
                model = ModelConfig(name=name, precision=precision, device=device,
                                    **({"pretrained": args.pretrained} if args.pretrained else {}))
                loader = None if args.pretrained else functools.partial(random_init_loader, model, heads,
                                                                          weights_dirs)

                def config(inputs: Path, output: str) -> ScoreConfig:
                    path = OUT / "runs" / output
                    shutil.rmtree(path, ignore_errors=True)
                    return ScoreConfig(
                        input=(str(inputs),), output=str(path), model=model, heads=heads, weights_dirs=weights_dirs,
                        decode=DecodeConfig(batch_size=args.decode_batch_size),
                        resources=ResourcesConfig(embed_batch_size=args.batch_size, **resources))

                print(f"end to end: {name} {precision}: warm-up on 1 shard ...", flush=True)
                start = time.perf_counter()
                warm_summary = run_score(config(warm, f"warm-{name}-{precision}"), embed_loader=loader)
                warm_seconds = time.perf_counter() - start
                if not warm_summary.ok:
                    raise RuntimeError(f"warm-up failed: {warm_summary.units_failed}")
                print(f"end to end: {name} {precision}: {images} images ...", flush=True)
                with GpuSampler() as gpu:
                    start = time.perf_counter()
                    summary = run_score(config(shards, f"e2e-{name}-{precision}"), embed_loader=loader)
                    seconds = time.perf_counter() - start
                if not summary.ok or summary.scored != images:
                    raise RuntimeError(f"{name} {precision}: scored {summary.scored} of {images}; "
                                       f"failed {summary.units_failed}")
                # Each run_score starts its own embed actor (process, CUDA context, model build): the 1-shard
                # warm-up run is mostly that fixed cost, so taking it out estimates the steady state.
                extra = seconds - warm_seconds
                steady = (images - warm_summary.scored) / extra if extra > 0 else None
                rows.append({"name": name, "precision": precision, "images": images, "seconds": seconds,
                             "images_per_s": images / seconds, "steady_images_per_s": steady,
                             "warm_seconds": warm_seconds, "gpu_util": gpu.mean, "gpu_source": gpu.source,
                             "head": head_label})
    finally:
        ray.shutdown()
    decode_cpus = max(1, cpus - 1)  # one CPU is held by the embed actor by default
    info = {"cpus": cpus, "decode_per_core": per_core, "decode_capacity": per_core * decode_cpus,
            "decode_cpus": decode_cpus, "resources": resources or "defaults"}
    return rows, info


# Report ----------------------------------------------------------------------------------------

def model_table(rows: Sequence[dict[str, Any]]) -> str:
    header = ("model", "precision", "compiled", "batch", "images/s", "ms/batch", "heads ms", "heads share")
    return text_table(header, [
        (r["name"], r["precision"], "yes" if r["compiled"] else "no", r["batch_size"], f"{r['images_per_s']:,.0f}",
         f"{r['ms_per_batch']:.1f}", f"{r['heads_ms_per_batch']:.3f}", f"{r['heads_fraction']:.2%}") for r in rows])


def bound_by(e2e: dict[str, Any], model_rate: float | None, info: dict[str, Any]) -> str:
    """What most likely limits the end-to-end rate."""
    rate, util = e2e.get("steady_images_per_s") or e2e["images_per_s"], e2e.get("gpu_util")
    if model_rate and rate >= 0.8 * model_rate:
        return "GPU (e2e within 20% of model only)"
    if util is not None and util >= 85:
        return f"GPU ({util:.0f}% busy)"
    if rate >= 0.8 * info["decode_capacity"]:
        return f"decode ({info['decode_cpus']} CPUs x {info['decode_per_core']:,.0f} img/s)"
    return "neither: Ray overhead, I/O or too little input (see BENCHMARKS.md)"


def e2e_table(e2e_rows: Sequence[dict[str, Any]], model_rows: Sequence[dict[str, Any]], info: dict[str, Any]) -> str:
    model_rate = {(r["name"], r["precision"]): r["images_per_s"] for r in model_rows if not r["compiled"]}
    header = ("model", "precision", "images", "e2e images/s", "steady*", "model only", "e2e / model", "GPU util",
              "decode capacity", "bound by")
    rows = []
    for r in e2e_rows:
        m = model_rate.get((r["name"], r["precision"]))
        steady = r.get("steady_images_per_s")
        rows.append((r["name"], r["precision"], r["images"], f"{r['images_per_s']:,.0f}",
                     f"{steady:,.0f}" if steady else "-", f"{m:,.0f}" if m else "-", f"{r['images_per_s'] / m:.2f}x" if m else "-",
                     f"{r['gpu_util']:.0f}%" if r.get("gpu_util") is not None else "n/a",
                     f"{info['decode_capacity']:,.0f}", bound_by(r, m, info)))
    return text_table(header, rows)


def machine_line(device: str) -> str:
    import platform

    import torch

    gpu = torch.cuda.get_device_name() if device == "cuda" else "none (smoke test on CPU)"
    return (f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; GPU {gpu}; nproc {os.cpu_count()}; "
            f"torch {torch.__version__} (CUDA {torch.version.cuda}); python {platform.python_version()}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = "cpu" if args.smoke_test_on_cpu else "cuda"
    if device == "cuda":
        try:
            require_cuda()
        except NoCuda as error:
            print(error.code, file=sys.stderr)
            return 2
    model_rows = model_only(args, device)
    e2e_rows, info = ([], {}) if args.skip_e2e else end_to_end(args, device)

    print()
    print("=" * 110)
    print(f"make bench-gpu: {machine_line(device)}")
    print(f"weights: {'random init (build_random_init_clip_for_benchmark)' if not args.pretrained else args.pretrained}")
    print()
    print(f"(a) model only: EmbedScore on random uint8 batches of {args.batch_size}, {args.n_batches} timed batches; "
          "heads = three synthetic heads with the real files' shapes")
    print(model_table(model_rows))
    if e2e_rows:
        print()
        print(f"(b) end to end: run_score on img2dataset shards ({args.shards} built x {args.per_shard} samples, "
              f"copied x{args.copies}), embed batch {args.batch_size}, decode batch {args.decode_batch_size}, "
              f"Ray num_cpus={info['cpus']}, resources {info['resources']}; start-up excluded (warm-up run first)")
        print(e2e_table(e2e_rows, model_rows, info))
        print("* steady: (images - warm-up images) / (run time - 1-shard warm-up run time): each run_score starts a "
              "fresh embed actor (process, CUDA context, model build), which the warm-up run mostly consists of; "
              "warm-up runs took " + ", ".join(f"{r['warm_seconds']:.1f} s" for r in e2e_rows))
        print(f"decode: {info['decode_per_core']:,.0f} img/s per core (Decode stage, 1 process); GPU utilisation "
              f"from {e2e_rows[0]['gpu_source']}; heads: " + ", ".join(sorted({r['head'] for r in e2e_rows})))
    if device == "cpu":
        print("\nSMOKE TEST ON CPU: every code path ran; the figures above mean nothing.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
