"""The board path without a board: ``pack``, and the rknn-lite runner against a RECORDING
STAND-IN for rknn-toolkit-lite2's ``RKNNLite``.

``StandInRKNNLite`` is not Rockchip's runtime: it records every call (method, arguments, the
dtype and shape of every input array) and computes a segment's outputs by running the ONNX the
.rknn was built from (kept in the unpacked artifact) on onnxruntime. So the packed artifact runs
end to end through the same code the board runs, while the NPU's own numbers are not involved.
"""

import json
import os
import sys
import types

import numpy as np
import pytest
from click.testing import CliRunner

from rwkv2rknn.errors import BadInput, ToolkitError, UsageError
from rwkv2rknn.runtime.hybrid import HybridModel, load_manifest


class StandInRKNNLite:
    """Recording stand-in for rknnlite.api.RKNNLite (see the module docstring)."""

    NPU_CORE_0_1_2 = 7
    calls = []
    onnx_for = {}  # .rknn path -> the ONNX it was built from
    init_result = 0
    init_says = ""  # what init_runtime prints on failure, as RKNNLite does (its log, a traceback)
    mangle = {}  # output name -> 'transpose' | 'scale' | 'zero': that output comes out wrong

    def __init__(self):
        self.path, self.session = None, None
        self.calls.append(("RKNNLite", None))

    def load_rknn(self, path):
        self.calls.append(("load_rknn", os.path.basename(path)))
        self.path = path
        return 0 if os.path.isfile(path) else -1

    def init_runtime(self, core_mask=0):
        self.calls.append(("init_runtime", core_mask))
        if self.init_result != 0:
            if self.init_says:
                print(self.init_says)
                print('Traceback (most recent call last):\n  File "rknnlite/api/rknn_lite.py"')
                os.write(2, b"E RKNN: " + self.init_says.encode() + b"\n")
            return self.init_result
        import onnxruntime as ort

        self.session = ort.InferenceSession(self.onnx_for[self.path], providers=["CPUExecutionProvider"])
        return 0

    def inference(self, inputs):
        self.calls.append(
            ("inference", (os.path.basename(self.path), [(str(a.dtype), tuple(a.shape)) for a in inputs]))
        )
        names = [i.name for i in self.session.get_inputs()]
        outs = self.session.run(None, dict(zip(names, inputs)))
        for j, o in enumerate(self.session.get_outputs()):
            how = self.mangle.get(o.name)
            v = np.array(outs[j], np.float32)
            if how == "scale":
                v = v * 2
            elif how == "zero":
                v = np.zeros_like(v)
            elif how == "transpose":
                v = v.reshape(4, -1).T.reshape(v.shape) if v.size % 4 == 0 else v[..., ::-1]
            outs[j] = v
        return outs

    def release(self):
        self.calls.append(("release", os.path.basename(self.path or "")))


@pytest.fixture
def lite(monkeypatch):
    api = types.ModuleType("rknnlite.api")
    api.RKNNLite = StandInRKNNLite
    pkg = types.ModuleType("rknnlite")
    pkg.api = api
    monkeypatch.setitem(sys.modules, "rknnlite", pkg)
    monkeypatch.setitem(sys.modules, "rknnlite.api", api)
    StandInRKNNLite.calls, StandInRKNNLite.onnx_for, StandInRKNNLite.init_result = [], {}, 0
    StandInRKNNLite.init_says, StandInRKNNLite.mangle = "", {}
    return StandInRKNNLite


@pytest.fixture(scope="module")
def packed(fp16_artifact, tmp_path_factory):
    from rwkv2rknn.artifact.pack import pack

    out = str(tmp_path_factory.mktemp("packed") / "p")
    return out, pack(fp16_artifact, out)


def _map(lite, src, dst):
    """Each .rknn of ``dst`` -> the ONNX it was built from: a T-row build's is its .seq.onnx as
    the artifact holds it (in columns where ``seq_layout`` says so)."""
    for seg in load_manifest(src).segments:
        if seg.backend == "npu":
            lite.onnx_for[os.path.join(dst, seg.token.rknn)] = os.path.join(src, seg.token.onnx)
            if seg.seq.rknn:
                lite.onnx_for[os.path.join(dst, seg.seq.rknn)] = os.path.join(src, seg.seq.onnx)


