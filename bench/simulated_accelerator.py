"""A stand-in for a GPU's image tower, for benchmarks only: a fixed time per image, with the CPU released.

:func:`simulated_loader` is an ``embed_loader`` for :func:`pipeline.runner.run_score` (the stage's loader
seam; nothing on the command line can select it). The embed actor it builds keeps the tiny model's
geometry (input size, mean and std: decode does the real work) and the real heads, but its
``encode_image`` sleeps ``images / rate`` seconds per batch, as a host thread waits on a GPU kernel, and
returns fixed unit vectors. Each call appends ``start end images`` (perf_counter seconds of the actor's
process; one actor, so one clock) to a log file, from which :func:`accelerator_use` says how much of the
time the accelerator was busy and how long it waited for input between batches.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from pipeline.config import HeadSpec, ModelConfig


class SimulatedTower(torch.nn.Module):
    def __init__(self, images_per_second: float, embed_dim: int, log_path: str):
        super().__init__()
        self.seconds_per_image = 1.0 / images_per_second  # inf: no time at all (what the CPU side can feed)
        self.embed_dim = embed_dim
        self.log_path = log_path
        generator = torch.Generator().manual_seed(0)
        self.vector = torch.randn(embed_dim, generator=generator)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        time.sleep(len(images) * self.seconds_per_image)
        end = time.perf_counter()
        with open(self.log_path, "a") as log:
            log.write(f"{start:.6f} {end:.6f} {len(images)}\n")
        return self.vector.expand(len(images), self.embed_dim).clone()


def simulated_loader(model: ModelConfig, heads: Sequence[HeadSpec], search_dirs: Sequence[str],
                     images_per_second: float, log_path: str) -> Any:
    """(LoadedClip, HeadBank) whose model is a :class:`SimulatedTower` at ``images_per_second``."""
    from pipeline.stages.embed import load_clip_and_heads

    clip, bank = load_clip_and_heads(model, heads, search_dirs)
    tower = SimulatedTower(images_per_second, clip.embed_dim, log_path)
    return dataclasses.replace(clip, model=tower, identity=f"simulated({images_per_second:g}/s)"), bank


@dataclass(frozen=True)
class AcceleratorUse:
    batches: int
    images: int
    busy_fraction: float  # busy time over the span from the first batch's start to the last one's end
    span_s: float
    starved_batches: int  # batches that began more than STARVED_S after the previous one ended
    mean_wait_ms: float  # mean gap between one batch's end and the next one's start
    p95_wait_ms: float


STARVED_S = 0.005  # longer than the stage's own work between two model calls when a batch is ready


def accelerator_use(log_path: str) -> AcceleratorUse:
    rows = np.loadtxt(log_path, ndmin=2) if os.path.getsize(log_path) else np.zeros((0, 3))
    rows = rows[np.argsort(rows[:, 0])]
    starts, ends, images = rows[:, 0], rows[:, 1], rows[:, 2]
    span = float(ends[-1] - starts[0]) if len(rows) else 0.0
    waits = starts[1:] - ends[:-1]
    return AcceleratorUse(
        batches=len(rows), images=int(images.sum()),
        busy_fraction=float((ends - starts).sum() / span) if span else 0.0, span_s=span,
        starved_batches=int((waits > STARVED_S).sum()),
        mean_wait_ms=float(waits.mean() * 1e3) if len(waits) else 0.0,
        p95_wait_ms=float(np.percentile(waits, 95) * 1e3) if len(waits) else 0.0)
