"""The driver's side of a run: how it starts Ray when no cluster is given."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# In a fresh interpreter: this session may hold a Ray of its own already.
_LISTENING = """
import json, psutil, ray
from pipeline.ray_session import ensure_ray
ensure_ray()
assert ray.get(ray.remote(lambda: 1 + 1).remote()) == 2  # a worker started and answered
ours = {p.pid for p in psutil.Process().children(recursive=True)}
print(json.dumps(sorted({f"{c.laddr.ip} ({psutil.Process(c.pid).name()})"
                         for c in psutil.net_connections("inet") if c.status == "LISTEN" and c.pid in ours})))
ray.shutdown()
"""


@pytest.mark.integration
def test_a_local_run_serves_every_ray_port_on_loopback_only():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    result = subprocess.run([sys.executable, "-c", _LISTENING], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    listening = json.loads(result.stdout.strip().splitlines()[-1])
    assert any("gcs_server" in entry for entry in listening) and any("raylet" in entry for entry in listening)
    assert all(entry.startswith(("127.0.0.1 ", "::ffff:127.0.0.1 ")) for entry in listening), listening
