"""The build cache trusts an entry only after its recorded checksum matches."""

import hashlib
import threading
import time

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
