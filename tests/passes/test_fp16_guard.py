"""The range guard on exported models whose weights overflow fp16."""

import numpy as np
import pytest

from rwkv2rknn.compiler.ir import Options
from rwkv2rknn.models.checkpoint import random_checkpoint
from helpers import hot_checkpoint
from rwkv2rknn.models.export import export
from rwkv2rknn.passes import GRAPH_PIPELINE, fp16_guard, load
from rwkv2rknn.runtime.reference import PerLayerModel


def _run_until(path, last, **opts):
    ctx = load.run(path, Options(**opts))
    for p in GRAPH_PIPELINE:
        p.run(ctx)
        if p.NAME == last:
            break
    return ctx


@pytest.fixture(scope="module")
def hot_model(tmp_path_factory):
    """FFN key weights so large that relu(k)^2 goes far above 65504."""
    sd = hot_checkpoint(400.0, layers=2, width=32, vocab=40, seed=5)
    d = str(tmp_path_factory.mktemp("hot"))
    export(sd, d, fp32=True)
    return d


@pytest.mark.slow
def test_overflowing_squared_relu_is_rescaled_exactly(hot_model):
    ctx = _run_until(hot_model, "fp16_guard")
    note = [r for r in ctx.report if r.startswith("fp16_guard")][0]
    assert "rescaled 2 squared-ReLU chain(s)" in note
    limit = ctx.options.fp16_limit
    relu_like = [n for n in ctx.graph.nodes if n.op in ("Relu",) or n.name.endswith("ffn.square")]
    for n in relu_like:
        assert ctx.tensors[n.outputs[0].name].absmax <= limit
    # numerics unchanged: the rescaled graph still computes the same logits
    ref = PerLayerModel(hot_model).logits([1, 2, 3])
    from rwkv2rknn.compiler.driver import compile_model
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        compile_model(hot_model, tmp + "/a", Options(plan_only=True))
        from rwkv2rknn.runtime.hybrid import HybridModel

        got = HybridModel(tmp + "/a").logits([1, 2, 3])
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_values_that_cannot_be_rescaled_stay_on_cpu(tmp_path):
    sd = random_checkpoint(layers=1, width=32, vocab=40, seed=6)
    sd["blocks.0.att.value.weight"] *= 1e6  # v itself overflows: no exact rescale for it
    export(sd, str(tmp_path), fp32=True)
    ctx = _run_until(str(tmp_path), "partition")
    assert any("kept on the CPU for range" in r for r in ctx.report)
    value_mm = [n for n in ctx.graph.nodes if n.name.endswith("att.value")][0]
    assert ctx.support[value_mm.name][0] == "cpu"
    assert "fp16" in ctx.support[value_mm.name][1]
    assert ctx.node_device[value_mm.name] == "cpu"


def test_sample_tokens_are_seeded(fp32_dir):
    ctx = load.run(fp32_dir, Options(range_tokens=5, seed=3))
    assert fp16_guard.sample_tokens(ctx) == fp16_guard.sample_tokens(ctx)
    assert len(fp16_guard.sample_tokens(ctx)) == 5
