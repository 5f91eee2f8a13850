"""Faults in a build or a segment: a toolkit build that kills its own process falls back to the
CPU and says so; an inf out of an NPU segment fails with the segment named."""

import pytest
import os
import shutil

import numpy as np

from helpers.robustness import (
    NO_ROWS,
    cli,
    edit_manifest,
    error_line,
    scratch_env,
    scratch_left,
    sha256,
    whole_artifact,
)

pytestmark = pytest.mark.slow  # every test here takes more than a few seconds


def test_crashing_toolkit_build_falls_back_and_the_cli_reports_it(model1, tmp_path):
    """float_dtype='tfloat32' makes rknn-toolkit2 2.5.0 kill its own process during build."""
    out, cache, tmp = tmp_path / "art", tmp_path / "cache", tmp_path / "tmp"
    r = cli(
        "compile",
        model1,
        "-o",
        out,
        *NO_ROWS,
        env=scratch_env(tmp, RWKV2RKNN_FLOAT_DTYPE="tfloat32", RWKV2RKNN_CACHE=cache),
    )
    assert r.returncode == 0, r.err
    assert scratch_left(tmp) == {}  # nor when the toolkit ended its own process
    assert "Traceback" not in r.err
    assert "failed, CPU fallback" in r.err
    assert "* NPU candidate that fell back to the CPU" in r.out and "the toolkit's process" in r.out
    assert "cpu*" in r.out  # the table marks each fallen-back segment
    assert not [e for e in os.listdir(cache / "rknn") if not e.endswith(".lock")]  # no entry
    m, _ = whole_artifact(out)
    assert all(s.backend == "cpu" for s in m.segments)
    r = cli("run", out, "--tokens", "1,2,3", "--backend", "ort")
    assert r.returncode == 0, r.err


def _scale_output(path, name, factor=1e30, times=3):
    """Make output `name` of the ONNX file at `path` come out multiplied by factor**times."""
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.load(path)
    pre = name + "__pre"
    producer = next(n for n in m.graph.node if name in n.output)
    producer.output[:] = [pre if x == name else x for x in producer.output]
    for n in m.graph.node:
        n.input[:] = [pre if x == name else x for x in n.input]
    elem = next(o for o in m.graph.output if o.name == name).type.tensor_type.elem_type
    dtype = helper.tensor_dtype_to_np_dtype(elem)
    m.graph.initializer.append(numpy_helper.from_array(np.array(factor, dtype), "big__"))
    cur = pre
    for i in range(times):
        nxt = name if i == times - 1 else f"{pre}{i}"
        m.graph.node.append(helper.make_node("Mul", [cur, "big__"], [nxt], name=f"poison{i}"))
        cur = nxt
    onnx.save(m, path)
    return sha256(path)


def _poison_npu_segment(art):
    """Scale the first output of the first NPU segment (and of its T-row prefill variant, if
    any) by 1e90, inf in float32; update the checksums so that only the numbers are wrong."""
    from rwkv2rknn.runtime.hybrid import load_manifest

    seg = next(s for s in load_manifest(art).segments if s.backend == "npu")
    name = seg.outputs[0]
    sums = {"sha256": _scale_output(os.path.join(art, seg.token.onnx), name)}
    if seg.seq.onnx:
        sums["seq_sha256"] = _scale_output(os.path.join(art, seg.seq.onnx), name)
    edit_manifest(art, lambda d: [s.update(sums) for s in d["segments"] if s["name"] == seg.name])
    return seg.name


def test_inf_in_an_npu_segment_fails_with_the_segment_named(plan, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(plan, art)
    name = _poison_npu_segment(art)
    r = cli("run", art, "--prompt", "hi", "--max-tokens", "8", "--seed", "1", "--backend", "ort")
    error_line(r, 1, f"segment {name}", "NaN/inf", "even in fp32")
    assert r.out in ("", "hi")  # the prompt echo at most, never generated garbage
    r = cli("run", art, "--tokens", "1,2,3", "--backend", "ort")
    error_line(r, 1, f"segment {name}", "NaN/inf")
    assert r.out == ""
    r = cli("check", art, "--backend", "ort")
    error_line(r, 1, f"segment {name}", "NaN/inf")
    assert "PASS" not in r.out
