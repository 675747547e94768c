"""pipeline.long_lived: a block runs with the cyclic collector paused, and what it made is frozen after."""

from __future__ import annotations

import gc

import pytest

from pipeline.long_lived import long_lived


def test_the_block_runs_without_the_collector_and_what_it_made_is_frozen():
    frozen_before = gc.get_freeze_count()
    with long_lived():
        assert not gc.isenabled()
        made = [[] for _ in range(1000)]
    assert gc.isenabled()
    assert gc.get_freeze_count() >= frozen_before + len(made)
    assert not any(obj is made[0] for obj in gc.get_objects())  # the collector no longer walks it


def test_the_collector_is_restored_when_the_block_fails():
    with pytest.raises(ValueError):
        with long_lived():
            raise ValueError("import failed")
    assert gc.isenabled()


def test_a_collector_paused_by_the_caller_stays_paused():
    gc.disable()
    try:
        with long_lived():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
