"""The front end on files other tools write: torch.onnx per-layer files at opsets 13-18 (fp32 and
onnxconverter-common fp16, with and without dynamic axes), an rwkv2onnx-layout whole model, our
own one-file export and a Gemm graph. Logits are compared with the rwkv package (the reference
implementation) and with the per-layer route.

Every torch.onnx variant is compiled plan-only and run on onnxruntime; two representative ones
(opset 13 fp16 static, opset 18 fp32 dynamic) are also built with rknn-toolkit2 and run on its
simulator, to keep the suite's time down.
"""

import os

import numpy as np
import pytest

from fixtures import gemm, rwkv2onnx
from fixtures.torch_layers import export_torch
from rwkv2rknn.compiler.driver import compile_model
from rwkv2rknn.compiler.ir import Options
from rwkv2rknn.runtime.hybrid import HybridModel

TORCH = dict(layers=2, width=32, vocab=61, seed=3)  # smaller than SMALL: 16 variants are compiled
PLAN = Options(plan_only=True, prefill_rows=())


def _rel(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _rwkv_logits(sd, path, tokens):
    """Logits of the rwkv package (cpu fp32, a child process) from the checkpoint ``sd`` saved
    at ``path``.pth."""
    from helpers.rwkv_package import package_logits

    from rwkv2rknn.models.checkpoint import save_checkpoint

    save_checkpoint(sd, path + ".pth")
    return package_logits(path + ".pth", tokens, "4")


@pytest.fixture(scope="module")
def torch_sd():
    from rwkv2rknn.models.checkpoint import random_checkpoint

    return random_checkpoint(**TORCH)


@pytest.fixture(scope="module")
def torch_tokens():
    return [int(t) for t in np.random.default_rng(5).integers(0, TORCH["vocab"], 16)]


@pytest.fixture(scope="module")
def torch_ref(torch_sd, torch_tokens, tmp_path_factory):
    return _rwkv_logits(torch_sd, str(tmp_path_factory.mktemp("rwkv") / "torch"), torch_tokens)


def _block_matmuls_on_npu(manifest, layers):
    npu = sum(s.matmuls for s in manifest.segments if s.backend == "npu")
    cpu = sum(s.matmuls for s in manifest.segments if s.backend == "cpu")
    assert (npu, cpu) == (7 * layers + 1, 0)
    assert manifest.npu_flop_share() == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("opset", [13, 16, 17, 18])
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16"])
def test_torch_onnx_per_layer_files(opset, dynamic, fp16, torch_sd, torch_tokens, torch_ref, tmp_path):
    src = export_torch(torch_sd, str(tmp_path / "src"), opset=opset, dynamic=dynamic, fp16=fp16)
    m = compile_model(src, str(tmp_path / "art"), PLAN)
    _block_matmuls_on_npu(m, TORCH["layers"])
    assert any("recognised per-layer rwkv4 files" in r for r in m.report)
    got = HybridModel(str(tmp_path / "art")).logits(torch_tokens)
    if fp16:
        assert _rel(got, torch_ref) < 0.02
        assert (got.argmax(1) == torch_ref.argmax(1)).mean() >= 0.9
    else:
        assert _rel(got, torch_ref) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize(
    "opset,dynamic,fp16",
    [(13, False, True), (18, True, False)],
    ids=["opset13-fp16-static", "opset18-fp32-dynamic"],
)
def test_torch_onnx_files_build_and_run_on_the_simulator(
    opset, dynamic, fp16, torch_sd, torch_tokens, torch_ref, tmp_path
):
    pytest.importorskip("rknn.api")
    src = export_torch(torch_sd, str(tmp_path / "src"), opset=opset, dynamic=dynamic, fp16=fp16)
    m = compile_model(src, str(tmp_path / "art"), Options(prefill_rows=(), strict=True))
    _block_matmuls_on_npu(m, TORCH["layers"])
    assert all(s.token.rknn and not s.token.fallback for s in m.segments if s.backend == "npu")
    got = HybridModel(str(tmp_path / "art"), backend="rknn-sim").logits(torch_tokens)
    assert (got.argmax(1) == torch_ref.argmax(1)).mean() >= 0.9
    assert _rel(got, torch_ref) < 0.05


# ------------------------------------------------------------------ whole-model files


@pytest.fixture(scope="module")
def per_layer_logits(fp32_plan_artifact, tokens):
    """The per-layer route: our per-layer fp32 export of SMALL, compiled, on onnxruntime."""
    return HybridModel(fp32_plan_artifact).logits(tokens)


@pytest.fixture(scope="module")
def rwkv2onnx_files(small_sd, tmp_path_factory):
    d = tmp_path_factory.mktemp("rwkv2onnx")
    return {
        dtype: rwkv2onnx.save(small_sd, str(d / f"{dtype}.onnx"), fp16=dtype == "fp16")
        for dtype in ("fp32", "fp16")
    }


@pytest.fixture(scope="module")
def one_files(small_sd, tmp_path_factory):
    from rwkv2rknn.models.export import export

    d = tmp_path_factory.mktemp("onefile")
    out = {}
    for dtype in ("fp32", "fp16"):
        out[dtype] = str(d / f"{dtype}.onnx")
        export(small_sd, out[dtype], fp32=dtype == "fp32", tokenizer="bytes")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["rwkv2onnx", "onefile"])
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_whole_model_file_matches_the_per_layer_route(
    kind, dtype, rwkv2onnx_files, one_files, per_layer_logits, tokens, tmp_path
):
    from rwkv2rknn.tools.check import run_check

    src = (rwkv2onnx_files if kind == "rwkv2onnx" else one_files)[dtype]
    m = compile_model(src, str(tmp_path / "art"), PLAN)
    layout = "rwkv2onnx" if kind == "rwkv2onnx" else "rwkv2rknn one-file"
    assert any(f"recognised the {layout} layout (rwkv4): 3 layers, width 48, vocab 97" in r for r in m.report)
    _block_matmuls_on_npu(m, 3)
    assert m.model["source_dtype"] == ("float16" if dtype == "fp16" else "float32")
    got = HybridModel(str(tmp_path / "art")).logits(tokens)
    if dtype == "fp32":
        assert _rel(got, per_layer_logits) < 1e-5
    else:
        assert (got.argmax(1) == per_layer_logits.argmax(1)).mean() >= 0.95
        assert _rel(got, per_layer_logits) < 0.02
    rep, backend = run_check(str(tmp_path / "art"), n_tokens=12, backend="ort")
    assert backend == "ort" and rep.passed, rep.summary()


