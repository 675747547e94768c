"""A lease on the output prefix, so two runs never work on the same units at once.

Object stores offer no lock, so the lease is an object with an expiry that its holder renews:
write it, wait a moment, read it back; whoever's lease is read back holds it (S3 reads are strongly
consistent, so two racing writers both see the last write). A dead run's lease simply expires.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any, Mapping

from pipeline.errors import BusyError
from pipeline.io import layout
from pipeline.io.storage import filesystem, join, read_json, write_json_atomic

log = logging.getLogger(__name__)


class LeaseHeld(BusyError):
    """Another live run holds the output prefix."""


class Lease:
    def __init__(self, output: str, run_id: str, ttl_s: float = 300.0, settle_s: float = 0.5,
                 storage_options: Mapping[str, Any] | None = None):
        self.fs, root = filesystem(output, storage_options)
        self.path = join(root, layout.LOCK)
        self.run_id = run_id
        self.ttl_s = ttl_s
        self.settle_s = settle_s
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _current(self) -> dict[str, Any] | None:
        try:
            return read_json(self.fs, self.path)
        except FileNotFoundError:
            return None

    def _write(self) -> None:
        write_json_atomic(self.fs, self.path, {
            "run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(),
            "expires_at": time.time() + self.ttl_s,
        })

    @staticmethod
    def _holder_is_dead(held: Mapping[str, Any]) -> bool:
        """A holder on this very host whose process is gone: its lease need not run out first."""
        if held.get("host") != socket.gethostname():
            return False
        try:
            os.kill(int(held.get("pid", -1)), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, ValueError):
            return False
        return False

    def acquire(self) -> "Lease":
        held = self._current()
        if held and held.get("run_id") != self.run_id and held.get("expires_at", 0) > time.time() \
                and not self._holder_is_dead(held):
            raise LeaseHeld(f"another run is active, nothing done: run {held['run_id']} on {held.get('host')} "
                            f"(pid {held.get('pid')}) holds {self.path} until {time.ctime(held['expires_at'])}; "
                            f"it expires on its own if that run died")
        self._write()
        time.sleep(self.settle_s)
        held = self._current()
        if not held or held.get("run_id") != self.run_id:
            raise LeaseHeld(f"another run is active, nothing done: run {held and held.get('run_id')} took "
                            f"{self.path} at the same moment")
        self._renewer = threading.Thread(target=self._renew, name="lease-renewer", daemon=True)
        self._renewer.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self._write()
            except Exception:  # a missed renewal is survivable; the next one may succeed
                log.warning("could not renew the lease %s", self.path, exc_info=True)

    def release(self) -> None:
        self._stop.set()
        if self._renewer:
            self._renewer.join(timeout=5)
        held = self._current()
        if held and held.get("run_id") == self.run_id:
            self.fs.rm(self.path)

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
