"""rwkv2rknn.rknn.columns: T-row segments rewritten to columns [C, T] (NCHW inside) for the NPU build,
checked against the rows form on onnxruntime; what it refuses; the runner wrapper that turns rows."""

import glob
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from rwkv2rknn.rknn.columns import NotColumns, fits, to_columns, write_columns
from rwkv2rknn.runtime.ort import OrtRunner
from rwkv2rknn.runtime.rows import Columns


def _npu_seq_files(art):
    files = sorted(glob.glob(os.path.join(art, "segments", "*_npu_*.seq.onnx")))
    assert files, art
    return files


@pytest.mark.slow
def test_every_rwkv4_and_rwkv7_npu_t_row_segment_has_a_columns_form(fp32_plan_artifact, slot_models):
    # fits() runs the columns form against the rows form on onnxruntime (random inputs)
    for f in _npu_seq_files(fp32_plan_artifact) + _npu_seq_files(slot_models("7").plan_artifact):
        assert fits(f) == "", f


def test_the_columns_form_has_no_transpose_and_keeps_the_weights_once(fp32_plan_artifact):
    f = _npu_seq_files(fp32_plan_artifact)[1]
    rows, cols = onnx.load(f), to_columns(onnx.load(f))
    ops = [n.op_type for n in cols.graph.node]
    assert "Transpose" not in ops and "MatMul" not in ops
    assert ops.count("Conv") == sum(n.op_type == "MatMul" for n in rows.graph.node)

    def weight_bytes(m):
        return sum(numpy_helper.to_array(t).nbytes for t in m.graph.initializer)

    assert weight_bytes(cols) <= weight_bytes(rows) + 64 * 1024  # per-channel copies of vectors only
    dims = {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in cols.graph.input
    }
    assert any(d[-1] == "T" and isinstance(d[0], int) for d in dims.values())  # [C, T]
    # every output is the NCHW tensor itself, [1, N, 1, T]: no Squeeze (an op per output and
    # per row count in the .rknn, a costly one in int8)
    outs = {
        o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in cols.graph.output
    }
    assert "Squeeze" not in ops and len(outs) == len(rows.graph.output)
    for o in rows.graph.output:
        n = o.type.tensor_type.shape.dim[1].dim_value
        assert outs[o.name] == [1, n, 1, "T"], (o.name, outs[o.name])


def test_the_columns_runner_gives_rows_equal_to_the_t_row_onnx(fp32_plan_artifact, tmp_path):
    columns_runner_equals_rows(_npu_seq_files(fp32_plan_artifact)[1], str(tmp_path / "cols.onnx"))


def test_the_per_token_view_of_the_columns_form_gives_the_per_token_outputs(fp32_plan_artifact, tmp_path):
    """The per-token graph as a view of the columns T-row graph (T = 1 inside): the per-token
    file's inputs and outputs, the same numbers on onnxruntime (checked by write_token_view,
    here again on other inputs), the columns form's weights by name (shared on onnxruntime)."""
    from rwkv2rknn.rknn.columns import write_token_view

    seq = _npu_seq_files(fp32_plan_artifact)[1]
    token = seq.replace(".seq.onnx", ".onnx")
    cols, view = str(tmp_path / "cols.onnx"), str(tmp_path / "view.onnx")
    assert write_columns(seq, cols) == ""
    assert write_token_view(token, cols, view, "seg") == ""
    a, b = OrtRunner(token, "rows"), OrtRunner(view, "view")
    assert a.input_shapes == b.input_shapes and a.outputs == b.outputs
    rng = np.random.default_rng(7)
    feed = {k: rng.standard_normal(s).astype(np.float32) for k, s in a.input_shapes.items()}
    want, got = a.infer(feed), b.infer(feed)
    for k in want:
        assert got[k].shape == want[k].shape
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-4 * np.abs(want[k]).max())
    weights = {t.name for t in onnx.load(cols).graph.initializer if t.name.endswith(".conv")}
    assert weights and weights <= {t.name for t in onnx.load(view).graph.initializer}


def columns_runner_equals_rows(f, col_path):
    """The columns form of T-row segment file ``f`` through the ``Columns`` runner gives the rows
    form's outputs on onnxruntime (2 and 5 rows; state rows [1, C] or [C] as they come)."""
    assert write_columns(f, col_path) == ""
    rows = OrtRunner(f, "rows")
    cols = Columns(OrtRunner(col_path, "cols"))
    rng = np.random.default_rng(3)
    shapes = {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
        for i in onnx.load(f).graph.input
    }
    for t in (2, 5):
        feed = {
            k: rng.standard_normal([t if isinstance(d, str) else d for d in s]).astype(np.float32)
            for k, s in shapes.items()
        }
        want, got = rows.infer(feed), cols.infer(feed)
        assert set(got) == set(want)
        for k in want:
            assert got[k].shape == want[k].shape == (t, want[k].shape[1])
            np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-4 * np.abs(want[k]).max())


