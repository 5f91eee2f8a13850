"""The build queue: largest first, one slot fewer while segments are still added, a memory
budget, every item reported once, a worker's error handed to the caller. Plain Python work
functions stand in for builds here (the queue does not know what a build is); the real builds
through it are in rknn/test_build.py and compiler/test_stream.py."""

import threading
import time

import pytest

from rwkv2rknn.rknn.build_queue import BuildQueue


class Recorder:
    def __init__(self, hold=0.05):
        self.lock = threading.Lock()
        self.started, self.done, self.overlap, self.now = [], [], 0, 0
        self.hold = hold

    def work(self, item):
        with self.lock:
            self.started.append(item)
            self.now += 1
            self.overlap = max(self.overlap, self.now)
        time.sleep(self.hold)
        with self.lock:
            self.now -= 1
        return f"built {item}"

    def report(self, item, result, i, n, eta):
        self.done.append((item, result, i, n))


def test_largest_pending_build_starts_first():
    rec = Recorder()
    q = BuildQueue(rec.work, 1, size=lambda x: x, memory=lambda x: 1, budget=10, done=rec.report)
    for item in (3, 50, 7, 20):
        q.add(item)
    q.finish()
    # the first item may start before the others are added; the rest go largest first
    assert rec.started[1:] == sorted(rec.started[1:], reverse=True)
    assert sorted(rec.started) == [3, 7, 20, 50]
    assert [d[2] for d in rec.done] == [1, 2, 3, 4] and all(d[3] == 4 for d in rec.done)


def wait_for(cond, timeout=10.0):
    end = time.monotonic() + timeout
    while not cond() and time.monotonic() < end:
        time.sleep(0.01)
    return cond()


def test_one_slot_fewer_while_segments_are_still_added():
    go = threading.Event()
    rec = Recorder(hold=0)
    q = BuildQueue(lambda x: (go.wait(10), rec.work(x)), 2, size=lambda x: x, memory=lambda x: 1, budget=10)
    for item in range(4):
        q.add(item)
    assert wait_for(lambda: len(q.running) == 1)
    time.sleep(0.2)
    assert len(q.running) == 1  # the compiler itself is busy on the other core
    finisher = threading.Thread(target=q.finish)
    finisher.start()
    assert wait_for(lambda: len(q.running) == 2)  # no more segments: both slots
    go.set()
    finisher.join(10)
    assert len(rec.started) == 4


def test_builds_that_do_not_fit_in_memory_run_one_at_a_time():
    rec = Recorder()
    q = BuildQueue(rec.work, 3, size=lambda x: x, memory=lambda x: 6, budget=10)
    for item in range(4):
        q.add(item)
    q.finish()
    assert rec.overlap == 1 and len(rec.started) == 4  # never zero: one always runs


def test_side_by_side_never_more_memory_than_the_biggest_build_alone():
    """Small builds (3) run in pairs; the big one (10) runs alone; a thread that waits for
    memory lets its kept child go."""
    lock, running, seen, idles = threading.Lock(), set(), [], []

    def work(item):
        with lock:
            running.add(item)
            seen.append(frozenset(running))
        time.sleep(0.05)
        with lock:
            running.discard(item)

    q = BuildQueue(
        work,
        2,
        size=lambda x: 10 if x == "big" else 3,
        memory=lambda x: 10 if x == "big" else 3,
        budget=100,
        idle=lambda: idles.append(threading.current_thread().name),
    )
    for item in ["a", "b", "c", "big", "d", "e", "f"]:
        q.add(item)
    q.finish()
    assert {"big"} in seen and not any("big" in s and len(s) > 1 for s in seen)
    assert any(len(s) == 2 for s in seen)  # the small ones do run side by side
    assert idles  # the big build waited for the running pair at least once


def test_a_workers_error_reaches_the_caller_and_stops_the_rest():
    def work(item):
        if item == 2:
            raise RuntimeError("segment 2 refused")
        time.sleep(0.02)
        return item

    q = BuildQueue(work, 1, size=lambda x: -x, memory=lambda x: 1, budget=10)
    for item in range(6):
        q.add(item)
    with pytest.raises(RuntimeError, match="segment 2 refused"):
        q.finish()
    with pytest.raises(RuntimeError, match="segment 2 refused"):
        q.add(7)
