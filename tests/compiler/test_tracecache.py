"""The range-trace cache: a streamed compile takes each stage's ranges from it when the stage
and what it is fed are unchanged, trusts an entry only after its checksum matches, and makes
the same artifact either way."""

import glob
import json
import logging
import os
import shutil

import numpy as np
import pytest

from rwkv2rknn.compiler.driver import compile_model
from rwkv2rknn.compiler.ir import Options, TensorInfo
from rwkv2rknn.compiler.tracecache import TraceCache, stage_key


def _compile(model, out, cache, **kw):
    m = compile_model(model, str(out), Options(plan_only=True, cache_dir=str(cache), **kw))
    note = next(r for r in m.report if r.startswith("fp16_guard: range trace:"))
    return m, note


def _entries(cache):
    return sorted(glob.glob(os.path.join(str(cache), "trace", "*.npz")))


def _same_segments(a, b):
    assert [(s.name, s.token.sha256, s.seq.sha256) for s in a.segments] == [
        (s.name, s.token.sha256, s.seq.sha256) for s in b.segments
    ]
    assert a.state == b.state


@pytest.fixture(scope="module")
def first(fp32_dir, tmp_path_factory):
    """A plan-only compile into an empty cache: (manifest, its note, cache, stage count)."""
    cache = tmp_path_factory.mktemp("tc")
    m, note = _compile(fp32_dir, tmp_path_factory.mktemp("a") / "art", cache)
    stages = m.model["layers"] + 2
    return m, note, cache, stages


@pytest.mark.slow
def test_a_second_compile_takes_every_stage_from_the_cache_and_writes_the_same(first, fp32_dir, tmp_path):
    m1, note1, cache, stages = first
    assert note1.endswith(f"0 of {stages} stages from the cache ({cache}/trace)")
    assert len(_entries(cache)) == stages
    m2, note2 = _compile(fp32_dir, tmp_path / "b", cache)
    assert f"{stages} of {stages} stages" in note2
    _same_segments(m1, m2)
    with open(tmp_path / "b" / "plan.json") as f:  # the fp16 guard's notes are the first's
        guard = [p for p in json.load(f)["passes"] if p.startswith("fp16_guard: ") and "cache" not in p]
    assert guard and guard == [r for r in m1.report if r.startswith("fp16_guard: ") and "cache" not in r]


@pytest.mark.slow
def test_a_corrupted_entry_is_traced_again(first, fp32_dir, tmp_path, caplog):
    m1, _, cache, stages = first
    cache = shutil.copytree(cache, tmp_path / "cache")
    entries = _entries(cache)
    with open(entries[0], "r+b") as f:  # cut short
        f.truncate(100)
    with open(entries[1], "r+b") as f:  # one byte changed, same length
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.unlink(entries[2][: -len(".npz")] + ".sha256")  # no recorded checksum
    with caplog.at_level(logging.WARNING, logger="rwkv2rknn.compiler.tracecache"):
        m2, note = _compile(fp32_dir, tmp_path / "b", cache)
    assert f"{stages - 3} of {stages} stages" in note
    said = " ".join(r.getMessage() for r in caplog.records)
    assert said.count("failed its checksum") == 2 and "no recorded checksum" in said
    _same_segments(m1, m2)
    for path in entries[:3]:  # written again, whole, with their checksums
        key = os.path.basename(path)[: -len(".npz")]
        assert TraceCache(os.path.dirname(path)).cache.recorded(key)
    _, note = _compile(fp32_dir, tmp_path / "c", cache)
    assert f"{stages} of {stages} stages" in note


@pytest.mark.slow
@pytest.mark.parametrize("option", [{"seed": 7}, {"range_tokens": 5}])
def test_an_option_that_changes_the_trace_misses_the_cache(first, fp32_dir, tmp_path, option):
    _, _, cache, stages = first
    cache = shutil.copytree(cache, tmp_path / "cache")
    _, note = _compile(fp32_dir, tmp_path / "b", cache, **option)
    assert f"0 of {stages} stages" in note
    assert len(_entries(cache)) == 2 * stages


@pytest.mark.slow
def test_a_changed_stage_file_misses_from_that_stage_on(first, fp32_dir, tmp_path):
    """Another head: every stage before it hits, the head misses (its file's checksum)."""
    _, _, cache, stages = first
    cache = shutil.copytree(cache, tmp_path / "cache")
    model = shutil.copytree(fp32_dir, tmp_path / "model")
    import onnx

    head = os.path.join(model, "head.onnx")
    m = onnx.load(head)
    big = max(m.graph.initializer, key=lambda t: len(t.raw_data))
    w = onnx.numpy_helper.to_array(big) * np.float32(2)
    big.raw_data = w.astype(w.dtype).tobytes()
    onnx.save(m, head)
    _, note = _compile(str(model), tmp_path / "b", cache)
    assert f"{stages - 1} of {stages} stages" in note


def test_nothing_is_left_half_written_when_the_trace_fails(tmp_path):
    cache = TraceCache(str(tmp_path / "c"))

    def fails():
        raise RuntimeError("onnxruntime refused the stage")

    with pytest.raises(RuntimeError):
        cache.get("k", fails)
    assert not [p for p in os.listdir(tmp_path / "c") if not p.endswith(".lock")]
    info = {"x": TensorInfo((1, 4), "float32", float("inf")), "y": TensorInfo((), "int64", 0.0)}
    kept = {"x": [np.arange(4, dtype=np.float32).reshape(1, 4)] * 2}
    assert cache.get("k", lambda: (info, kept)) == (info, kept) and cache.misses == 2
    got_info, got_kept = cache.get("k", fails)  # from the cache: not traced
    assert cache.hits == 1 and got_info == info
    assert [v.tolist() for v in got_kept["x"]] == [v.tolist() for v in kept["x"]]


def test_the_key_holds_what_the_stage_is_fed(tmp_path):
    path = tmp_path / "stage.onnx"
    path.write_bytes(b"a stage file")
    x = np.ones((4,), np.float32)
    base = stage_key("L0", str(path), {"width": 4}, [{"x": x}], [("s", "t")], ["y"])
    assert base == stage_key("L0", str(path), {"width": 4}, [{"x": x.copy()}], [("s", "t")], ["y"])
    assert base != stage_key("L0", str(path), {"width": 4}, [{"x": x * 2}], [("s", "t")], ["y"])
    assert base != stage_key("L0", str(path), {"width": 4}, [{"x": x}] * 2, [("s", "t")], ["y"])
    assert base != stage_key("L1", str(path), {"width": 4}, [{"x": x}], [("s", "t")], ["y"])
    path.write_bytes(b"another stage file")
    assert base != stage_key("L0", str(path), {"width": 4}, [{"x": x}], [("s", "t")], ["y"])


def test_what_a_killed_compile_left_is_removed(tmp_path):
    """A partial entry of a process that no longer runs goes when the cache is opened; one of a
    running process stays."""
    import subprocess

    folder = tmp_path / "c"
    folder.mkdir()
    gone = subprocess.Popen(["true"])
    gone.wait()
    (folder / f"k.npz.partial-{gone.pid}").write_bytes(b"half")
    (folder / f"j.npz.partial-{os.getpid()}").write_bytes(b"being written")
    TraceCache(str(folder))
    assert sorted(p.name for p in folder.iterdir()) == [f"j.npz.partial-{os.getpid()}"]
