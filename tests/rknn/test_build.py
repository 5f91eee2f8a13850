"""build: concurrent and parallel builds give one complete artifact; the cache is checked; a
failed build says why in the toolkit's words. Real rknn-toolkit2 builds (1 layer, width 32)."""

import json
import os

import pytest
from helpers import npu_segments_whole, start_cached_compile

from rwkv2rknn.artifact.plan import sha256_file

ROWS = ("--prefill-rows", "2,4")  # T-row builds: the toolkit writes scratch files for these


def _start(model, out, cache):
    return start_cached_compile(model, out, cache, *ROWS)


def _complete(art):
    """The manifest's NPU segments, each with its build (T rows, and one row for the head, which
    makes only the logits), checksums right."""
    with open(os.path.join(art, "manifest.json")) as f:
        m = json.load(f)
    npu = npu_segments_whole(art)
    assert npu
    for s in npu:
        assert s["rknn"], s["name"]
        if s["outputs"] == [m["logits_output"]]:
            assert not s["seq_rknn"] and s["rknn"].endswith(".rknn") and not s["seq_rows"], s["name"]
            continue
        assert s["seq_rknn"] and list(s["seq_rows"]) == [2, 4], s["name"]
    return m["segments"]


@pytest.fixture(scope="module")
def model1(tmp_path_factory):
    from helpers import random_model

    return random_model(tmp_path_factory, "m1", fp32=False, layers=1, width=32, vocab=64, seed=11)


@pytest.fixture(scope="module")
def at_once(model1, tmp_path_factory):
    """Two compiles of the same model started together, one fresh shared cache; each compile
    also runs its own builds side by side (two NPU segments, two cores)."""
    work = tmp_path_factory.mktemp("at-once")
    cache = work / "cache"
    outs = [work / "a", work / "b"]
    procs = [_start(model1, o, cache) for o in outs]
    results = [p.communicate(timeout=900) + (p.returncode,) for p in procs]
    return work, cache, outs, results


@pytest.mark.slow
def test_two_compiles_at_once_give_the_same_complete_artifact(at_once):
    _, _, outs, results = at_once
    for out, err, code in results:
        assert code == 0, err[-2000:]
        assert "failed" not in err and "fell back" not in out, err
        assert "build(s) at a time" in err
    a, b = (_complete(str(o)) for o in outs)
    assert a == b  # names, bindings and every checksum (ONNX, .rknn, T-row .rknn)


@pytest.mark.slow
def test_a_cache_entry_cut_short_is_rebuilt_not_copied(at_once, model1):
    work, cache, outs, _ = at_once
    segs = _complete(str(outs[0]))
    seg = next(s for s in segs if s["backend"] == "npu")
    entry = next(
        p
        for p in (cache / "rknn").iterdir()
        if p.suffix == ".rknn" and sha256_file(str(p)) == seg["rknn_sha256"]
    )
    with open(entry, "r+b") as f:
        f.truncate(1000)
    out = work / "c"
    p = _start(model1, out, cache)
    _, err = p.communicate(timeout=900)
    assert p.returncode == 0, err[-2000:]
    assert "rebuilt (the cache entry had failed its checksum)" in err
    again = {s["name"]: s for s in _complete(str(out))}[seg["name"]]
    assert os.path.getsize(out / again["rknn"]) > 1000
    assert entry.stat().st_size > 1000
    assert (cache / "rknn" / (entry.stem + ".sha256")).read_text().strip() == sha256_file(str(entry))


