"""One-file models in our exporter's layout compile stage by stage, like per-layer folders."""

import json
import os
import subprocess
import sys

import pytest

from rwkv2rknn.compiler import resources, split
from rwkv2rknn.compiler.driver import compile_model
from rwkv2rknn.compiler.ir import Options
from rwkv2rknn.models import checkpoint
from rwkv2rknn.models.export import export
from rwkv2rknn.tools.check import run_check


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("onefile")
    v7 = checkpoint.random_rwkv7(layers=3, width=128, vocab=97, seed=3)
    v4 = checkpoint.random_checkpoint(layers=3, width=48, vocab=97, seed=4)
    return {
        "v7": export(v7, str(d / "v7.onnx"), fp32=True, tokenizer="bytes") and str(d / "v7.onnx"),
        "v4": export(v4, str(d / "v4.onnx"), fp32=False, tokenizer="bytes") and str(d / "v4.onnx"),
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", ["v7", "v4"])
def test_one_file_streams_and_equals_the_whole_graph_compile(files, name, tmp_path):
    path = files[name]
    streamed = compile_model(path, str(tmp_path / "s"), Options(plan_only=True))
    whole = compile_model(path, str(tmp_path / "w"), Options(plan_only=True, stream=False))
    assert any("split into 5 stage files" in r for r in streamed.report)
    assert not any("split into" in r for r in whole.report)
    # the same segments, byte for byte, and the same model record
    assert [(s.name, s.token.sha256, s.seq.sha256) for s in streamed.segments] == [
        (s.name, s.token.sha256, s.seq.sha256) for s in whole.segments
    ]
    assert streamed.model["source"] == os.path.abspath(path)
    assert streamed.model["source_state"] == whole.model["source_state"]
    assert streamed.model["layout"] == whole.model["layout"] == "rwkv2rknn one-file"
    assert sorted(os.listdir(tmp_path / "s")) == ["manifest.json", "plan.json", "segments"]
    assert json.loads((tmp_path / "s" / "plan.json").read_text())["validation"]["passed"]
    rep, _ = run_check(str(tmp_path / "s"), n_tokens=12, backend="ort")  # against the one file
    assert rep.passed, rep.summary()


def test_the_estimate_follows_the_largest_stage(files):
    size = resources.model_size(files["v7"])
    per = split.stage_layout(files["v7"]).stage_bytes()
    assert size.files == 5 and size.largest == max(per.values()) < size.total
    assert resources.compile_memory(size, True) < resources.compile_memory(size, True, stream=False)


@pytest.mark.slow
def test_other_one_file_layouts_compile_as_one_graph(slot_models, tmp_path):
    from fixtures import slot_onefile

    src = slot_onefile.export_entries(slot_models("7").sd, str(tmp_path / "m.onnx"), "7")
    assert split.stage_layout(src) is None
    m = compile_model(src, str(tmp_path / "art"), Options(plan_only=True))
    assert not any("split into" in r for r in m.report)


CHILD = """
import resource, sys
import onnx, onnxruntime, onnx_graphsurgeon
from rwkv2rknn import passes
from rwkv2rknn.compiler.driver import compile_model
from rwkv2rknn.compiler.ir import Options
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
compile_model(sys.argv[1], sys.argv[2], Options(plan_only=True))
print(base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


@pytest.mark.slow
def test_a_big_one_file_model_compiles_within_twice_its_size(tmp_path):
    """A 0.6 GB fp32 RWKV-4 file (12 x 1024, vocab 4096; every layer the same random arrays,
    as bench/compile_size.py makes them): the compile process's peak resident memory is at most
    2x the file, and what it adds to the interpreter with the compile's libraries loaded is at
    most the file's size (the whole-graph compile needs several times the file)."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))
    from compile_size import make_state_dict

    path = str(tmp_path / "big.onnx")
    export(make_state_dict(12, 1024, 4096, "4"), path, fp32=True)
    size = os.path.getsize(path)
    assert size > 0.5 * 2**30
    out = subprocess.run(
        [sys.executable, "-c", CHILD, path, str(tmp_path / "art")], capture_output=True, text=True, check=True
    )
    base, peak = (int(x) for x in out.stdout.split()[-2:])
    assert peak <= 2 * size, f"peak {peak / 2**30:.2f} GiB for a {size / 2**30:.2f} GiB file"
    assert peak - base <= size, f"the compile added {(peak - base) / 2**30:.2f} GiB"
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert manifest["model"]["source"] == path and len(manifest["segments"]) > 12
