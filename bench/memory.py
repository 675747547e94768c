"""Peak memory and CPU time of a job's processes, sampled from a process of its own.

Every ``interval`` s: RSS of the measured process + every Ray worker process (``ray::*`` but Ray's per-node
agents); the agents, raylet and GCS are summed on the side. Ray's processes are the measured process's
descendants, since ray.init() started the local cluster from there.

The sampler runs in its own process because a sampling thread in the measured one competed with it:
psutil parses /proc in Python, holding the GIL that the Ray driver's scheduling loop needs, and its CPU
was the driver's. An 80-shard Ray run took 1.7-2.6 s (8-12%) longer with that thread than without it,
and 0.6-0.9 s longer with this process. PSS is read only every ``pss_every``-th sample (2 s): it needs
/proc/PID/smaps, 3-4 ms of CPU per process that has torch loaded; RSS costs next to nothing.
"""

from __future__ import annotations

import multiprocessing
import os
from typing import Any

RAY_AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")  # per-node daemons, named like workers


class MemorySampler:
    """``with MemorySampler() as sampler: run()``, then ``sampler.result()``: peaks and CPU seconds."""

    def __init__(self, interval: float = 0.2, driver_only: bool = False, pss_every: int = 10):
        self._args = (os.getpid(), interval, driver_only, pss_every)
        self._result: dict[str, Any] | None = None

    def __enter__(self) -> "MemorySampler":
        context = multiprocessing.get_context("spawn")
        self._conn, child_conn = context.Pipe()
        self._process = context.Process(target=_watch, args=(*self._args, child_conn), daemon=True)
        self._process.start()
        self._conn.recv()  # its first sample is taken: CPU times count from here
        return self

    def __exit__(self, *exc: Any) -> None:
        self._conn.send("stop")
        self._result = self._conn.recv()
        self._process.join()

    def result(self) -> dict[str, Any]:
        if self._result is None:
            raise RuntimeError("the sampler has not run")
        return self._result


class _Watch:
    def __init__(self, pid: int, driver_only: bool, pss_every: int):
        import psutil

        self.psutil = psutil
        self.driver = psutil.Process(pid)
        self.driver_only = driver_only
        self.pss_every = pss_every
        self.peak_rss = self.peak_pss = self.peak_daemons_rss = self.peak_workers = 0
        self.samples = 0
        self.cpu: dict[int, tuple[str, float]] = {}  # pid -> (kind, CPU seconds so far)
        self.cpu_start: dict[int, float] = {}

    def sample(self) -> None:
        rss = pss = daemons = workers = 0
        with_pss = self.samples % self.pss_every == 0
        self.samples += 1
        procs = [self.driver] if self.driver_only else [self.driver] + [
            child for child in self.driver.children(recursive=True) if child.pid != os.getpid()]  # not itself
        for proc in procs:
            try:
                title = proc.cmdline()[:1] if proc is not self.driver else ["driver"]
                info = proc.memory_full_info() if with_pss else proc.memory_info()
                cpu = proc.cpu_times()
            except (self.psutil.NoSuchProcess, self.psutil.AccessDenied, self.psutil.ZombieProcess):
                continue
            is_job = proc is self.driver or (
                bool(title) and title[0].startswith("ray::") and not title[0].startswith(RAY_AGENTS))
            kind = "driver" if proc is self.driver else ("workers" if is_job else "daemons")
            self.cpu[proc.pid] = (kind, cpu.user + cpu.system)
            if is_job:
                rss += info.rss
                pss += getattr(info, "pss", 0)
                workers += proc is not self.driver
            else:
                daemons += info.rss
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_pss = max(self.peak_pss, pss)
        self.peak_daemons_rss = max(self.peak_daemons_rss, daemons)
        self.peak_workers = max(self.peak_workers, workers)

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds (user + system) each kind of process spent since the first sample, as last sampled
        (a worker that ended between two samples loses at most its last ``interval``)."""
        spent = {"driver": 0.0, "workers": 0.0, "daemons": 0.0}
        for pid, (kind, seconds) in self.cpu.items():
            spent[kind] += seconds - self.cpu_start.get(pid, 0.0)
        return {kind: round(value, 1) for kind, value in spent.items()}

    def result(self) -> dict[str, Any]:
        return {"peak_rss": self.peak_rss, "peak_pss": self.peak_pss, "daemons_rss": self.peak_daemons_rss,
                "workers": self.peak_workers, "cpu_s": self.cpu_seconds()}


def _watch(pid: int, interval: float, driver_only: bool, pss_every: int, conn: Any) -> None:
    watch = _Watch(pid, driver_only, pss_every)
    watch.sample()
    watch.cpu_start = {pid: seconds for pid, (_, seconds) in watch.cpu.items()}
    conn.send("ready")
    while not conn.poll(interval):
        watch.sample()
    conn.recv()
    watch.sample()
    conn.send(watch.result())
