"""A driver killed as ``kill -9`` (or a lost head node) kills it, for the resume tests."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

REPO = Path(__file__).resolve().parents[1]


def kill_when(command: Sequence[str], log_path: Path, ready: Callable[[], bool],
              env: Mapping[str, str] | None = None, timeout_s: float = 300) -> None:
    """Start ``command``, a driver that starts a local Ray of its own, in a session of its own; SIGKILL it once
    ``ready()`` holds, then whatever of its Ray outlived it. Fails when the driver ends before that."""
    environment = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    environment.update(env or {})
    with open(log_path, "wb") as log:
        driver = subprocess.Popen(command, cwd=REPO, env=environment, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    deadline = time.time() + timeout_s
    try:
        while time.time() < deadline and driver.poll() is None and not ready():
            time.sleep(0.1)
        assert driver.poll() is None, "the run ended before it could be killed: " + log_path.read_text()[-2000:]
        os.kill(driver.pid, signal.SIGKILL)  # the driver only; its Ray is left to notice on its own
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            driver.kill()
        time.sleep(1)
        try:
            os.killpg(driver.pid, signal.SIGKILL)  # whatever of the local Ray outlived its driver
        except ProcessLookupError:
            pass
