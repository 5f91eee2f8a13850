"""io: models above protobuf's 2 GB limit are written with external data and read back whole."""

import os
import sys

import numpy as np
import pytest

from rwkv2rknn import fileio


def _model(initializers, dims):
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)
    names = [t.name for t in initializers]
    nodes, cur = [], "x"
    for i, n in enumerate(names):
        out = "y" if i == len(names) - 1 else f"a{i}"
        nodes.append(helper.make_node("Add", [cur, n], [out]))
        cur = out
    return helper.make_model(
        helper.make_graph(nodes, "big", [x], [y], initializer=initializers),
        opset_imports=[helper.make_opsetid("", 13)],
    )


@pytest.mark.slow
def test_a_graph_above_2gb_is_saved_with_external_data_and_read_back(tmp_path):
    """Two 1.02 GiB float32 tensors (2.03 GiB, above protobuf's limit), made as a sparse file of
    zeros (no disk, no memory until read) with a marker value at the end of each tensor."""
    from onnx import TensorProto

    n = (1040 << 20) // 4
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "w.bin", "wb") as f:
        f.truncate(2 * n * 4)
        for i in range(2):
            f.seek((i + 1) * n * 4 - 4)
            f.write(np.float32(i + 1).tobytes())
    inits = []
    for i in range(2):
        t = TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=[n])
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", "w.bin"), ("offset", str(i * n * 4)), ("length", str(n * 4))):
            e = t.external_data.add()
            e.key, e.value = k, v
        inits.append(t)
    with open(src / "big.onnx", "wb") as f:
        f.write(_model(inits, [n]).SerializeToString())

    model = fileio.load_onnx(str(src / "big.onnx"))  # reads the external data in
    assert fileio.tensor_bytes(model) > 2**31
    os.unlink(src / "w.bin")
    out = tmp_path / "out.onnx"
    fileio.save_onnx(model, str(out), keep=False)  # a plain save would fail (2 GB)
    del model
    assert os.path.getsize(out) < 1 << 20
    assert os.path.getsize(str(out) + ".data") >= 2 * n * 4
    import onnx

    head = onnx.load(str(out), load_external_data=False)  # where each tensor went, not its data
    with open(str(out) + ".data", "rb") as f:
        for i, t in enumerate(head.graph.initializer):
            where = {e.key: e.value for e in t.external_data}
            assert where["location"] == "out.onnx.data" and int(where["length"]) == n * 4
            f.seek(int(where.get("offset", 0)))
            assert f.read(4) == bytes(4)
            f.seek(int(where.get("offset", 0)) + n * 4 - 4)
            assert np.frombuffer(f.read(4), np.float32)[0] == i + 1


def test_small_models_stay_in_one_file_and_big_ones_run_in_onnxruntime(tmp_path):
    from onnx import numpy_helper
    from rwkv2rknn.runtime.ort import OrtRunner

    w = [numpy_helper.from_array(np.full([4096], i + 1, np.float32), f"w{i}") for i in range(3)]
    model = _model(w, [4096])
    small, big = tmp_path / "small.onnx", tmp_path / "big.onnx"
    fileio.save_onnx(model, str(small))
    assert not os.path.exists(str(small) + ".data")
    fileio.save_onnx(model, str(big), external_above=10_000)  # above the threshold: external
    assert os.path.getsize(str(big) + ".data") >= 3 * 4096 * 4
    assert os.path.getsize(big) < 4096
    from onnx import TensorProto

    assert all(
        t.data_location == TensorProto.DEFAULT and len(t.raw_data) == 4096 * 4
        for t in model.graph.initializer
    )  # keep=True gave the tensors back
    x = np.arange(4096, dtype=np.float32)
    for path in (small, big):
        y = OrtRunner(str(path)).infer({"x": x})["y"]
        np.testing.assert_array_equal(y, x + 6)
    fileio.save_onnx(model, str(big))  # saved small again: no stale data file left beside it
    assert not os.path.exists(str(big) + ".data")


@pytest.mark.slow
def test_the_manifest_checksum_covers_external_data(fp32_dir, tokens, tmp_path, monkeypatch):
    """A segment whose weights went to NAME.onnx.data: the manifest's checksum covers that file
    too, so a changed .onnx.data is refused before it runs, as a changed .onnx is."""
    import json

    import pytest

    from rwkv2rknn.compiler.driver import compile_model
    from rwkv2rknn.errors import BadInput
    from rwkv2rknn.compiler.ir import Options
    from rwkv2rknn.artifact.plan import sha256_file
    from rwkv2rknn.runtime.hybrid import HybridModel

    monkeypatch.setattr(fileio, "EXTERNAL_ABOVE", 4096)  # every segment with weights goes external
    art = str(tmp_path / "art")
    compile_model(fp32_dir, art, Options(plan_only=True))
    with open(os.path.join(art, "manifest.json")) as f:
        segs = json.load(f)["segments"]
    ext = [s for s in segs if os.path.exists(os.path.join(art, s["onnx"] + ".data"))]
    assert ext, "no segment was written with external data"
    HybridModel(art, backend="ort").logits(tokens[:3])  # runs as compiled
    path = os.path.join(art, ext[0]["onnx"])
    alone = __import__("hashlib").sha256(open(path, "rb").read()).hexdigest()
    assert ext[0]["sha256"] == sha256_file(path) != alone
    for target in (path + ".data", path):
        with open(target, "r+b") as f:  # one byte changed, the size kept
            f.seek(-1, os.SEEK_END)
            last = f.read(1)
            f.seek(-1, os.SEEK_END)
            f.write(bytes([last[0] ^ 1]))
        with pytest.raises(BadInput, match="changed since it was compiled"):
            HybridModel(art, backend="ort").logits(tokens[:3])
        with open(target, "r+b") as f:  # back as it was
            f.seek(-1, os.SEEK_END)
            f.write(last)
        HybridModel(art, backend="ort").logits(tokens[:3])


