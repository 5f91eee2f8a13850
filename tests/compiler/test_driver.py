"""The whole pipeline: exported models in, artifacts out, through the real rknn-toolkit2."""

import json
import os

import numpy as np
import pytest

from rwkv2rknn.compiler.driver import compile_model
from rwkv2rknn.errors import BadInput, UsageError
from rwkv2rknn.compiler.ir import Options
from rwkv2rknn.artifact.plan import Manifest


def _manifest(art):
    with open(os.path.join(art, "manifest.json")) as f:
        return Manifest.from_dict(json.load(f))


def _per_layer_counts(m):
    rows = [r for r in m.per_layer() if r["stage"].startswith("L")]
    return [(len(r["npu"]), len(r["cpu"])) for r in rows]


@pytest.mark.slow
def test_fp16_model_partition_targets(fp16_artifact):
    m = _manifest(fp16_artifact)
    assert m.layers == 3
    for npu, cpu in _per_layer_counts(m):
        assert npu <= 2 and cpu <= 1
    # all 7 MatMuls of every layer (and the head) on the NPU
    assert sum(s.matmuls for s in m.segments if s.backend == "npu") == 3 * 7 + 1
    assert m.npu_flop_share() == 1.0
    # cross-layer fusion: the NPU tail of layer i and head of layer i+1 are one segment
    assert any(set(s.stages) >= {"L0", "L1"} and s.backend == "npu" for s in m.segments)
    for s in m.segments:
        assert os.path.exists(os.path.join(fp16_artifact, s.token.onnx))
        if s.backend == "npu":
            assert s.token.rknn and os.path.getsize(os.path.join(fp16_artifact, s.token.rknn)) > 0
    assert m.toolkit == "2.5.0" and m.target == "rk3588"
    assert m.tokenizer == "bytes" and m.model["source_dtype"] == "float16"
    plan = json.load(open(os.path.join(fp16_artifact, "plan.json")))
    assert plan["npu_flop_share"] == 1.0 and plan["table"]
    assert any("exp" in r for r in plan["cpu_reasons"])


@pytest.mark.slow
def test_fp32_and_fp16_partition_alike(fp16_artifact, fp32_plan_artifact):
    a, b = _manifest(fp16_artifact), _manifest(fp32_plan_artifact)
    assert [(s.backend, s.stages) for s in a.segments] == [(s.backend, s.stages) for s in b.segments]
    assert all(s.token.rknn is None for s in b.segments)


@pytest.mark.slow
def test_names_and_bytes_are_deterministic(fp32_dir, tmp_path):
    m1 = compile_model(fp32_dir, str(tmp_path / "a"), Options(plan_only=True))
    m2 = compile_model(fp32_dir, str(tmp_path / "b"), Options(plan_only=True))
    assert [s.name for s in m1.segments] == [s.name for s in m2.segments]
    assert [s.token.sha256 for s in m1.segments] == [s.token.sha256 for s in m2.segments]


@pytest.mark.slow
def test_checksums_taken_while_writing_match_the_files(fp16_artifact):
    """The segment ONNX checksums are taken from the bytes as they are written, the others read
    back: every one is the SHA-256 of the file it names."""
    from rwkv2rknn.artifact.plan import sha256_file

    m = _manifest(fp16_artifact)
    pairs = [
        (rel, sha)
        for s in m.segments
        for rel, sha in (
            (s.token.onnx, s.token.sha256),
            (s.seq.onnx, s.seq.sha256),
            (s.token.rknn, s.token.rknn_sha256),
            (s.seq.rknn, s.seq.rknn_sha256),
        )
        if rel
    ]
    assert any(rel.endswith(".seq.onnx") for rel, _ in pairs)
    for rel, sha in pairs:
        assert sha == sha256_file(os.path.join(fp16_artifact, rel)), rel


@pytest.mark.slow
def test_second_compile_reuses_the_cache(fp16_dir, fp16_artifact, tmp_path, monkeypatch):
    """Every .rknn from the cache, every range trace too, and a columns build found there is
    not checked again (the check runs the segment both ways); the same artifact."""
    import rwkv2rknn.rknn.columns as columns

    def no_check(path, *_):
        raise AssertionError(f"columns checked again for a cached build: {path}")

    monkeypatch.setattr(columns, "check", no_check)
    m = compile_model(fp16_dir, str(tmp_path / "again"), Options())
    build_note = [r for r in m.report if r.startswith("build:")][0]
    n_npu = sum(s.backend == "npu" for s in m.segments)
    assert f"0 built, {n_npu} from the cache" in build_note
    assert any(
        r.startswith("fp16_guard: range trace: ")
        and f"{m.model['layers'] + 2} of {m.model['layers'] + 2} stages" in r
        for r in m.report
    )
    first = _manifest(fp16_artifact)
    assert [s.seq.layout for s in m.segments] == [s.seq.layout for s in first.segments]
    assert any(s.seq.layout == "columns" for s in m.segments)
    assert [
        (s.name, s.token.sha256, s.seq.sha256, s.token.rknn_sha256, s.seq.rknn_sha256) for s in m.segments
    ] == [
        (s.name, s.token.sha256, s.seq.sha256, s.token.rknn_sha256, s.seq.rknn_sha256) for s in first.segments
    ]


