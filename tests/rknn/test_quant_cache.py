"""Quantised builds go through the checked, locked build cache as fp16 builds do: two w8a8
compiles sharing a cache take turns on each entry (one builds it, the other finds it whole), and
a damaged entry (its .rknn cut short, or its accuracy record unreadable) is found and built again.
Real compiles in real processes (rknn-toolkit2's quantiser and simulator; 1 layer, width 32)."""

import json
import os
import re

import pytest
from helpers import npu_segments_whole, start_cached_compile

from rwkv2rknn.artifact.plan import sha256_file

pytestmark = pytest.mark.slow

# --quant-min-cos -1: every quantised build is used, so every entry is copied into the artifact
QUANT = ("--quant", "w8a8", "--calib-tokens", "32", "--prefill-rows", "4", "--quant-min-cos", "-1")


def _start(model, out, cache):
    return start_cached_compile(model, out, cache, *QUANT, merge_output=True)


def _statuses(output):
    """{segment: how its w8a8 build was had ('built', 'cached' or 'rebuilt (...)')}."""
    got = {}
    for m in re.finditer(
        r"\[\d+/\d+\] (\S+): w8a8 \(cos [-\d.]+\), (built|cached|rebuilt \([^)]*\))", output
    ):
        got[m.group(1)] = m.group(2)
    return got


def _npu(art):
    npu = npu_segments_whole(art)
    for s in npu:
        assert s["precision"] == "w8a8", s["name"]
    return npu


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from helpers import random_model

    return random_model(tmp_path_factory, "qm", fp32=True, layers=1, width=32, vocab=256, seed=7)


@pytest.fixture(scope="module")
def at_once(model, tmp_path_factory):
    """Two w8a8 compiles of one model started together on one fresh cache."""
    work = tmp_path_factory.mktemp("q-at-once")
    cache = work / "cache"
    outs = [work / "a", work / "b"]
    procs = [_start(model, o, cache) for o in outs]
    results = [(p.communicate(timeout=1200)[0], p.returncode) for p in procs]
    return work, cache, outs, results


def test_two_w8a8_compiles_take_turns_on_each_cache_entry(at_once):
    _, _, outs, results = at_once
    for out, code in results:
        assert code == 0, out[-3000:]
    a, b = (_statuses(out) for out, _ in results)
    names = [s["name"] for s in _npu(str(outs[0]))]
    assert names and set(a) == set(b) == set(names), (a, b)
    for name in names:  # the lock: exactly one of them built each entry, the other copied it
        assert sorted((a[name], b[name])) == ["built", "cached"], (name, a[name], b[name])
    assert [s["rknn_sha256"] for s in _npu(str(outs[0]))] == [s["rknn_sha256"] for s in _npu(str(outs[1]))]


def test_a_damaged_w8a8_entry_is_found_and_built_again(at_once, model):
    work, cache, outs, _ = at_once
    npu = _npu(str(outs[0]))
    entries = {sha256_file(str(p)): p for p in (cache / "rknn").iterdir() if p.suffix == ".rknn"}
    cut = entries[npu[0]["rknn_sha256"]]
    with open(cut, "r+b") as f:  # the .rknn cut short
        f.truncate(1000)
    spoilt = None
    if len(npu) > 1:  # another entry's accuracy record overwritten
        spoilt = entries[npu[1]["rknn_sha256"]].with_suffix(".json")
        spoilt.write_text("{not json")
    out = work / "c"
    p = _start(model, out, cache)
    text = p.communicate(timeout=1200)[0]
    assert p.returncode == 0, text[-3000:]
    got = _statuses(text)
    assert got[npu[0]["name"]] == "rebuilt (the cache entry had failed its checksum)", got
    if spoilt is not None:
        assert got[npu[1]["name"]] == "rebuilt (the cache entry had no readable accuracy record)", got
        assert "min_cos" in json.loads(spoilt.read_text())  # written again, whole
    again = {s["name"]: s for s in _npu(str(out))}
    assert os.path.getsize(out / again[npu[0]["name"]]["rknn"]) > 1000
    assert cut.stat().st_size > 1000
    assert (cache / "rknn" / (cut.stem + ".sha256")).read_text().strip() == sha256_file(str(cut))
