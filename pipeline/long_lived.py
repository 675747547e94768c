"""Create what lives as long as the process (torch, open_clip, a loaded model) out of the collector's way.

Importing torch and open_clip creates hundreds of thousands of objects that are never freed, and
loading a model adds more. While they are being created, the cyclic collector's full pass over everything
runs again and again, a large share of an embed actor's start; afterwards each full pass still walks all
of them. So such blocks run with the collector paused, and what they created is then frozen (``gc.freeze``): not walked
again until the process exits.

Used where a process first imports torch (the embed stage in actors, the model loader in the driver,
the decode stage's lazy import in task workers), for open_clip's first import, and around an embed
actor's model load.
"""

from __future__ import annotations

import atexit
import functools
import gc
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def long_lived() -> Iterator[None]:
    """Run the block with the collector paused, then freeze every object made so far.

    Garbage already in the process is frozen with the rest and stays until the process exits, so use it
    once per process or per model, early, never on a hot path."""
    _unfreeze_at_exit()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()


@functools.cache
def _unfreeze_at_exit() -> None:
    # Frozen objects are not freed even at exit, and extension modules that count their live objects then
    # (nanobind's, in triton) print them as leaks. Handed back to the collector, they are freed as before.
    atexit.register(gc.unfreeze)