def test_rwkv2onnx_state_is_learned_from_the_graph(rwkv2onnx_files, tmp_path):
    m = compile_model(rwkv2onnx_files["fp16"], str(tmp_path / "art"), PLAN)
    layer0 = {s.row: s for s in m.state if s.layer == 0}
    assert [s.input for s in m.state[:5]] == [f"state_0_{r}" for r in range(5)]
    assert {r for r, s in layer0.items() if s.accumulator} == {"aa", "bb", "pp"}
    assert layer0["pp"].init == pytest.approx(-1e30) and layer0["aa"].init == 0.0
    state = HybridModel(str(tmp_path / "art")).init_state()
    assert state[3].min() == pytest.approx(-1e30) and not state[:3].any()
    assert m.token_input == "input_id" and m.logits_output == "output"


@pytest.mark.slow
def test_rwkv2onnx_without_initial_state_takes_rwkv_defaults(small_sd, tmp_path, tokens, per_layer_logits):
    src = rwkv2onnx.save(small_sd, str(tmp_path / "m.onnx"), initial_state=False)
    m = compile_model(src, str(tmp_path / "art"), PLAN)
    assert any("RWKV defaults" in r for r in m.report)
    assert [s.init for s in m.state if s.row == "pp"] == pytest.approx([-1e30] * 3)
    got = HybridModel(str(tmp_path / "art")).logits(tokens[:8])
    assert _rel(got, per_layer_logits[:8]) < 1e-5


@pytest.mark.slow
def test_rwkv2onnx_fp16_builds_and_runs_on_the_simulator(rwkv2onnx_files, per_layer_logits, tokens, tmp_path):
    """One whole-model file through rknn-toolkit2 (the one-file export takes the same path
    after recognize; it is checked on onnxruntime above, to keep the suite's time down)."""
    pytest.importorskip("rknn.api")
    art = str(tmp_path / "art")
    m = compile_model(rwkv2onnx_files["fp16"], art, Options(prefill_rows=(), strict=True))
    _block_matmuls_on_npu(m, 3)
    assert all(s.token.rknn and not s.token.fallback for s in m.segments if s.backend == "npu")
    got = HybridModel(art, backend="rknn-sim").logits(tokens[:24])
    assert (got.argmax(1) == per_layer_logits[:24].argmax(1)).mean() >= 0.99


