"""Whole RWKV-5.2/6/7 models in one .onnx file: our one-file export and the layouts other
exporters write (tests/fixtures/slot_onefile.py), recognised, compiled with every projection on
the NPU and run on onnxruntime against the `rwkv` package's logits (tests/helpers/rwkv_package.py).
The models are tests/conftest.py's SLOT_MODELS (3 layers x 192 or 128, head size 64)."""

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

from fixtures import slot_onefile
from helpers.layernorms import split_layernorms
from rwkv2rknn.cli import cli
from rwkv2rknn.compiler.driver import compile_model
from rwkv2rknn.errors import UnsupportedModel
from rwkv2rknn.compiler.ir import Options
from rwkv2rknn.runtime.hybrid import HybridModel
from test_columns import columns_runner_equals_rows
from test_slot_versions_end_to_end import PROJECTIONS, _weight_matmuls
from conftest import FP16_KL

PLAN = Options(plan_only=True)
TOKENS = 12  # teacher-forced tokens compared with the package (of the session's 40)


def _rel(got, ref):
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def _plan_holds(art, layers=3, tmp=None):
    """Every constant-weight MatMul (projection) in an NPU segment, no Exp there, and at most
    2 NPU and 1 CPU segments per layer per token; each LayerNorm one run of nodes in the NPU
    segments' files, and (with ``tmp``, a folder) each T-row variant's columns form equal to it
    on onnxruntime; returns the projections on the NPU."""
    m = HybridModel(art, backend="ort").manifest
    on_npu = 0
    for seg in m.segments:
        weights, model = _weight_matmuls(os.path.join(art, seg.token.onnx))
        if seg.backend == "npu":
            on_npu += len(weights)
            assert not [n for n in model.graph.node if n.op_type == "Exp"], seg.name
            for rel in (seg.token.onnx, seg.seq.onnx):
                assert split_layernorms(os.path.join(art, rel)) == [], rel
            if tmp:
                columns_runner_equals_rows(
                    os.path.join(art, seg.seq.onnx), os.path.join(tmp, seg.name + ".columns.onnx")
                )
        else:
            assert not weights, f"{seg.name} has a projection on the CPU"
    rows = [r for r in m.per_layer() if r["stage"].startswith("L")]
    assert len(rows) == layers
    assert all(len(r["npu"]) <= 2 and len(r["cpu"]) <= 1 for r in rows), rows
    return on_npu, m


def _prefill_holds(art, tokens):
    """Every NPU segment has a T-row variant (none of the CPU ones) and prefill in chunks gives
    the logits and state of token by token; returns the logits."""
    model = HybridModel(art, backend="ort")
    seq = model.prefill_runners()
    assert seq is not None
    for seg, runner in zip(model.manifest.segments, seq):
        assert (runner is not None) == (seg.backend == "npu"), seg.name
    assert any(r.startswith("sequence: 5 segment(s) take T tokens at once") for r in model.manifest.report)
    s1, s2 = model.init_state(), model.init_state()
    one = np.stack([model.step(t, s1) for t in tokens])
    many = model.prefill(tokens, s2, chunk=5)
    np.testing.assert_allclose(many, one, rtol=1e-5, atol=1e-5 * np.abs(one).max())
    np.testing.assert_allclose(s2, s1, rtol=1e-5, atol=1e-5)
    s3 = model.init_state()  # a prompt: the head (its FFN too here) on the last row only
    last = model.prefill(tokens, s3, chunk=5, last_only=True)
    np.testing.assert_allclose(last, one[-1:], rtol=1e-5, atol=1e-5 * np.abs(one).max())
    np.testing.assert_allclose(s3, s1, rtol=1e-5, atol=1e-5)
    return many


@pytest.fixture(scope="module")
def one_file(slot_models, tmp_path_factory):
    """version -> (our fp32 one-file export, its plan-only artifact), made on first use."""
    made = {}

    def get(version):
        if version not in made:
            d = tmp_path_factory.mktemp(f"onefile{version}")
            src, art = str(d / "model.onnx"), str(d / "art")
            # bytes (256 tokens) only where the vocabulary holds every byte (RWKV-5.2's has 211)
            tok = ["--tokenizer", "bytes"] if slot_models(version).shape["vocab"] >= 256 else []
            r = CliRunner().invoke(
                cli, ["export", slot_models(version).dirs["pth"], "-o", src, "--fp32", *tok]
            )
            assert r.exit_code == 0, r.output
            compile_model(src, art, PLAN)
            made[version] = src, art
        return made[version]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("version", ["7", "6", "5"])
