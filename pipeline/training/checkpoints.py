"""A Ray Train checkpoint as both trainers keep one: a torch state dict in one file of a folder.

Every worker reports each epoch (Ray Train waits for all of them); only the worker that passes a state
writes a checkpoint, so rank 0 alone pays for it.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Mapping


def report(metrics: Mapping[str, Any], state: Mapping[str, Any] | None, file_name: str) -> None:
    """``ray.train.report`` of ``metrics``, with ``state`` saved as the checkpoint when it is given."""
    import ray.train
    import torch

    if state is None:
        ray.train.report(dict(metrics), checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as folder:
        torch.save(dict(state), os.path.join(folder, file_name))
        ray.train.report(dict(metrics), checkpoint=ray.train.Checkpoint.from_directory(folder))


def load(checkpoint: Any, file_name: str) -> dict[str, Any]:
    """The state a checkpoint of :func:`report` holds, on the CPU."""
    import torch

    with checkpoint.as_directory() as folder:
        return torch.load(os.path.join(folder, file_name), map_location="cpu", weights_only=True)
