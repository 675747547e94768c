"""The stateless CPU stages as the plain functions Ray Data runs in its tasks.

Ray pickles a function by reference, so a task worker imports the function's module. Keeping these
out of graph.py (which imports the embed stage, hence torch and open_clip) keeps the task workers from
loading open_clip and the model. Decoding loads torch (hundreds of MiB) for its resize kernel, on the first
image it resizes; a worker that only reads or stages never does.
"""

from __future__ import annotations

import functools
from typing import Any, Iterator, Mapping

from pipeline.config import DecodeConfig
from pipeline.exclusions import Exclusions
from pipeline.io.writer import WriteStaging
from pipeline.stages.decode import Decode
from pipeline.stages.read import ReadItems


def read_items(batch: Mapping[str, Any], source: str, options: Any, storage_options: Mapping[str, Any],
               rows_per_batch: int, exclusions: Exclusions | None = None) -> Iterator:
    yield from ReadItems(source, options, storage_options, rows_per_batch, exclusions)(batch)


@functools.lru_cache(maxsize=4)
def _decoder(decode_config: DecodeConfig, image_size: int, interpolation: str) -> Decode:
    # Task workers are reused, so the decoder (and its resampling filter) is built once per worker.
    return Decode(decode_config, image_size=image_size, interpolation=interpolation)


def decode_images(batch: dict, decode_config: DecodeConfig, image_size: int, interpolation: str) -> dict:
    return _decoder(decode_config, image_size, interpolation)(batch)


def stage_rows(batch: dict, output: str, run_id: str, storage_options: Mapping[str, Any]) -> dict:
    return WriteStaging(output, run_id, storage_options)(batch)
