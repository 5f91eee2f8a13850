"""--busy: the busy loops start, spin, and are gone after the block (or when their parent is)."""

import os
import subprocess
import sys
import time

from rwkv2rknn.tools.busy import BusyLoops, describe_load, load_average


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is not alive
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def _cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def test_busy_loops_spin_and_stop():
    with BusyLoops(2) as loops:
        pids = loops.pids
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        time.sleep(0.5)
        assert all(_cpu_ticks(p) > 0 for p in pids)  # they spin
    assert loops.pids == []
    assert not any(os.path.exists(f"/proc/{p}") and _alive(p) for p in pids)


def test_zero_loops_start_nothing():
    with BusyLoops(0) as loops:
        assert loops.pids == []


def test_a_busy_loop_stops_when_its_parent_dies():
    # a parent that starts one loop and is killed without stopping it
    code = (
        "import sys, time; from rwkv2rknn.tools.busy import BusyLoops; "
        "b = BusyLoops(1).start(); print(b.pids[0], flush=True); time.sleep(60)"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    assert _alive(child)
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and os.path.exists(f"/proc/{child}") and _alive(child):
        time.sleep(0.1)
    assert not (os.path.exists(f"/proc/{child}") and _alive(child))


def test_a_busy_loop_stops_after_its_time_limit():
    loops = BusyLoops(1, limit_s=0.2).start()
    proc = loops.procs[0]
    assert proc.wait(timeout=20) == 0
    loops.stop()


def test_load_average_is_three_numbers():
    load = load_average()
    assert load is not None and len(load) == 3 and all(x >= 0 for x in load)
    assert describe_load(load).endswith("(1/5/15 min)")
    assert describe_load(None) == "unknown"