def _graph(nodes, inits, outs=("y",)):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", 8])
    g = helper.make_graph(
        nodes, "g", [x], [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["T", 8]) for o in outs], inits
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _w(name, shape):
    return numpy_helper.from_array(np.random.default_rng(1).standard_normal(shape).astype(np.float32), name)


@pytest.mark.parametrize(
    "case, words",
    [
        ("two activations", "constant weight"),
        ("reshape to heads", "Reshape"),
        ("softmax", "Softmax"),
    ],
)
def test_what_it_does_not_rewrite_is_refused_in_one_line(case, words, tmp_path):
    if case == "two activations":
        m = _graph(
            [
                helper.make_node("MatMul", ["x", "w"], ["h"]),
                helper.make_node("Mul", ["h", "x"], ["p"]),
                helper.make_node("MatMul", ["p", "p2"], ["y"]),
            ],
            [_w("w", (8, 8))],
        )
        m.graph.node[2].input[1] = "h"  # activation x activation (p @ h)
        m.graph.node[2].input[0] = "p"
    elif case == "reshape to heads":
        m = _graph(
            [helper.make_node("Reshape", ["x", "s"], ["h"]), helper.make_node("Reshape", ["h", "s2"], ["y"])],
            [
                numpy_helper.from_array(np.array([-1, 2, 4], np.int64), "s"),
                numpy_helper.from_array(np.array([-1, 8], np.int64), "s2"),
            ],
        )
    else:
        m = _graph([helper.make_node("Softmax", ["x"], ["y"], axis=-1)], [])
    with pytest.raises(NotColumns, match=words):
        to_columns(m)
    path = str(tmp_path / "m.onnx")
    onnx.save(m, path)
    why = fits(path)  # the build then makes the rows form, and the note says why
    assert words in why and "\n" not in why