def test_one_file_export_compiles_and_equals_the_rwkv_package(slot_models, one_file, version):
    sm = slot_models(version)
    src, art = one_file(version)
    on_npu, m = _plan_holds(art)
    assert on_npu == sum(PROJECTIONS[version]) + 1  # every projection and the head
    assert any(
        f"recognised the rwkv2rknn one-file layout (rwkv{version}): 3 layers, width {sm.shape['width']}" in r
        for r in m.report
    )
    c = sm.shape["width"]
    assert [(s.layer, s.row, s.dims(c), s.accumulator) for s in m.state] == [
        (i, name, shape, acc)
        for i in range(3)
        for name, shape, acc in (
            ("att_shift", (c,), False),
            ("wkv", (c // 64, 64, 64), True),
            ("ffn_shift", (c,), False),
        )
    ]
    out = os.path.join(art, "..", "logits.npy")  # `rwkv2rknn run --backend ort`, teacher-forced
    r = CliRunner().invoke(
        cli,
        [
            "run",
            art,
            "--backend",
            "ort",
            "--tokens",
            ",".join(map(str, sm.tokens[:TOKENS])),
            "--logits-out",
            out,
        ],
    )
    assert r.exit_code == 0, r.output
    assert _rel(np.load(out), sm.reference[:TOKENS]) <= 1e-4


def _segment_files(art):
    m = HybridModel(art, backend="ort").manifest
    return [(s.name, s.backend, s.token.sha256, s.seq.sha256) for s in m.segments]


@pytest.mark.slow
@pytest.mark.parametrize("version", ["7", "6"])
def test_one_file_segments_are_the_per_layer_routes_byte_for_byte(slot_models, one_file, version, tmp_path):
    """The one-file route cuts the same segment files as the per-layer folder (fp32 and fp16
    exports), so the per-layer route's NPU builds and simulator runs hold for it as well."""
    sm = slot_models(version)
    assert _segment_files(one_file(version)[1]) == _segment_files(sm.plan_artifact)
    if version == "7":
        src = str(tmp_path / "fp16.onnx")
        r = CliRunner().invoke(cli, ["export", sm.dirs["pth"], "-o", src, "--tokenizer", "bytes"])
        assert r.exit_code == 0, r.output
        compile_model(src, str(tmp_path / "one"), PLAN)
        compile_model(sm.dirs["fp16"], str(tmp_path / "folder"), PLAN)
        assert _segment_files(str(tmp_path / "one")) == _segment_files(str(tmp_path / "folder"))


@pytest.mark.slow
def test_one_file_keeps_v_first_inside_the_graph(one_file):
    import onnx

    src, art = one_file("7")
    g = onnx.load(src).graph
    names = {t.name for t in list(g.input) + list(g.output)}
    assert not [n for n in names if "v_first" in n]
    assert "L0/v_first" in {o for n in g.node for o in n.output}
    m = HybridModel(art, backend="ort").manifest
    assert len([s for s in m.segments if "L0/v_first" in s.inputs]) == 2  # read by L1 and L2


@pytest.mark.slow
def test_one_file_check_passes_against_the_file(one_file):
    r = CliRunner().invoke(cli, ["check", one_file("7")[1], "--backend", "ort", "--tokens", "8"])
    assert r.exit_code == 0, r.output
    assert "PASS" in r.output


@pytest.mark.slow
@pytest.mark.parametrize("version,opset", [("7", 17), ("6", 18), ("5", 17)])
def test_per_entry_layout_of_the_mobile_exporters(slot_models, version, opset, tmp_path):
    """state{3i}_in [1, C], state{3i+1}_in [H, N, N], state{3i+2}_in [1, C]; token in [1, 1]
    int64; new states of other shapes ([1, 1, C], [1, H, N, N]); torch.onnx.export."""
    sm = slot_models(version)
    src = slot_onefile.export_entries(sm.sd, str(tmp_path / "m.onnx"), version, opset)
    art = str(tmp_path / "art")
    compile_model(src, art, PLAN)
    on_npu, m = _plan_holds(art, tmp=str(tmp_path))
    assert on_npu >= 3 * 8 + 1
    rep = next(r for r in m.report if r.startswith("recognize:"))
    assert "3 layers, width %d" % sm.shape["width"] in rep and "token 'in'" in rep, rep
    layer1 = [(s.row, s.input, s.accumulator) for s in m.state if s.layer == 1]
    assert layer1 == [
        ("att_shift", "state3_in", False),
        ("wkv", "state4_in", True),
        ("ffn_shift", "state5_in", False),
    ]
    # prefill: the [1, 1, C] activations take T rows (v6 also splits its maa LoRA on axis 1)
    _runs_like_the_package(art, sm)


def _runs_like_the_package(art, sm):
    """Token by token and in prefill on ort, the package's logits within 1e-4; `check` passes."""
    got = HybridModel(art, backend="ort").logits(sm.tokens[:TOKENS])
    assert _rel(got, sm.reference[:TOKENS]) <= 1e-4
    assert _rel(_prefill_holds(art, sm.tokens[:TOKENS]), sm.reference[:TOKENS]) <= 1e-4
    r = CliRunner().invoke(cli, ["check", art, "--backend", "ort", "--tokens", "6"])
    assert r.exit_code == 0 and "PASS" in r.output, r.output


@pytest.mark.slow
def test_stacked_state_layout_is_split_per_layer(slot_models, tmp_path):
    """RWKV_Pytorch's one state tensor [B, L*(2+N), C], written in place (ScatterND)."""
    sm = slot_models("6")
    src = slot_onefile.export_stacked(sm.sd, str(tmp_path / "m.onnx"))
    art = str(tmp_path / "art")
    compile_model(src, art, PLAN)
    _, m = _plan_holds(art, tmp=str(tmp_path))
    assert any("state 'input_state' holds every layer's state: split into 9 pieces" in r for r in m.report)
    assert [(s.row, s.shape, s.accumulator) for s in m.state if s.layer == 2] == [
        ("shift0", (1, 192), False),
        ("shift1", (1, 192), False),
        ("wkv", (1, 64, 192), True),
    ]
    # prefill: the maa LoRA's rank-3 Reshape and Split on axis 0 become a Split of T rows
    _runs_like_the_package(art, sm)


@pytest.mark.slow
def test_stacked_state_read_whole_is_refused_in_one_line(slot_models, tmp_path):
    src = slot_onefile.export_stacked(slot_models("6").sd, str(tmp_path / "m.onnx"), whole_read=True)
    with pytest.raises(
        UnsupportedModel,
        match=r"one state input 'input_state' \[1, 198, 192\] "
        r"holding every layer's state: ReduceMean node",
    ):
        compile_model(src, str(tmp_path / "art"), PLAN)
    r = CliRunner().invoke(cli, ["compile", src, "-o", str(tmp_path / "art2"), "--plan-only"])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.output.strip().splitlines()[-1].startswith("error: one state input 'input_state'")
    assert not os.path.exists(tmp_path / "art2")


@pytest.mark.slow
@pytest.mark.parametrize("layout,version", [("stacked", "6"), ("entries", "7")])
def test_one_file_layouts_t_row_builds_in_columns_on_the_npu_simulator(
    slot_models, layout, version, tmp_path
):
    """The RWKV_Pytorch file's NPU segments (state rows [1, C], its maa LoRA split on T rows) and
    the mobile exporters' RWKV-7 file's (state rows [1, C]) each get a T-row build in columns
    from rknn-toolkit2; prefill on rknn-sim equals its token steps and the rows form on
    onnxruntime, and follows the `rwkv` package."""
    from rwkv2rknn.tools.compare import compare_logits

    sm = slot_models(version)
    src = str(tmp_path / "m.onnx")
    if layout == "stacked":
        slot_onefile.export_stacked(sm.sd, src)
    else:
        slot_onefile.export_entries(sm.sd, src, version)
    art = str(tmp_path / "art")
    m = compile_model(src, art, Options(prefill_rows=(16,)))
    npu = [s for s in m.segments if s.backend == "npu"]
    assert len(npu) == 5 and not m.warnings()
    for s in npu[:-1]:  # the head (the last) is built for one row
        assert s.seq.rknn and s.seq.rows == (2, 16) and not s.seq.fallback, (s.name, s.seq.fallback)
        assert s.seq.layout == "columns", (s.name, [r for r in m.report if s.name in r])
    assert npu[-1].outputs == (m.logits_output,) and npu[-1].token.rknn and not npu[-1].seq.rknn
    # state rows [1, C] beside the rows of a columns build need format version 3 at least, which
    # a runtime that reads only 1 and 2 refuses at load (it could not feed them); a built compile
    # also records golden vectors, which make it 4, and holds the columns form it built as the
    # .seq.onnx, which makes it 5
    with open(os.path.join(art, "manifest.json")) as f:
        assert json.load(f)["format_version"] == m.format_version == 5
    assert all(s.golden for s in m.segments if s.backend == "npu")
    model = HybridModel(art, backend="rknn-sim")
    for seg, runner in zip(model.manifest.segments, model.prefill_runners()):
        layer = seg.backend == "npu" and seg is not model.manifest.segments[-1]
        assert (runner is not None and runner.rows == (2, 16)) == layer, seg.name
    tokens = sm.tokens[:TOKENS]
    s1, s2 = model.init_state(), model.init_state()
    one = np.stack([model.step(t, s1) for t in tokens])
    many = model.prefill(tokens, s2)
    model.close()
    assert compare_logits(many, one, **FP16_KL, max_rel=0.01).passed
    rows = HybridModel(art, backend="ort")  # the T-row ONNX as rows, in fp32
    on_ort = rows.prefill(tokens, rows.init_state())
    rep = compare_logits(many, on_ort, **FP16_KL, max_rel=0.05)
    assert rep.passed and rep.max_rel > 0, rep.summary()  # fp16 on the NPU, close to the rows form
    rep = compare_logits(many, sm.reference[:TOKENS], **FP16_KL, max_rel=0.05)
    assert rep.passed and rep.max_rel > 0, rep.summary()  # and to the package
