import os
import socket
import subprocess
import sys
import time

import pytest

from pipeline.io.lease import Lease, LeaseHeld
from pipeline.io.storage import filesystem, write_json_atomic


def test_a_second_run_cannot_take_a_live_lease(tmp_path):
    with Lease(str(tmp_path), "run-a", settle_s=0):
        with pytest.raises(LeaseHeld, match="run-a"):
            Lease(str(tmp_path), "run-b", settle_s=0).acquire()
    with Lease(str(tmp_path), "run-b", settle_s=0):  # released: free again
        pass


def _plant(tmp_path, **lease):
    fs, root = filesystem(str(tmp_path))
    write_json_atomic(fs, root + "/_lock.json", {"run_id": "old", "host": socket.gethostname(), "pid": os.getpid(),
                                                 "expires_at": time.time() + 600, **lease})


def test_an_expired_lease_is_taken_over(tmp_path):
    _plant(tmp_path, host="elsewhere", expires_at=time.time() - 1)
    with Lease(str(tmp_path), "new", settle_s=0):
        pass


def test_a_lease_of_a_dead_process_on_this_host_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _plant(tmp_path, pid=dead.pid)
    with Lease(str(tmp_path), "new", settle_s=0):
        pass


def test_a_live_holder_on_another_host_is_respected_until_expiry(tmp_path):
    _plant(tmp_path, host="elsewhere", pid=1)
    with pytest.raises(LeaseHeld):
        Lease(str(tmp_path), "new", settle_s=0).acquire()
