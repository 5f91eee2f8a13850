"""The build pass's queue: NPU segments are built as soon as they are written, largest first.

::

    stream: ... write s003 --add--> [ pending, by size ] --(a free slot)--> worker thread
            ... write s049 --add-->                                          -> build child
    finish(): no more segments; every slot may now run; wait for the last build

A streaming compile hands each NPU segment over as soon as its ONNX files are written, so the
toolkit builds run while the compiler still works on later layers. While segments are still
being added, one slot fewer runs (the compiler itself keeps a core busy); after ``finish`` all
``jobs`` slots run. The biggest pending build starts first. A build starts only if the memory
the running builds are estimated to take, plus its own, stays within the larger of the biggest
build's estimate and ``jobs`` typical (median) builds, and within ``budget`` (what is free); one
build always runs. So builds side by side never need more memory than the biggest one alone
would (at 430M: two layers side by side, the last layer with the head alone), however many
cores there are. A worker thread that has to wait for memory calls ``idle`` (to end a kept
child that would hold memory meanwhile). Results are reported in completion order (``done``).
"""

from __future__ import annotations

import threading
import time
from typing import Callable, List, Optional


class BuildQueue:
    def __init__(
        self,
        work: Callable,
        jobs: int,
        size: Callable,
        memory: Callable,
        budget: int,
        done: Optional[Callable] = None,
        idle: Optional[Callable] = None,
    ):
        """``work(item)`` does one build (in a worker thread) and returns its result;
        ``size(item)`` orders the pending items (largest first); ``memory(item)`` is its
        estimated peak; ``done(item, result, i, n, eta)`` is called after each (under a lock:
        one at a time; n is the number of items added so far, eta '' while more may come)."""
        self.work, self.size, self.memory, self.budget, self.done = work, size, memory, budget, done
        self.idle = idle
        self.needs: List[int] = []  # the estimated memory of every item added
        self.jobs = max(1, jobs)
        self.feeding = True  # more items may come (until finish): one slot fewer
        self.pending: List = []
        self.running: dict = {}  # item id -> estimated memory
        self.added = self.finished = 0
        self.error: Optional[BaseException] = None
        self.stopped = False
        self.cond = threading.Condition()
        self.report_lock = threading.Lock()
        self.t0 = time.monotonic()
        self.threads = [
            threading.Thread(target=self._worker, daemon=True, name=f"build-{k}") for k in range(self.jobs)
        ]
        for t in self.threads:
            t.start()

    def add(self, item) -> None:
        """Queue one build; raises the first worker error (``--strict``) if there was one."""
        with self.cond:
            self._raise()
            self.pending.append(item)
            self.needs.append(self.memory(item))
            self.added += 1
            self.cond.notify_all()

    def finish(self) -> None:
        """No more items: run every slot, wait until all are built; re-raise a worker's error."""
        with self.cond:
            self.feeding = False
            self.cond.notify_all()
        for t in self.threads:
            t.join()
        self._raise()

    def stop(self) -> None:
        """Drop what has not started and let the workers end (the caller kills running builds)."""
        with self.cond:
            self.stopped = True
            self.pending.clear()
            self.cond.notify_all()

    def close(self) -> None:
        self.stop()
        for t in self.threads:
            t.join()

    # ------------------------------------------------------------------------ workers

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def _slots(self) -> int:
        return max(1, self.jobs - 1) if self.feeding else self.jobs

    def _fits(self, item) -> bool:
        if not self.running:
            return True
        needs = sorted(self.needs)
        limit = min(self.budget, max(needs[-1], self.jobs * needs[len(needs) // 2]))
        return sum(self.running.values()) + self.memory(item) <= limit

    def _next(self):
        """The largest pending item once it may start; None when there is nothing more to do."""
        with self.cond:
            while True:
                if self.stopped or self.error is not None:
                    return None
                if self.pending and len(self.running) < self._slots():
                    item = max(self.pending, key=self.size)
                    if self._fits(item):
                        self.pending.remove(item)
                        self.running[id(item)] = self.memory(item)
                        return item
                    if self.idle:  # waiting for memory: hold none meanwhile
                        self.cond.release()
                        try:
                            self.idle()
                        finally:
                            self.cond.acquire()
                elif not self.pending and not self.feeding:
                    return None
                self.cond.wait(0.5)

    def _worker(self) -> None:
        while True:
            item = self._next()
            if item is None:
                return
            try:
                result = self.work(item)
            except BaseException as e:  # noqa: BLE001 - handed to the caller in add/finish
                with self.cond:
                    self.error = self.error or e
                    self.running.pop(id(item), None)
                    self.cond.notify_all()
                return
            with self.cond:
                self.running.pop(id(item), None)
                self.finished += 1
                i, n, feeding = self.finished, self.added, self.feeding
                self.cond.notify_all()
            if self.done:
                with self.report_lock:
                    self.done(item, result, i, n, "" if feeding else self._eta(i, n))

    def _eta(self, i: int, n: int) -> str:
        """' (eta 1:23)' from the time per build so far; '' when all are done."""
        left = n - i
        if not left or not i:
            return ""
        secs = int((time.monotonic() - self.t0) / i * left)
        return f" (eta {secs // 60}:{secs % 60:02d})"
