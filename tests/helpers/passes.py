"""Small graphs for testing one pass at a time."""

import numpy as np


def ctx_from_onnx(model, **fields):
    """A Context over ``model`` with every tensor's shape inferred, as canonicalize leaves it."""
    import onnx
    import onnx_graphsurgeon as gs
    from rwkv2rknn.compiler.ir import Context

    model = onnx.shape_inference.infer_shapes(model)
    ctx = Context(graph=gs.import_onnx(model), token_input="", logits_output="")
    for k, v in fields.items():
        setattr(ctx, k, v)
    return ctx


def model(nodes, inputs, outputs, inits=()):
    from onnx import helper

    m = helper.make_model(
        helper.make_graph(nodes, "g", inputs, outputs, list(inits)),
        opset_imports=[helper.make_opsetid("", 16)],
    )
    m.ir_version = 8
    return m


def vi(name, shape, elem=1):
    from onnx import helper

    return helper.make_tensor_value_info(name, elem, shape)


def const(name, arr):
    from onnx import numpy_helper

    return numpy_helper.from_array(np.asarray(arr), name)


def run_ctx(ctx, feed):
    """Run ctx.graph with onnxruntime."""
    from rwkv2rknn.compiler.ir import export
    from rwkv2rknn.runtime.ort import OrtRunner

    return OrtRunner(export(ctx.graph).SerializeToString()).infer(feed)
