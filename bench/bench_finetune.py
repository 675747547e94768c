"""Fine-tuning throughput: images/s per Ray Train worker on this machine, the planned figure per GPU, the memory
of one worker, and (``--compare``) held-out SRCC of fine-tuning against a head on the frozen embeddings.

1. The whole path on a local Ray: planted photographs (tests/training/finetune_data.py) as img2dataset shards,
   read + decode through Ray Data, the tiny architecture fine-tuned by one Ray Train worker; the worker's
   measured training images/s (decode cached) and peak RSS come from the run's per-epoch record. With
   ``--compare``, also fine-tuning against a head on the frozen embeddings, on blur/darkness and on a texture
   the frozen tower cannot see (finetune_data.build_texture), with a paired bootstrap of the difference.
2. The real architecture's step cost, no Ray: one forward + backward of ViT-L-14 (random weights, fp32, CPU)
   on a small batch, timed, with torch's FLOP counter. The planned figure per GPU is
   ``peak bf16 FLOP/s * MFU / FLOPs per image``; the assumed peak and MFU are printed with it.

    python -m bench.bench_finetune [--images 160] [--large-batch 2] [--compare]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

H200_BF16_DENSE_FLOPS = 989e12  # NVIDIA's dense bf16 tensor-core peak for H100/H200 SXM
A100_BF16_DENSE_FLOPS = 312e12
PLANNED_MFU = 0.35  # a ViT-L fine-tune with bf16 autocast and DDP typically reaches 0.3-0.45


def tiny_on_ray(images: int, compare: bool) -> None:
    from pipeline.config import ModelConfig
    from pipeline.ray_session import start_local_ray
    from pipeline.training import finetune as ft
    from pipeline.training.labels import read_labels
    from pipeline.training.schedule import parse_schedule
    from tests.training import finetune_data

    root = Path(tempfile.mkdtemp(prefix="bench-finetune-"))
    planted = finetune_data.build(root, images, 40, darkness_weight=0.5)
    start_local_ray(num_cpus=2, log_to_driver=False, configure_logging=False)
    labels = read_labels(planted.ava_path)
    config = ft.FinetuneConfig(model=ModelConfig(name="tiny-random", device="cpu"), batch_size=16, head_lr_scale=10,
                               val_fraction=0.2, test_fraction=0.2)
    schedule = parse_schedule({"stages": [
        {"optimizer": "adamw", "lr": 3e-4, "epochs": 6, "loss": ["mse", "l1", "mixed"], "loss_every": 2},
        {"optimizer": "adam", "lr": 1e-4, "epochs": 4, "loss": "mixed"},
        {"optimizer": "sgd", "lr": 1e-3, "epochs": 2, "loss": "emd"}]}, "bench")
    result = ft.finetune([planted.shards_dir], labels, str(root / "out"), config, schedule, cpus_per_worker=1,
                         cache=True)
    history = result.record["history"]
    rates = [row["images_per_s_per_worker"] for row in history[1:]]  # the first epoch warms up
    print(f"tiny-random, 1 Ray Train worker (1 CPU of 2), decode cached: {statistics.median(rates):.0f} images/s "
          f"(median of epochs 2-{len(history)}), worker peak RSS {max(r['worker_peak_rss_mb'] for r in history):.0f} MiB")
    tuned = result.record["metrics"]
    print(f"fine-tuned: val SRCC {tuned['val']['srcc']:.3f}, test SRCC {tuned['test']['srcc']:.3f} "
          f"(n={tuned['test']['n']}, best epoch {result.record['best_epoch']})")
    if compare:
        frozen = finetune_data.frozen_head(labels, config, planted.shards_dir)
        print(f"best train-head grid on the frozen tower's embeddings: val SRCC {frozen['val']:.3f}, "
              f"test SRCC {frozen['test']:.3f}")


def texture_compare(images: int) -> None:
    """Fine-tuning against the frozen-embedding head on a rule the frozen tower cannot see (the test's setup)."""
    from pipeline.config import ModelConfig
    from pipeline.training import finetune as ft
    from pipeline.training.schedule import parse_schedule
    from tests.training import finetune_data

    root = Path(tempfile.mkdtemp(prefix="bench-finetune-texture-"))
    config = ft.FinetuneConfig(model=ModelConfig(name="tiny-random", device="cpu"), batch_size=32, head_lr_scale=1,
                               val_fraction=0.2, test_fraction=0.2)
    schedule = parse_schedule({"stages": [{"optimizer": "adamw", "lr": 1e-3, "epochs": 12, "loss": "mse"}]}, "bench")
    result = finetune_data.compare_on_texture(root, images, 40, config, schedule)
    print(f"null-space texture rule ({images} images), {result.line()}")


def large_step(batch: int) -> None:
    import resource

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.config import ModelConfig
    from pipeline.models.clip import build_random_init_clip_for_benchmark

    clip = build_random_init_clip_for_benchmark(ModelConfig(name="ViT-L-14-quickgelu", precision="fp32",
                                                            device="cpu"))
    visual = clip.model.visual.train().requires_grad_(True)
    images = torch.randn(batch, 3, clip.image_size, clip.image_size)
    with FlopCounterMode(display=False) as counter:
        visual(images).float().pow(2).mean().backward()
    flops_per_image = counter.get_total_flops() / batch
    visual.zero_grad(set_to_none=True)
    started = time.perf_counter()
    visual(images).float().pow(2).mean().backward()
    seconds = time.perf_counter() - started
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"ViT-L-14 image tower, fp32 CPU ({torch.get_num_threads()} threads), batch {batch}: "
          f"{batch / seconds:.2f} images/s forward+backward, {flops_per_image / 1e9:.0f} GFLOP per image, "
          f"process peak RSS {rss:.0f} MiB")
    for name, peak in (("H200/H100", H200_BF16_DENSE_FLOPS), ("A100", A100_BF16_DENSE_FLOPS)):
        print(f"planned per {name} GPU (bf16 autocast, MFU {PLANNED_MFU:.2f}): "
              f"{peak * PLANNED_MFU / flops_per_image:.0f} images/s (tower + head; decode must keep up)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=160)
    parser.add_argument("--large-batch", type=int, default=2, help="ViT-L batch for the CPU step (0: skip)")
    parser.add_argument("--compare", action="store_true", help="also train heads on the frozen embeddings")
    args = parser.parse_args()
    tiny_on_ray(args.images, args.compare)
    if args.compare:
        texture_compare(240)
    if args.large_batch:
        large_step(args.large_batch)


if __name__ == "__main__":
    main()
