"""The build cache trusts an entry only after its recorded checksum matches."""

import hashlib
import threading
import time

import pytest

from rwkv2rknn.rknn.buildcache import BuildCache


def _put(cache, key, data):
    with open(cache.entry(key), "wb") as f:
        f.write(data)
    return cache.record(key)


def test_a_whole_entry_is_copied_with_its_checksum(tmp_path):
    cache = BuildCache(str(tmp_path / "c"))
    data = bytes(range(256)) * 40
    digest = _put(cache, "k", data)
    assert digest == hashlib.sha256(data).hexdigest()
    dest = tmp_path / "out.rknn"
    assert cache.copy_to("k", str(dest)) == (digest, "")
    assert dest.read_bytes() == data


def test_an_entry_cut_short_is_removed_and_not_copied(tmp_path):
    cache = BuildCache(str(tmp_path / "c"))
    _put(cache, "k", b"x" * 5000)
    with open(cache.entry("k"), "r+b") as f:
        f.truncate(1000)
    dest = tmp_path / "out.rknn"
    assert cache.copy_to("k", str(dest)) == ("", "failed its checksum")
    assert not dest.exists()
    assert not (tmp_path / "c" / "k.rknn").exists() and not (tmp_path / "c" / "k.sha256").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("out.rknn")]  # no temp left


def test_an_entry_without_a_checksum_is_not_trusted(tmp_path):
    cache = BuildCache(str(tmp_path / "c"))
    (tmp_path / "c" / "k.rknn").write_bytes(b"from an older cache")
    assert cache.copy_to("k", str(tmp_path / "o")) == ("", "no recorded checksum")
    assert cache.copy_to("k", str(tmp_path / "o")) == ("", "")  # now simply missing


@pytest.mark.slow
def test_the_lock_makes_holders_take_turns(tmp_path):
    cache = BuildCache(str(tmp_path / "c"))
    inside, overlaps = [], []

    def work():
        with cache.locked("k"):
            if inside:
                overlaps.append(1)
            inside.append(1)
            time.sleep(0.3)
            inside.pop()

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not overlaps


_HOLD = """
import sys
from rwkv2rknn.rknn.buildcache import BuildCache
with BuildCache(sys.argv[1]).locked("k"):
    print("held", flush=True)
    sys.stdin.readline()
"""

_TRY = """
import sys
from rwkv2rknn.rknn.buildcache import BuildCache
try:
    with BuildCache(sys.argv[1]).locked("k", lambda: True):
        print("got")
except InterruptedError:
    print("busy")
"""


def test_two_processes_take_turns_on_a_key(tmp_path):
    """A second process cannot take a key another process holds, and takes it once it is let go
    (real processes; each step waits for the event it needs, not for a time)."""
    import subprocess
    import sys

    folder = str(tmp_path / "c")

    def attempt():
        return subprocess.run(
            [sys.executable, "-c", _TRY, folder], capture_output=True, text=True, timeout=120
        ).stdout.strip()

    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, folder], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert attempt() == "busy"
        assert attempt() == "busy"
        holder.stdin.close()  # the holder lets go and ends
        assert holder.wait(timeout=120) == 0
    finally:
        holder.kill()
        holder.wait()
    assert attempt() == "got"