def test_a_state_row_of_shape_1_c_and_a_split_of_the_channels(tmp_path):
    """The one-file layouts' forms: a state row [1, C] (it comes in as the column [C, 1]) and a
    Split of the rows' last axis (their LoRA outputs), in equal and in unequal parts."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", 8])
    s = helper.make_tensor_value_info("s", TensorProto.FLOAT, [1, 8])
    outs = [
        helper.make_tensor_value_info(n, TensorProto.FLOAT, ["T", k])
        for n, k in (("a", 4), ("b", 4), ("c", 3), ("d", 5), ("x_out", 8))
    ]
    nodes = [
        helper.make_node("Relu", ["x"], ["x_out"]),
        helper.make_node("Reshape", ["s", "row"], ["s_row"]),
        helper.make_node("Slice", ["x_out", "z", "m1", "z"], ["earlier"]),
        helper.make_node("Concat", ["s_row", "earlier"], ["prev"], axis=0),
        helper.make_node("Sub", ["prev", "x_out"], ["delta"]),
        helper.make_node("MatMul", ["delta", "w"], ["h"]),
        helper.make_node("Split", ["h"], ["a", "b"], axis=-1),
        helper.make_node("Split", ["x_out", "sizes"], ["c", "d"], axis=1),
    ]
    inits = [
        _w("w", (8, 8)),
        numpy_helper.from_array(np.array([1, 8], np.int64), "row"),
        numpy_helper.from_array(np.array([0], np.int64), "z"),
        numpy_helper.from_array(np.array([-1], np.int64), "m1"),
        numpy_helper.from_array(np.array([3, 5], np.int64), "sizes"),
    ]
    m = helper.make_model(
        helper.make_graph(nodes, "g", [x, s], outs, inits), opset_imports=[helper.make_opsetid("", 17)]
    )
    path = str(tmp_path / "m.seq.onnx")
    onnx.save(m, path)
    cols = to_columns(m)
    dims = {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in cols.graph.input
    }
    assert dims == {"x": [8, "T"], "s": [8, 1]}
    assert [n.attribute[0].i for n in cols.graph.node if n.op_type == "Split"] == [1, 1]
    columns_runner_equals_rows(path, str(tmp_path / "cols.onnx"))
    bad = onnx.ModelProto.FromString(m.SerializeToString())
    bad.graph.node[-1].attribute[0].i = 0  # a split of the rows themselves
    with pytest.raises(NotColumns, match="Split"):
        to_columns(bad)


def _recorded(entry):
    """The checksum the build cache recorded for its entry (the .rknn path)."""
    from rwkv2rknn.rknn.buildcache import BuildCache

    return BuildCache(os.path.dirname(entry)).recorded(os.path.basename(entry)[: -len(".rknn")])


def _built_from(art):
    """Each NPU segment with a T-row build -> (its .seq.onnx as the artifact holds it, the cache
    entry of exactly those bytes): the build cache is keyed by the SHA-256 of the file built."""
    from rwkv2rknn.fileio import cache_root
    from rwkv2rknn.rknn.build import file_key
    from rwkv2rknn.rknn.buildcache import BuildCache
    from rwkv2rknn.runtime.hybrid import load_manifest

    m = load_manifest(art)
    cache = BuildCache(os.path.join(cache_root(), "rknn"))
    out = {}
    for s in m.segments:
        if s.backend == "npu" and s.seq.rknn:
            f = os.path.join(art, s.seq.onnx)
            out[s.name] = (
                s,
                f,
                cache.entry(file_key(f, m.target, m.toolkit, repr(tuple(s.seq.rows)).encode())),
            )
    return m, out


@pytest.mark.slow
def test_the_artifact_holds_the_seq_onnx_that_was_built(fp16_artifact):
    """The columns step writes the columns form as the .seq.onnx and the build builds that file:
    the build cache entry of the artifact's file bytes is the artifact's .seq.rknn (its recorded
    checksum and the manifest's agree); the file says its layout; the rows forms are gone."""
    from rwkv2rknn.artifact.plan import sha256_file
    from rwkv2rknn.rknn.columns import ROWS_DIR, in_columns

    m, built = _built_from(fp16_artifact)
    assert built and m.format_version == 5
    for name, (s, f, entry) in built.items():
        assert s.seq.layout == "columns" and in_columns(f), name
        assert "Transpose" not in {n.op_type for n in onnx.load(f).graph.node}, name
        assert os.path.isfile(entry), (name, "no cache entry for the bytes the artifact holds")
        assert (
            _recorded(entry)
            == sha256_file(entry)
            == s.seq.rknn_sha256
            == sha256_file(os.path.join(fp16_artifact, s.seq.rknn))
        ), name
        assert s.seq.sha256 == sha256_file(f), name
    assert not os.path.exists(os.path.join(fp16_artifact, ROWS_DIR))
    # the per-token files are views of the columns forms: onnxruntime's token and T-row sessions
    # of a segment read the same weights (held once), and give the same numbers
    for name, (s, f, _) in built.items():
        convs = {n.input[1] for n in onnx.load(f).graph.node if n.op_type == "Conv"}
        token = onnx.load(os.path.join(fp16_artifact, s.token.onnx))
        assert convs and convs == {n.input[1] for n in token.graph.node if n.op_type == "Conv"}, name
        assert "MatMul" not in {n.op_type for n in token.graph.node}, name
    from rwkv2rknn.runtime.hybrid import HybridModel

    h = HybridModel(fp16_artifact, backend="ort", prepack=False)
    try:
        toks = [5, 3, 9, 1, 4]
        state = h.init_state()
        want = np.stack([h.step(t, state) for t in toks])
        held = h._store.nbytes
        got = h.prefill(toks, h.init_state())
        assert h._store.nbytes == held and h._store.conflicts == 0
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    finally:
        h.close()
    report = [r for r in m.report if r.startswith("columns:")]
    assert report == [
        f"columns: {len(built)} of {len(built)} T-row NPU segment(s) written in columns [C, T] "
        "(what the NPU builds and onnxruntime runs: no Transposes on the NPU), 0 as rows"
    ], report


@pytest.mark.slow
def test_a_failed_columns_build_leaves_the_rows_form_it_built_instead(fp16_dir, tmp_path, monkeypatch):
    """Where the columns build of a segment fails, the compile puts the rows form back and
    builds that: the artifact holds the rows file (no layout mark, ``seq_layout`` '') whose bytes
    were built, says so, and prefill on onnxruntime and the simulator gives the token steps'
    logits."""
    from rwkv2rknn.compiler.driver import compile_model
    from rwkv2rknn.compiler.ir import Options
    from rwkv2rknn.rknn import build_worker
    from rwkv2rknn.rknn.columns import in_columns
    from rwkv2rknn.runtime.hybrid import HybridModel

    real = build_worker.CachedBuilds.fetch_or_build
    refused = []

    def refuse_l1_columns(self, onnx_path, key, dest, rows=()):
        if "L0-L1" in os.path.basename(onnx_path) and in_columns(onnx_path):
            refused.append(onnx_path)
            return "", "refused by the test"
        return real(self, onnx_path, key, dest, rows)

    monkeypatch.setattr(build_worker.CachedBuilds, "fetch_or_build", refuse_l1_columns)
    art = str(tmp_path / "art")
    compile_model(fp16_dir, art, Options(prefill_rows=(16,)))
    m, built = _built_from(art)
    assert refused and len(built) >= 2
    for name, (s, f, entry) in built.items():
        rows = "L0-L1" in name
        assert s.seq.layout == ("" if rows else "columns") and in_columns(f) != rows, name
        token_ops = {n.op_type for n in onnx.load(os.path.join(art, s.token.onnx)).graph.node}
        assert ("MatMul" in token_ops) == rows and ("Conv" in token_ops) != rows, name
        assert os.path.isfile(entry) and s.seq.rknn_sha256 == _recorded(entry), name
    assert any(
        "T-row build in columns failed (refused by the test); building it as rows" in r for r in m.report
    )
    assert not any(s.seq.fallback for s in m.segments)
    toks = [3, 1, 4, 1, 5, 9, 2, 6]
    for backend in ("ort", "rknn-sim"):
        h = HybridModel(art, backend=backend)
        try:
            for seg, runner in zip(h.manifest.segments, h.prefill_runners()):
                if seg.name in built:  # rows are turned into columns only for a columns file
                    assert isinstance(runner, Columns) == (seg.seq.layout == "columns"), (backend, seg.name)
            want = np.stack([h.step(t, st) for st in [h.init_state()] for t in toks]).reshape(len(toks), -1)
            got = h.prefill(toks, h.init_state())
            np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2 * np.abs(want).max())
        finally:
            h.close()