def test_save_onnx_returns_the_checksum_of_what_it_wrote(tmp_path):
    import hashlib
    from onnx import helper, numpy_helper

    w = numpy_helper.from_array(np.arange(64 * 64, dtype=np.float32).reshape(64, 64), "w")
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", 1, [1, 64])],
        [helper.make_tensor_value_info("y", 1, [1, 64])],
        [w],
    )
    m = helper.make_model(g)
    path = str(tmp_path / "m.onnx")
    digest = fileio.save_onnx(m, path)
    assert digest == hashlib.sha256(open(path, "rb").read()).hexdigest()
    assert fileio.load_onnx(path) == m
    assert fileio.save_onnx(m, str(tmp_path / "ext.onnx"), external_above=1024) == ""  # not known


def test_stale_scratch_folders_of_dead_processes_are_removed(tmp_path):
    """rwkv2rknn-KIND-PID-* folders whose process is gone are removed; those of running
    processes, other kinds and other names are left alone."""
    import tempfile

    dead = 4194000
    while os.path.exists(f"/proc/{dead}"):
        dead -= 1
    names = {
        f"rwkv2rknn-build-{dead}-ab12": False,
        f"rwkv2rknn-worker-{dead}-cd34": False,
        f"rwkv2rknn-ds-{dead}-x": False,
        f"rwkv2rknn-build-{os.getppid()}-ef56": True,
        f"rwkv2rknn-other-{dead}-x": True,
        "rwkv2rknn-build-oj0ve9vo": True,
        "mine": True,
    }
    for n in names:
        os.makedirs(tmp_path / n / "sub")
    fileio.remove_stale_scratch(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == sorted(n for n, kept in names.items() if kept)
    folder = tempfile.mkdtemp(prefix=fileio.scratch_prefix("build"), dir=str(tmp_path))
    assert os.path.basename(folder).startswith(f"rwkv2rknn-build-{os.getpid()}-")
    fileio.remove_stale_scratch(str(tmp_path))
    assert os.path.isdir(folder)  # ours: this process runs


def test_a_kill_between_the_two_renames_of_a_replace_is_undone(tmp_path):
    """Replacing an artifact moves the old one aside, then the new one in; a process killed in
    between leaves OUT missing and the old copy aside: the next call puts it back first."""
    import subprocess as sp
    from rwkv2rknn.fileio import atomic_dir

    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text("old")
    dead = sp.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    aside = tmp_path / f".out.old-{int(dead.stdout)}-abc"
    aside.mkdir()
    os.replace(out, aside / "x")  # the state a kill between the renames leaves
    assert not out.exists()
    with pytest.raises(RuntimeError):
        with atomic_dir(str(out), "manifest.json"):
            raise RuntimeError("this compile fails too")
    assert (out / "manifest.json").read_text() == "old"
    assert not aside.exists()


def test_an_interrupt_the_moment_the_partial_folder_exists_leaves_nothing(tmp_path, monkeypatch):
    """A Ctrl-C that lands right after the temporary folder is made (before any output is
    written into it) removes that folder; the previous output stays as it was."""
    from rwkv2rknn import fileio

    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text("old")
    real_mkdir = os.mkdir

    def mkdir_then_interrupted(path, *a, **kw):
        real_mkdir(path, *a, **kw)
        if ".partial-" in os.path.basename(path):
            raise KeyboardInterrupt

    monkeypatch.setattr(fileio.os, "mkdir", mkdir_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        with fileio.atomic_dir(str(out), "manifest.json"):
            pass
    assert sorted(os.listdir(tmp_path)) == ["out"]
    assert (out / "manifest.json").read_text() == "old"
    monkeypatch.setattr(fileio.os, "mkdir", real_mkdir)
    with fileio.atomic_dir(str(out), "manifest.json") as tmp:  # the folder's mode, as before
        mode = os.stat(tmp).st_mode & 0o777
        umask = os.umask(0)
        os.umask(umask)
        assert mode == 0o777 & ~umask
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            f.write("new")
    assert (out / "manifest.json").read_text() == "new"
