import numpy as np
import onnx_graphsurgeon as gs

from rwkv2rknn.passes.support import classify


def node(op, inputs, out_shape=(4,), **attrs):
    out = gs.Variable("o", dtype=np.float32, shape=list(out_shape))
    return gs.Node(op, name=op, inputs=inputs, outputs=[out], attrs=attrs)


def var(shape=(4,)):
    return gs.Variable("v", dtype=np.float32, shape=list(shape))


def test_constant_matmul_is_an_anchor_activation_matmul_is_not():
    w = gs.Constant("w", np.ones((4, 4), np.float32))
    assert classify(node("MatMul", [var((1, 4)), w]), False)[0] == "anchor"
    kind, reason = classify(node("MatMul", [var((1, 4)), var((4, 4))]), False)
    assert kind == "cpu" and "two activations" in reason


def test_exp_and_low_rank_max_stay_on_cpu_with_reasons():
    kind, reason = classify(node("Exp", [var()]), False)
    assert kind == "cpu" and "exp" in reason
    kind, reason = classify(node("Max", [var(), var()]), False)
    assert kind == "cpu" and "1-D" in reason
    assert classify(node("Max", [var((1, 2, 3, 4)), var((1, 2, 3, 4))], (1, 2, 3, 4)), False)[0] == "flex"


def test_elementwise_is_flexible_unless_accumulator():
    for op in ("Add", "Mul", "Sigmoid", "Relu", "ReduceMean", "Reshape"):
        assert classify(node(op, [var(), var()]), False)[0] == "flex", op
    kind, reason = classify(node("Mul", [var(), var()]), True)
    assert kind == "cpu" and "accumulator" in reason


def test_pow_two_only():
    assert classify(node("Pow", [var(), gs.Constant("two", np.array(2, np.float32))]), False)[0] == "flex"
    assert classify(node("Pow", [var(), gs.Constant("three", np.array(3, np.float32))]), False)[0] == "cpu"


def test_unknown_op_falls_back_with_reason():
    kind, reason = classify(node("TopK", [var()]), False)
    assert kind == "cpu" and "TopK" in reason