@pytest.mark.slow
def test_crashing_build_falls_back_to_cpu(fp32_dir, tmp_path, monkeypatch):
    # float_dtype='tfloat32' makes rknn-toolkit2 2.5.0 kill its own process during build
    monkeypatch.setenv("RWKV2RKNN_FLOAT_DTYPE", "tfloat32")
    m = compile_model(fp32_dir, str(tmp_path / "a"), Options(cache_dir=str(tmp_path / "c")))
    assert all(s.backend == "cpu" for s in m.segments)
    assert all(s.token.fallback for s in m.segments if s.matmuls)
    assert "CPU" in m.table()
    cached = os.listdir(os.path.join(tmp_path, "c", "rknn"))
    assert not [e for e in cached if not e.endswith(".lock")]  # nothing half-written cached
    from rwkv2rknn.runtime.hybrid import HybridModel
    from rwkv2rknn.runtime.reference import PerLayerModel

    toks = [3, 1, 4, 1, 5]
    np.testing.assert_allclose(
        HybridModel(str(tmp_path / "a")).logits(toks),
        PerLayerModel(fp32_dir).logits(toks),
        rtol=1e-4,
        atol=1e-4,
    )


@pytest.mark.slow
def test_strict_makes_a_failed_build_an_error(fp32_dir, tmp_path, monkeypatch):
    from rwkv2rknn.errors import ToolkitError

    monkeypatch.setenv("RWKV2RKNN_FLOAT_DTYPE", "tfloat32")
    with pytest.raises(ToolkitError, match="--strict"):
        compile_model(fp32_dir, str(tmp_path / "a"), Options(strict=True, cache_dir=str(tmp_path / "c")))
    assert not os.path.exists(tmp_path / "a")


def test_dump_after_writes_the_graph(fp32_dir, tmp_path):
    import onnx

    compile_model(fp32_dir, str(tmp_path / "a"), Options(plan_only=True), dump_after="state")
    m = onnx.load(str(tmp_path / "a" / "dump" / "after_state.onnx"))
    names = {i.name for i in m.graph.input}
    assert "L0/state_in.aa" in names and "L0/state_in" not in names
    with pytest.raises(UsageError, match="unknown pass"):
        compile_model(fp32_dir, str(tmp_path / "b"), Options(plan_only=True), dump_after="nope")


@pytest.mark.slow
def test_public_recipe_files_compile(small_sd, tmp_path, tokens):
    from helpers.public_recipe import export_public
    from rwkv2rknn.runtime.hybrid import HybridModel
    from rwkv2rknn.runtime.reference import PerLayerModel

    pub = export_public(small_sd, str(tmp_path / "pub"))
    m = compile_model(pub, str(tmp_path / "a"), Options(plan_only=True))
    for npu, cpu in _per_layer_counts(m):
        assert npu <= 2 and cpu <= 1
    got = HybridModel(str(tmp_path / "a")).logits(tokens[:12])
    ref = PerLayerModel(pub).logits(tokens[:12])
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.9


def test_single_onnx_file_compiles(fp32_dir, tmp_path):
    m = compile_model(os.path.join(fp32_dir, "mixing_1.onnx"), str(tmp_path / "a"), Options(plan_only=True))
    assert sum(s.matmuls for s in m.segments if s.backend == "npu") == 7


@pytest.mark.slow
def test_output_folder_with_other_files_is_refused(fp32_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(BadInput, match="--force"):
        compile_model(fp32_dir, str(out), Options(plan_only=True))
    assert os.listdir(out) == ["keep.txt"]
    compile_model(fp32_dir, str(out), Options(plan_only=True), force=True)
    assert os.path.exists(out / "manifest.json") and not os.path.exists(out / "keep.txt")


def test_passes_do_not_name_rwkv_tensors():
    """Passes know RWKV-4 only through the model description (models/rwkv4.py): no RWKV tensor
    or parameter name appears in their code (docstrings may draw the patterns)."""
    import ast
    import rwkv2rknn.passes as p

    folder = os.path.dirname(p.__file__)
    words = ("time_decay", "time_first", "att_xx", "ffn_xx", "aa", "bb", "pp", "mixing_")
    for name in os.listdir(folder):
        if not name.endswith(".py"):
            continue
        tree = ast.parse(open(os.path.join(folder, name)).read())
        docs = {
            id(n.body[0].value)
            for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef))
            and n.body
            and isinstance(n.body[0], ast.Expr)
            and isinstance(n.body[0].value, ast.Constant)
        }
        for n in ast.walk(tree):
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs:
                for w in words:
                    assert w not in n.value.split("/")[-1].split("."), (name, n.value)
                    assert "time_" not in n.value and "mixing_" not in n.value, (name, n.value)
            if isinstance(n, ast.Name):
                assert n.id not in words, (name, n.id)


def test_imports_run_one_way():
    """passes and models may use rwkv2rknn's core types; only compiler/driver.py, the build step
    (rknn/build.py, formerly passes/build.py) and the cli package import the passes; the board's
    runtime and tokenizer import none (README, Layout)."""
    import re

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for folder in (
        "rwkv2rknn",
        "rwkv2rknn/compiler",
        "rwkv2rknn/rknn",
        "rwkv2rknn/artifact",
        "rwkv2rknn/tools",
        "rwkv2rknn/runtime",
        "rwkv2rknn/runtime/tokenizer",
        "models",
    ):
        for name in os.listdir(os.path.join(root, folder)):
            if not name.endswith(".py") or f"{folder}/{name}" in (
                "rwkv2rknn/compiler/driver.py",
                "rwkv2rknn/rknn/build.py",
            ):
                continue
            text = open(os.path.join(root, folder, name)).read()
            assert not re.search(r"rwkv2rknn\.passes|from rwkv2rknn import passes", text), (folder, name)
