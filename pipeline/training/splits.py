"""Held-out splits by a seeded hash of each key: an image stays in its split as labels are added. Torch-free, so
the Ray Data tasks that split rows for :mod:`pipeline.training.distributed` need not import torch."""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

TRAIN, VALIDATION, TEST = 0, 1, 2
SPLIT_NAMES = {TRAIN: "train", VALIDATION: "val", TEST: "test"}


def split_assignments(keys: Sequence[str], val_fraction: float, test_fraction: float, seed: int = 0) -> np.ndarray:
    """TRAIN / VALIDATION / TEST per key, from a seeded hash of the key (stable as the label set grows)."""
    def uniform(key: str) -> float:
        digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2.0 ** 64

    draws = np.fromiter((uniform(str(k)) for k in keys), dtype=np.float64, count=len(keys))
    split = np.full(len(keys), TRAIN, dtype=np.int8)
    split[draws < val_fraction + test_fraction] = TEST
    split[draws < val_fraction] = VALIDATION
    return split