@pytest.mark.slow
def test_one_file_export_puts_big_weights_beside_it(small_sd, tmp_path, tokens, per_layer_logits):
    from rwkv2rknn.errors import BadInput
    from rwkv2rknn.models.export import export

    path = str(tmp_path / "m.onnx")
    export(small_sd, path, fp32=True, external_limit=1000)
    assert os.path.getsize(path + ".data") > os.path.getsize(path)
    with pytest.raises(BadInput, match="--force"):
        export(small_sd, path, fp32=True)
    compile_model(path, str(tmp_path / "art"), PLAN)
    got = HybridModel(str(tmp_path / "art")).logits(tokens[:6])
    assert _rel(got, per_layer_logits[:6]) < 1e-5


# ------------------------------------------------------------------ Gemm


def test_gemm_graph_is_placed_on_the_npu_and_counted(tmp_path):
    import onnx

    from rwkv2rknn.runtime.ort import OrtRunner

    model = gemm.build()
    onnx.save(model, str(tmp_path / "g.onnx"))
    m = compile_model(str(tmp_path / "g.onnx"), str(tmp_path / "art"), PLAN)
    (seg,) = m.segments
    assert seg.backend == "npu" and seg.matmuls == 2
    assert seg.flops == 2 * (64 * 96 + 96 * 64) and m.npu_flop_share() == 1.0
    x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
    y = OrtRunner(str(tmp_path / "art" / seg.token.onnx)).infer({"x": x})["y"]
    np.testing.assert_allclose(y, gemm.reference(model, x), rtol=1e-5, atol=1e-5)


def test_flop_share_counts_a_matmul_that_stays_on_the_cpu(tmp_path):
    """A MatMul of two activations stays on the CPU: the share must say so, not 100%."""
    import onnx
    from onnx import helper

    model = gemm.build()
    g = model.graph
    g.input.append(helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [64, 64]))
    g.node.append(helper.make_node("MatMul", ["y", "z"], ["yz"], name="act_mm"))
    g.output.append(helper.make_tensor_value_info("yz", onnx.TensorProto.FLOAT, [1, 64]))
    onnx.save(model, str(tmp_path / "g.onnx"))
    m = compile_model(str(tmp_path / "g.onnx"), str(tmp_path / "art"), PLAN)
    assert sum(s.matmuls for s in m.segments) == 3
    assert m.npu_flop_share() == pytest.approx(2 * 12288 / (2 * 12288 + 2 * 64 * 64))
    assert "100.0% of MatMul FLOPs" not in m.table()


@pytest.mark.slow
def test_build_fallback_reason_is_the_toolkits_own_line(tmp_path):
    """rknn-toolkit2 refuses a Reshape whose shape is an input; the reason says so (not
    'Traceback (most recent call last):')."""
    pytest.importorskip("rknn.api")
    import onnx
    from onnx import TensorProto, numpy_helper

    from rwkv2rknn.compiler.driver import build_rknn

    w = numpy_helper.from_array(np.ones((4, 8), np.float32), "w")
    nodes = [
        onnx.helper.make_node("Reshape", ["x", "s"], ["r"]),
        onnx.helper.make_node("MatMul", ["r", "w"], ["y"]),
    ]
    graph = onnx.helper.make_graph(
        nodes,
        "g",
        [
            onnx.helper.make_tensor_value_info("x", 1, [4]),
            onnx.helper.make_tensor_value_info("s", TensorProto.INT64, [2]),
        ],
        [onnx.helper.make_tensor_value_info("y", 1, [1, 8])],
        [w],
    )
    m = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(tmp_path / "bad.onnx"))
    reason = build_rknn(str(tmp_path / "bad.onnx"), str(tmp_path / "bad.rknn"))
    assert "Reshape" in reason and "constant" in reason and "Traceback" not in reason


@pytest.mark.slow
def test_state_outputs_without_matching_names_pair_by_position(small_sd, tmp_path, tokens, per_layer_logits):
    """Another exporter's names: outputs that do not echo the inputs pair by position among
    outputs of the same shape; the accumulators are still learned from the graph."""
    import onnx

    model = rwkv2onnx.build(small_sd)
    rename = {o.name: f"next_{k}" for k, o in enumerate(model.graph.output) if o.name != "output"}
    for o in model.graph.output:
        o.name = rename.get(o.name, o.name)
    for n in model.graph.node:
        n.output[:] = [rename.get(x, x) for x in n.output]
    onnx.save(model, str(tmp_path / "m.onnx"))
    m = compile_model(str(tmp_path / "m.onnx"), str(tmp_path / "art"), PLAN)
    assert any("state paired by position" in r for r in m.report)
    assert [s.output for s in m.state[:2]] == ["next_1", "next_2"]
    assert [s.accumulator for s in m.state[:5]] == [False, True, True, True, False]
    got = HybridModel(str(tmp_path / "art")).logits(tokens[:8])
    assert _rel(got, per_layer_logits[:8]) < 1e-5