@pytest.mark.slow
def test_pack_keeps_only_what_the_board_loads(fp16_artifact, packed):
    out, res = packed
    m, src = load_manifest(out), load_manifest(fp16_artifact)
    assert m.packed and not src.packed
    files = {os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs}
    want = {"manifest.json"}
    for s in src.segments:
        want |= {s.token.rknn, s.seq.rknn, s.golden} if s.backend == "npu" else {s.token.onnx, s.seq.onnx}
    assert files == want - {None}
    assert all(s.golden for s in m.segments if s.backend == "npu")  # the board's self-test
    assert not any(f.endswith(".onnx") and "_npu_" in f for f in files)
    assert all(s.token.onnx == "" and s.seq.onnx is None for s in m.segments if s.backend == "npu")
    assert res["bytes"] == sum(os.path.getsize(os.path.join(out, f)) for f in files)
    # golden vectors: format version 4 packed; unpacked 5, its .seq.onnx files in columns (the
    # board's runtime reads neither)
    assert any(s.seq.layout == "columns" for s in src.segments)
    for art, version in ((fp16_artifact, 5), (out, 4)):
        with open(os.path.join(art, "manifest.json")) as f:
            assert json.load(f)["format_version"] == version
    # the parameter count is the RWKV-4 checkpoint's (emb, head, 5 W x W and 2 W x 4W matrices and
    # 11 vectors a layer, 2 LayerNorms), plus a few vectors folded at export
    L, W, V = 3, 48, 97
    exact = 2 * V * W + L * (5 * W * W + 2 * W * 4 * W + 11 * W) + 4 * W
    assert exact <= res["parameters"] <= 1.01 * exact


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["ort", "rknn-sim"])
def test_packed_artifact_refuses_the_compile_side_backends(packed, backend):
    with pytest.raises(UsageError, match="packed for the board .* --backend rknn-rt or rknn-lite"):
        HybridModel(packed[0], backend=backend)


