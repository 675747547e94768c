"""The driver's Ray: the cluster in RAY_ADDRESS (or at an address given), or a local one that listens on
127.0.0.1 only."""

from __future__ import annotations

import os
from typing import Any

import ray


def ensure_ray() -> None:
    """Join the cluster in RAY_ADDRESS, or start a local Ray that listens on 127.0.0.1 only."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        start_local_ray(log_to_driver=True)


def connect_ray(ray_address: str | None) -> None:
    """The cluster at ``ray_address``, or the job's usual choice (RAY_ADDRESS, else a loopback-only local Ray)."""
    if ray.is_initialized():
        return
    if ray_address:
        ray.init(address=ray_address, log_to_driver=False)
    else:
        ensure_ray()


def start_local_ray(**init_kwargs: Any) -> None:
    """A single-node Ray whose every server listens on 127.0.0.1, with token auth (Ray's default).

    Ray replaces a node address of 127.0.0.1 with the machine's network address and serves its
    GCS, raylet and worker gRPC ports there, open to the network. With Ray's multi-node mode off (its
    default on macOS and Windows) the node address stays the loopback one and every server binds to
    it; nothing joins a local run, so nothing is lost."""
    from ray._private import ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # for the processes ray.init starts
    ray_constants.ENABLE_RAY_CLUSTER = False  # read once at import, so this process needs it set too
    ray.init(include_dashboard=False, **init_kwargs)
