"""Model-only throughput of the embed + score stage: no reading, no decoding, no Ray.

Random uint8 batches go through :class:`pipeline.stages.embed.EmbedScore` exactly as in a job (host-to-device
copy, normalisation, ``encode_image``, L2 norm, all heads), timed after one warm-up batch. The heads are also
timed alone, as a fraction of the whole, to show whether they matter.

    python -m bench.bench_model                                   # tiny-random on CPU
    python -m bench.bench_model --model ViT-L-14-quickgelu --random-init --device cuda \\
        --precision fp16 bf16 --batch-size 256 [--compile]        # the real architecture, random weights
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Any, Sequence

import numpy as np
import torch

from bench.table import text_table
from pipeline import schema
from pipeline.config import PRECISIONS, HeadSpec, ModelConfig, WeightsSpec
from pipeline.models.clip import LoadedClip, build_random_init_clip_for_benchmark, load_clip
from pipeline.models.heads import Head, HeadBank
from pipeline.stages.embed import EmbedScore

# Random heads with the real files' shapes: what costs time is the shape, not the values.
_SYNTHETIC_HEAD_LAYERS = {
    "bench-v2-linear-mlp": ((0, 2, 4, 6, 7), (1024, 128, 64, 16, 1)),
    "bench-v1-linear": (None, (1,)),
    "bench-relu-mlp": ((0, 3, 6, 9, 11), (1024, 128, 64, 16, 1)),
}


def synthetic_head_bank(embed_dim: int, device: torch.device, seed: int = 0) -> HeadBank:
    generator = torch.Generator().manual_seed(seed)
    heads = []
    for name, (indices, widths) in _SYNTHETIC_HEAD_LAYERS.items():
        state_dict, width = {}, embed_dim
        for position, out_width in enumerate(widths):
            prefix = "" if indices is None else f"layers.{indices[position]}."
            state_dict[prefix + "weight"] = torch.randn(out_width, width, generator=generator) / width ** 0.5
            state_dict[prefix + "bias"] = torch.randn(out_width, generator=generator)
            width = out_width
        heads.append(Head.from_state_dict(name, state_dict))
    return HeadBank(heads, device)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_model(
    model_config: ModelConfig,
    batch_size: int = 64,
    n_batches: int = 10,
    random_init: bool = False,
    compile_model: bool = False,
    warmup_batches: int = 1,
) -> dict[str, Any]:
    """Images/s of embed + score at ``batch_size``, over ``n_batches`` after ``warmup_batches``."""
    clip: LoadedClip = (build_random_init_clip_for_benchmark(model_config) if random_init
                        else load_clip(model_config))
    if compile_model:
        clip.model.visual = torch.compile(clip.model.visual)
    bank = synthetic_head_bank(clip.embed_dim, clip.device)
    head_specs = tuple(HeadSpec(name, WeightsSpec("synthetic")) for name in bank.names)
    stage = EmbedScore(model_config, head_specs, loader=lambda: (clip, bank))

    rng = np.random.default_rng(0)
    size = clip.image_size
    batch = {
        schema.PIXELS: rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8),
        schema.STATUS: np.full(batch_size, schema.Status.OK.value, dtype=object),
        schema.ERROR: np.full(batch_size, None, dtype=object),
    }
    for _ in range(warmup_batches):
        stage(batch)
    start = time.perf_counter()
    for _ in range(n_batches):
        stage(batch)  # returns numpy: the device work is finished when it returns
    embed_s = (time.perf_counter() - start) / n_batches

    unit = torch.nn.functional.normalize(torch.randn(batch_size, clip.embed_dim, device=clip.device), dim=-1)
    with torch.inference_mode():
        bank.score_matrix(unit)
        _synchronize(clip.device)
        start = time.perf_counter()
        for _ in range(n_batches):
            bank.score_matrix(unit)
        _synchronize(clip.device)
    heads_s = (time.perf_counter() - start) / n_batches

    return {
        "model": clip.identity,
        "device": str(clip.device),
        "precision": clip.precision,
        "compiled": compile_model,
        "threads": torch.get_num_threads(),
        "batch_size": batch_size,
        "n_batches": n_batches,
        "images_per_s": batch_size / embed_s,
        "ms_per_batch": embed_s * 1e3,
        "heads_ms_per_batch": heads_s * 1e3,
        "heads_fraction": heads_s / embed_s,
    }


_COLUMNS = (("model", "{}"), ("device", "{}"), ("precision", "{}"), ("compiled", "{}"), ("threads", "{}"),
            ("batch_size", "{}"), ("images_per_s", "{:.1f}"), ("ms_per_batch", "{:.1f}"),
            ("heads_ms_per_batch", "{:.3f}"), ("heads_fraction", "{:.2%}"))


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    header = [name for name, _ in _COLUMNS]
    return text_table(header, [[fmt.format(row[name]) for name, fmt in _COLUMNS] for row in rows])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-random")
    parser.add_argument("--pretrained", default="openai", help="open_clip tag or weights path/URI")
    parser.add_argument("--random-init", action="store_true",
                        help="the architecture with seeded random weights (benchmarks only)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--precision", nargs="+", choices=PRECISIONS,
                        help="default: fp32 on CPU, fp16 and bf16 on CUDA")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--n-batches", type=int, default=10)
    parser.add_argument("--compile", action="store_true", help="torch.compile the image tower")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    on_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    precisions = args.precision or (["fp16", "bf16"] if on_cuda else ["fp32"])
    base = ModelConfig(name=args.model, pretrained=args.pretrained, device=args.device)
    rows = [
        bench_model(dataclasses.replace(base, precision=precision), args.batch_size, args.n_batches,
                    random_init=args.random_init, compile_model=args.compile)
        for precision in precisions
    ]
    print(format_table(rows))


if __name__ == "__main__":
    main()