@pytest.mark.slow
def test_packed_artifact_runs_on_rknn_lite_as_on_ort(fp16_artifact, packed, lite, tokens):
    """Decode and prefill of the packed artifact through the rknn-lite runner (stand-in) give
    the unpacked artifact's ort logits; the calls are the ones the board would see."""
    out = packed[0]
    _map(lite, fp16_artifact, out)
    board, ref = HybridModel(out, backend="rknn-lite"), HybridModel(fp16_artifact, backend="ort")
    m = board.manifest
    npu = [s for s in m.segments if s.backend == "npu"]
    loads = [c for c in lite.calls if c[0] in ("load_rknn", "init_runtime")]
    assert loads == [
        c for s in npu for c in (("load_rknn", os.path.basename(s.token.rknn)), ("init_runtime", 0))
    ]
    n = len(lite.calls)
    s1, s2 = board.init_state(), ref.init_state()
    np.testing.assert_allclose(board.step(tokens[0], s1), ref.step(tokens[0], s2), rtol=1e-5, atol=1e-5)
    per_token = [c[1] for c in lite.calls[n:] if c[0] == "inference"]
    assert [p[0] for p in per_token] == [os.path.basename(s.token.rknn) for s in npu]
    slots = {x.input for x in m.state}
    for (_, args), s in zip(per_token, npu):
        # a segment that decodes on its T-row build gets its rows padded to decode_rows (as
        # columns [C, rows] where it was built in columns)
        def padded(k):
            shape = (s.decode_rows, int(np.prod(s.shapes[k])))
            return shape[::-1] if s.seq.layout == "columns" else shape

        assert args == [
            ("float32", padded(k) if s.decode_rows and k not in slots else tuple(s.shapes[k]))
            for k in s.inputs
        ]
    # prefill: the T-row .seq.rknn files, fed T rows they were built for
    n = len(lite.calls)
    got = board.prefill(tokens[1:21], s1)
    want = ref.prefill(tokens[1:21], s2)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(s1, s2, rtol=1e-4, atol=1e-4)
    seq = [c[1] for c in lite.calls[n:] if c[0] == "inference" and ".seq." in c[1][0]]
    assert {p[0] for p in seq} == {os.path.basename(s.seq.rknn) for s in npu if s.seq.rknn}
    assert all(s.seq.layout == "columns" for s in npu if s.seq.rknn)  # the fixture's T-row builds
    rows = {a[1][1] for _, args in seq for a in args if len(a[1]) == 2}
    assert rows and rows <= set(npu[0].seq.rows)
    assert all(a[0] == "float32" for _, args in seq for a in args)
    # a prompt (`run`): the head's one-row .rknn once, fed the last row in its per-token shape
    head = npu[-1]
    assert head.outputs == (m.logits_output,) and not head.seq.rknn
    s3 = board.init_state()
    board.step(tokens[0], s3)  # where the prefill above started
    n = len(lite.calls)
    last = board.prefill(tokens[1:21], s3, last_only=True)
    np.testing.assert_allclose(last[0], want[-1], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(s3, s2, rtol=1e-4, atol=1e-4)
    calls = [
        c[1][1]
        for c in lite.calls[n:]
        if c[0] == "inference" and c[1][0] == os.path.basename(head.token.rknn)
    ]
    assert calls == [[("float32", tuple(head.shapes[k])) for k in head.inputs]]
    board.close()
    assert sum(c[0] == "release" for c in lite.calls) == sum(c[0] == "init_runtime" for c in lite.calls)
    ref.close()


@pytest.mark.slow
def test_lite_runner_releases_and_names_the_likelier_cause(fp16_artifact, lite, monkeypatch, capfd):
    from rwkv2rknn.runtime import device
    from rwkv2rknn.runtime.rknn import RknnLiteRunner

    monkeypatch.setattr(device, "npu_device_present", lambda root="/": True)
    seg = next(s for s in load_manifest(fp16_artifact).segments if s.backend == "npu")
    lite.init_result = -1
    with pytest.raises(ToolkitError) as e:
        RknnLiteRunner(
            os.path.join(fp16_artifact, seg.token.rknn),
            seg.name,
            seg.inputs,
            seg.outputs,
            seg.shapes,
            "0_1_2",
            toolkit="2.5.0",
        )
    assert [c[0] for c in lite.calls] == ["RKNNLite", "load_rknn", "init_runtime", "release"]
    assert lite.calls[2][1] == 7
    assert "older than rknn-toolkit2 2.5.0" in e.value.fix and "--target" in e.value.fix
    # what RKNNLite prints on a refusal (the runtime's E line, its traceback) is read, not shown
    lite.init_says = "failed to open rknpu module, need to insmod rknpu dirver!"
    with pytest.raises(ToolkitError) as e:
        RknnLiteRunner(
            os.path.join(fp16_artifact, seg.token.rknn),
            seg.name,
            seg.inputs,
            seg.outputs,
            seg.shapes,
            "0_1_2",
            toolkit="2.5.0",
        )
    assert "no NPU driver" in str(e.value) and "insmod rknpu" in str(e.value)
    assert "dmesg" in e.value.fix
    shown = capfd.readouterr()
    assert "Traceback" not in shown.out + shown.err and "E RKNN" not in shown.out + shown.err
    with pytest.raises(UsageError, match="unknown core mask"):
        RknnLiteRunner(
            os.path.join(fp16_artifact, seg.token.rknn), seg.name, seg.inputs, seg.outputs, seg.shapes, "0_3"
        )


@pytest.mark.slow
def test_board_run_refuses_early_when_memory_is_short(packed, lite, monkeypatch):
    from rwkv2rknn.runtime import device

    monkeypatch.setattr(device, "mem_available", lambda root="/": 1000)
    with pytest.raises(BadInput, match=r"free \(MemAvailable\), this model needs about"):
        HybridModel(packed[0], backend="rknn-lite")
    assert lite.calls == []  # refused before anything was loaded


@pytest.mark.slow
def test_pack_command_and_its_refusals(fp16_artifact, fp32_plan_artifact, tmp_path):
    from rwkv2rknn.cli import cli

    r = CliRunner().invoke(cli, ["pack", fp16_artifact, "-o", str(tmp_path / "p")])
    assert r.exit_code == 0, r.output
    assert "bytes per parameter" in r.output and "board memory need: about" in r.output
    r = CliRunner().invoke(cli, ["pack", str(tmp_path / "p"), "-o", str(tmp_path / "q")])
    assert r.exit_code == 2 and "packed already" in r.output
    r = CliRunner().invoke(cli, ["pack", fp32_plan_artifact, "-o", str(tmp_path / "q")])
    assert r.exit_code == 1 and "--plan-only" in r.output and not os.path.exists(tmp_path / "q")
    r = CliRunner().invoke(cli, ["run", str(tmp_path / "p"), "--backend", "ort", "--tokens", "1,2"])
    assert r.exit_code == 2 and "packed for the board" in r.output and "Traceback" not in r.output


@pytest.mark.slow
def test_tokenizer_file_travels_with_the_artifact(tmp_path):
    from rwkv2rknn.runtime.loader import artifact_tokenizer, bundle_tokenizer
    from rwkv2rknn.runtime.tokenizer import WORLD_VOCAB_NAME, find_world_vocab, load_tokenizer

    src = tmp_path / "model"
    src.mkdir()
    (src / "vocab.txt").write_bytes(open(find_world_vocab(), "rb").read())
    out = tmp_path / "art"
    out.mkdir()
    # a path relative to the model folder, as given at export
    spec = bundle_tokenizer("world:vocab.txt", str(src), str(out))
    assert spec == "world:tokenizer/vocab.txt" and (out / "tokenizer/vocab.txt").is_file()
    resolved = artifact_tokenizer(spec, str(out))
    assert resolved == "world:" + os.path.join(str(out), "tokenizer/vocab.txt")
    assert load_tokenizer(resolved).encode("Hello") == load_tokenizer("world").encode("Hello")
    # 'world' names the rwkv package's file, which the board does not have: copied too
    assert bundle_tokenizer("world", str(src), str(out)) == f"world:tokenizer/{WORLD_VOCAB_NAME}"
    assert bundle_tokenizer("bytes", str(src), str(out)) == "bytes"
    assert bundle_tokenizer("missing.json", str(src), str(out)) == "missing.json"  # kept, logged


@pytest.mark.slow
def test_board_runtime_older_than_the_toolkit_is_said(
    fp16_artifact, packed, lite, tmp_path, monkeypatch, caplog
):
    from rwkv2rknn.runtime import device

    fake = tmp_path / "librknnrt.so"  # a file carrying an older runtime's version string
    fake.write_bytes(b"\0ELF junk\0" + b"1.6.0 (9a7b5d24c@2023-12-13T17:31:11)\0")
    monkeypatch.setenv(device.LIBRKNNRT_ENV, str(fake))
    _map(lite, fp16_artifact, packed[0])
    with caplog.at_level("WARNING"):
        HybridModel(packed[0], backend="rknn-lite").close()
    assert "librknnrt 1.6.0 is older than rknn-toolkit2 2.5.0" in caplog.text
    # and when the runtime then refuses a file, the error names that cause first
    monkeypatch.setattr(device, "npu_device_present", lambda root="/": True)
    lite.init_result = -1
    with pytest.raises(ToolkitError) as e:
        HybridModel(packed[0], backend="rknn-lite")
    assert "librknnrt 1.6.0 is older than rknn-toolkit2 2.5.0" in str(e.value)
    assert "download librknnrt.so 2.3.2" in e.value.fix and "rknn-toolkit2" in e.value.fix


@pytest.mark.slow
def test_check_runs_a_packed_artifact_on_the_board_backend(packed, fp16_artifact, lite):
    from rwkv2rknn.tools.check import run_check

    _map(lite, fp16_artifact, packed[0])
    rep, chosen = run_check(packed[0], n_tokens=6, backend="rknn-lite")
    assert chosen == "rknn-lite" and rep.passed, rep.summary()
    with pytest.raises(BadInput, match="is packed: --per-segment"):
        run_check(packed[0], n_tokens=2, backend="rknn-lite", per_segment=True)


def test_auto_core_mask_puts_large_segments_on_every_core():
    from rwkv2rknn.artifact.profile import DeviceProfile
    from rwkv2rknn.runtime.board import core_mask_for

    rk3588 = types.SimpleNamespace(target="rk3588", profile=DeviceProfile().to_dict())
    layer = types.SimpleNamespace(flops=2 * 13 * 1024 * 1024)  # a 430M layer segment: 26 MiB fp16
    small = types.SimpleNamespace(flops=2 * 7 * 48 * 48)
    assert core_mask_for(layer, rk3588) == "0_1_2" and core_mask_for(small, rk3588) == "auto"
    assert core_mask_for(layer, rk3588, "1") == "1"  # what the user asks for wins
    rk3568 = types.SimpleNamespace(target="rk3568", profile={})
    assert core_mask_for(layer, rk3568) == "auto"  # one NPU core there


@pytest.mark.slow
def test_first_board_run_self_tests_once_and_records_it(fp16_artifact, packed, lite, tmp_path):
    """The first run of a packed artifact on a board backend checks every NPU segment against
    its golden vectors and records the verdict beside the artifact; later runs read it."""
    import shutil

    from rwkv2rknn.runtime import selftest
    from rwkv2rknn.runtime.loader import open_model

    art = str(tmp_path / "p")
    shutil.copytree(packed[0], art)
    _map(lite, fp16_artifact, art)
    said = []
    model, _ = open_model(art, "rknn-lite", echo=said.append)
    model.close()
    assert any(x.startswith("self-test passed: ") for x in said), said
    rec = json.load(open(os.path.join(art, selftest.VERDICT_FILE)))["runs"]
    ((key, verdict),) = rec.items()
    assert key.startswith("rknn-lite: librknnrt ") and verdict["ok"]
    n = len([c for c in lite.calls if c[0] == "inference"])
    model, _ = open_model(art, "rknn-lite", echo=said.append)  # recorded: not tested again
    model.close()
    assert len([c for c in lite.calls if c[0] == "inference"]) == n


@pytest.mark.slow
@pytest.mark.parametrize("how", ["transpose", "scale", "zero"])
def test_a_runtime_with_a_wrong_output_fails_the_first_run_naming_the_segment(
    fp16_artifact, packed, lite, tmp_path, how
):
    import shutil

    from rwkv2rknn.errors import NumericalError
    from rwkv2rknn.runtime import selftest
    from rwkv2rknn.runtime.loader import open_model

    art = str(tmp_path / "p")
    shutil.copytree(packed[0], art)
    _map(lite, fp16_artifact, art)
    lite.mangle = {"L1/output": how}  # made by s005_npu_L1-L2
    with pytest.raises(NumericalError) as e:
        open_model(art, "rknn-lite", echo=lambda x: None)
    assert "self-test failed on rknn-lite" in str(e.value)
    assert "segment s005_npu_L1-L2 (" in str(e.value) and "output 'L1/output'" in str(e.value)
    assert "\n" not in str(e.value)
    rec = json.load(open(os.path.join(art, selftest.VERDICT_FILE)))["runs"]
    assert [v["ok"] for v in rec.values()] == [False]
    failed = {c["segment"] for v in rec.values() for c in v["checks"] if not c["ok"]}
    assert failed == {"s005_npu_L1-L2"}
    # the next run reads the record and refuses at once; --verify tests again
    lite.mangle = {}
    with pytest.raises(NumericalError, match="the self-test recorded for rknn-lite.* failed"):
        open_model(art, "rknn-lite", echo=lambda x: None)
    said = []
    model, _ = open_model(art, "rknn-lite", echo=said.append, verify=True)
    model.close()
    assert any(x.startswith("ok   s005_npu_L1-L2 (token)") for x in said), said


@pytest.mark.slow
def test_run_verify_on_ort_prints_every_check(fp16_artifact, tmp_path):
    import shutil

    from rwkv2rknn.cli import cli

    art = str(tmp_path / "a")
    shutil.copytree(fp16_artifact, art)
    r = CliRunner().invoke(cli, ["run", art, "--backend", "ort", "--verify", "--tokens", "1,2"])
    assert r.exit_code == 0, r.output
    assert "ok   s008_npu_head (token)" in r.output and "self-test passed" in r.output