@pytest.mark.slow
def test_a_failed_build_carries_the_toolkits_reason(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from rwkv2rknn.compiler.driver import build_rknn

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    node = helper.make_node("FooBar", ["x"], ["y"], domain="com.nowhere")
    model = helper.make_model(
        helper.make_graph([node], "g", [x], [y]),
        opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.nowhere", 1)],
    )
    onnx.save(model, str(tmp_path / "bad.onnx"))
    reason = build_rknn(str(tmp_path / "bad.onnx"), str(tmp_path / "bad.rknn"))
    assert "exited with 1" in reason and "FooBar" in reason, reason
    assert not (tmp_path / "bad.rknn").exists()
    assert os.listdir(tmp_path) == ["bad.onnx"]  # the toolkit's scratch files stayed in its folder


@pytest.mark.slow
def test_t_row_builds_side_by_side_all_succeed(at_once, tmp_path):
    """rknn-toolkit2 writes fixed-name scratch files (check_dynshape0.onnx ...) in its cwd for
    a T-row build; three at once in one folder crashed one of them (SIGSEGV). Each child now
    works in its own folder."""
    import threading

    from rwkv2rknn.rknn.build import build_child

    _, _, outs, _ = at_once
    seqs = [str(outs[0] / s["seq_onnx"]) for s in _complete(str(outs[0])) if s.get("seq_onnx")]
    jobs = (seqs * 3)[:3]
    reasons = {}

    def go(i, path):
        reasons[i] = build_child(path, str(tmp_path / f"r{i}.rknn"), "rk3588", False, 600, (2, 4, 8))

    threads = [threading.Thread(target=go, args=(i, p)) for i, p in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert reasons == {0: "", 1: "", 2: ""}
    assert all((tmp_path / f"r{i}.rknn").stat().st_size > 1000 for i in range(3))


def test_the_cache_key_covers_external_weights(tmp_path):
    """A segment written with external data (NAME.onnx.data): new weights, new key."""
    from rwkv2rknn.rknn.build import cache_key, file_key

    onnx_path = tmp_path / "s.onnx"
    onnx_path.write_bytes(b"graph")
    alone = file_key(str(onnx_path), "rk3588", "2.5.0")
    assert alone == cache_key(b"graph", "rk3588", "2.5.0")  # the same keys as before
    (tmp_path / "s.onnx.data").write_bytes(b"weights-1")
    one = file_key(str(onnx_path), "rk3588", "2.5.0")
    (tmp_path / "s.onnx.data").write_bytes(b"weights-2")
    two = file_key(str(onnx_path), "rk3588", "2.5.0")
    assert len({alone, one, two}) == 3
    assert file_key(str(onnx_path), "rk3588", "2.5.0", b"(16,)") != two


def _tiny(path, op="MatMul"):
    """A one-node ONNX file: x [1, 8] @ W (the toolkit builds it), or an op nobody knows."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32), "w")
    opsets = [helper.make_opsetid("", 13)]
    if op == "MatMul":
        node = helper.make_node("MatMul", ["x", "w"], ["y"])
    else:
        node = helper.make_node(op, ["x"], ["y"], domain="com.nowhere")
        opsets.append(helper.make_opsetid("com.nowhere", 1))
    graph = helper.make_graph([node], "g", [x], [y], initializer=[w] if op == "MatMul" else [])
    onnx.save(helper.make_model(graph, opset_imports=opsets), str(path))
    return str(path)


@pytest.mark.slow
def test_a_kept_build_child_builds_one_after_another(tmp_path):
    """One worker: a refused build says why and the worker goes on; the next build is whole and
    the size of a one-shot child's; a worker that died fails its build with the signal; nothing
    is left behind."""
    from rwkv2rknn.rknn.build_child import build_child
    from rwkv2rknn.rknn.build_worker import Worker

    good, bad = _tiny(tmp_path / "good.onnx"), _tiny(tmp_path / "bad.onnx", "FooBar")
    w = Worker()
    try:
        reason = build_child(bad, str(tmp_path / "bad.rknn"), "rk3588", False, 300, worker=w)
        assert "exited with 1" in reason and "FooBar" in reason, reason
        pid = w.proc.pid
        assert build_child(good, str(tmp_path / "kept.rknn"), "rk3588", False, 300, worker=w) == ""
        assert w.proc.pid == pid and w.usable  # the same process, still there
        with open(f"/proc/{pid}/environ", "rb") as f:  # its allocator asked for huge pages
            assert b"GLIBC_TUNABLES=glibc.malloc.hugetlb=1" in f.read().split(b"\0")
        assert build_child(good, str(tmp_path / "once.rknn"), "rk3588", False, 300) == ""
        assert (tmp_path / "kept.rknn").stat().st_size == (tmp_path / "once.rknn").stat().st_size > 0
        w.proc.kill()
        w.proc.wait()
        reason = build_child(good, str(tmp_path / "dead.rknn"), "rk3588", False, 300, worker=w)
        assert "died (SIGKILL)" in reason and not w.usable, reason
    finally:
        w.close()
    assert not os.path.exists(w.folder)
    assert sorted(os.listdir(tmp_path)) == ["bad.onnx", "good.onnx", "kept.rknn", "once.rknn"]


def test_build_children_use_huge_pages_without_dropping_the_users_tunables(monkeypatch):
    from rwkv2rknn.rknn.build_child import child_env

    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    assert child_env(TMPDIR="/x")["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    assert child_env(TMPDIR="/x")["TMPDIR"] == "/x"
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    assert child_env()["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=0")  # the user's choice stands
    assert child_env()["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=0"
