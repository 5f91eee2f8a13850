"""Load on purpose: busy-loop processes beside a benchmark, and the load average around it.

A shared machine is rarely idle, and an executor that is fast only on an idle one is not fast.
``BusyLoops(n)`` starts ``n`` child processes that each spin one core until they are stopped;
each also stops by itself when its parent is gone or after ``limit_s`` seconds, so a killed
benchmark never leaves them behind.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from typing import List, Optional, Tuple

log = logging.getLogger(__name__)

# the child: spin; every ~50 ms of work look whether the parent is still there and the time is up
_LOOP = """
import os, sys, time
parent, deadline = int(sys.argv[1]), time.monotonic() + float(sys.argv[2])
x = 0
while True:
    for i in range(200000):
        x ^= i
    if os.getppid() != parent or time.monotonic() > deadline:
        break
"""

BUSY_LIMIT_S = 3600.0  # no busy loop outlives an hour, whatever happens to its parent


def load_average() -> Optional[Tuple[float, float, float]]:
    """The 1, 5 and 15 minute load averages, or None where the system has none."""
    try:
        return tuple(float(x) for x in os.getloadavg())
    except (OSError, AttributeError):
        return None


def describe_load(load) -> str:
    return "unknown" if load is None else " / ".join(f"{x:.2f}" for x in load) + " (1/5/15 min)"


class BusyLoops:
    """``with BusyLoops(n):`` n single-core busy loops run while the block runs."""

    def __init__(self, n: int, limit_s: float = BUSY_LIMIT_S):
        if n < 0:
            raise ValueError("the number of busy loops is at least 0")
        self.n, self.limit_s = n, limit_s
        self.procs: List[subprocess.Popen] = []

    @property
    def pids(self) -> List[int]:
        return [p.pid for p in self.procs]

    def start(self) -> "BusyLoops":
        for _ in range(self.n):
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", _LOOP, str(os.getpid()), str(self.limit_s)],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        if self.n:
            log.info("started %d busy loops (pids %s)", self.n, self.pids)
        return self

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            p.wait()
        self.procs = []

    def __enter__(self) -> "BusyLoops":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