def test_an_older_artifact_s_rows_file_still_runs_as_rows(fp32_plan_artifact, tmp_path):
    """Before format 5 a columns build's .seq.onnx held the rows form: its file has no layout
    mark, so onnxruntime runs it as rows (the board ran its .seq.rknn in columns as before)."""
    import json
    import shutil

    from rwkv2rknn.runtime.hybrid import HybridModel

    art = str(tmp_path / "v4")
    shutil.copytree(fp32_plan_artifact, art)
    with open(os.path.join(art, "manifest.json")) as f:
        d = json.load(f)
    marked = [s for s in d["segments"] if s["backend"] == "npu" and s["seq_onnx"]]
    assert marked
    for s in marked:
        s["seq_layout"] = "columns"
    d["format_version"] = 4
    with open(os.path.join(art, "manifest.json"), "w") as f:
        json.dump(d, f)
    h = HybridModel(art, backend="ort")
    try:
        runners = dict(zip((s.name for s in h.manifest.segments), h.prefill_runners()))
        assert not any(isinstance(runners[s["name"]], Columns) for s in marked)
        toks = [5, 3, 9, 1]
        state = h.init_state()
        want = np.stack([h.step(t, state) for t in toks])
        np.testing.assert_allclose(h.prefill(toks, h.init_state()), want, rtol=1e-4, atol=1e-5)
    finally:
        h.close()


@pytest.mark.slow
def test_a_cached_compile_writes_the_files_the_checked_compile_wrote(fp16_dir, tmp_path, monkeypatch):
    """A compile whose T-row builds are all in the cache skips the columns step's onnxruntime
    checks and makes the per-token view from the columns model it holds: its .seq.onnx and
    per-token .onnx files are byte for byte those of the first compile, which checked them (so
    the cache keys, the bytes of the files built, match), and every build comes from the cache."""
    from rwkv2rknn.artifact.plan import sha256_file
    from rwkv2rknn.compiler.driver import compile_model
    from rwkv2rknn.compiler.ir import Options
    from rwkv2rknn.rknn import columns

    checked = []
    real_check = columns.check

    def counted_check(onnx_path, out_path, rows=3):
        checked.append(out_path)
        return real_check(onnx_path, out_path, rows)

    monkeypatch.setattr(columns, "check", counted_check)
    opts = Options(prefill_rows=(16,), cache_dir=str(tmp_path / "cache"))
    arts, reports, checks = [str(tmp_path / "first"), str(tmp_path / "second")], [], []
    for art in arts:
        checked.clear()
        reports.append(compile_model(fp16_dir, art, opts).report)
        checks.append(len(checked))
    m, _ = _built_from(arts[0])
    cols = [s for s in m.segments if s.seq.layout == "columns"]
    assert len(cols) >= 2 and checks == [len(cols), 0], checks
    npu = sum(s.backend == "npu" for s in m.segments)
    assert any(r.startswith(f"build: 0 built, {npu} from the cache") for r in reports[1]), reports[1]
    for s in cols:
        for rel in (s.seq.onnx, s.token.onnx):
            a, b = (os.path.join(art, rel) for art in arts)
            assert sha256_file(a) == sha256_file(b), rel
