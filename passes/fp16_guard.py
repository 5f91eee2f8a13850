"""fp16 range guard: keep every tensor that would live on the NPU inside fp16's range.

::

    MatMul(Wk) -> Relu -> Square -> MatMul(Wv)        (squared ReLU overflows first)
    =>  MatMul(Wk / s) -> Relu -> Square -> MatMul(Wv * s^2)     same result, values / s^2

Sample tokens (seeded) run through ONNX Runtime in fp32 and the largest |value| of every tensor
is recorded. The NPU computes in fp16 (max 65504): a squared-ReLU chain that goes above the limit
is rescaled, exactly, since relu(a x)^2 = a^2 relu(x)^2. A tensor that still goes above the
limit is reported and its producer is kept on the CPU (the support pass reads ``forced_cpu``).
The limit keeps headroom (``Options.fp16_limit``) because real text can go further than the
samples.

Precondition: normalize_matmul has run (the rescale looks for row-form MatMuls).
Postcondition: ``ctx.tensors`` holds shape, dtype and range of every tensor.
"""

from __future__ import annotations

import math

import numpy as np

from rwkv2rknn.compiler.ir import Context, const_value
from rwkv2rknn.compiler.trace import trace

NAME = "fp16_guard"


def _through_reshapes_up(t):
    while t.inputs and t.inputs[0].op in ("Reshape", "Identity"):
        t = t.inputs[0].inputs[0]
    return t.inputs[0] if t.inputs else None


def _through_reshapes_down(t):
    consumers = list({id(n): n for n in t.outputs}.values())
    while len(consumers) == 1 and consumers[0].op in ("Reshape", "Identity"):
        consumers = list({id(n): n for n in consumers[0].outputs[0].outputs}.values())
    return consumers[0] if len(consumers) == 1 else None


def _weight_index(mm):
    for i, t in enumerate(mm.inputs):
        if const_value(t) is not None and const_value(t).ndim == 2:
            return i
    return None


def _squared_relu_chains(graph):
    """(MatMul a, Relu, square node, MatMul b) for every squared-ReLU between two MatMuls."""
    for relu in graph.nodes:
        if relu.op != "Relu":
            continue
        out = relu.outputs[0]
        consumers = {id(n): n for n in out.outputs}
        sq = next(iter(consumers.values())) if len(consumers) == 1 else None
        if sq is None:
            continue
        is_square = (sq.op == "Mul" and len(sq.inputs) == 2 and sq.inputs[0] is sq.inputs[1]) or (
            sq.op == "Pow"
            and const_value(sq.inputs[1]) is not None
            and float(np.asarray(const_value(sq.inputs[1])).reshape(-1)[0]) == 2.0
        )
        if not is_square:
            continue
        a, b = _through_reshapes_up(relu.inputs[0]), _through_reshapes_down(sq.outputs[0])
        if a is None or b is None or a.op != "MatMul" or b.op != "MatMul":
            continue
        if _weight_index(a) is None or _weight_index(b) is None:
            continue
        yield a, relu, sq, b


def _chain_tensors(a, sq):
    """Tensors between MatMul a's output and the square's output (their values scale)."""
    names, t = [], a.outputs[0]
    while True:
        names.append(t.name)
        if t is sq.outputs[0]:
            return names
        nxt = t.outputs[0]
        t = nxt.outputs[0]


def sample_tokens(ctx: Context):
    vocab = int(ctx.shape.get("vocab") or 2)
    rng = np.random.default_rng(ctx.options.seed)
    return [int(t) for t in rng.integers(0, vocab, ctx.options.range_tokens)]


def run(ctx: Context) -> None:
    graph = ctx.graph
    limit = ctx.options.fp16_limit
    if not ctx.tensors:  # a streaming compile has traced the stage already
        ctx.tensors = trace(ctx, sample_tokens(ctx))
    info = ctx.tensors
    rescaled = []
    for a, relu, sq, b in _squared_relu_chains(graph):
        chain = _chain_tensors(a, sq)
        peak_sq = info[sq.outputs[0].name].absmax
        peak_lin = max(info[n].absmax for n in chain[:-1])
        if peak_sq <= limit and peak_lin <= limit:
            continue
        s = max(math.sqrt(peak_sq / (limit / 4)), peak_lin / (limit / 4), 1.0)
        s = float(2.0 ** math.ceil(math.log2(s)))  # a power of two: exact in fp32 and fp16
        ia, ib = _weight_index(a), _weight_index(b)
        a.inputs[ia] = _scaled(a.inputs[ia], 1.0 / s)
        b.inputs[ib] = _scaled(b.inputs[ib], s * s)
        for n in chain:
            old = info[n]
            factor = s * s if n == chain[-1] else s
            info[n] = type(old)(old.shape, old.dtype, old.absmax / factor)
        rescaled.append(f"{relu.name} (x1/{s:g}, peak {peak_sq:.3g})")
    over = {}
    for node in graph.nodes:
        for t in node.outputs:
            ti = info.get(t.name)
            if ti is not None and ti.dtype.startswith("float") and not ti.absmax <= limit:
                over[node.name] = (
                    f"values reach {ti.absmax:.3g} on sample tokens, above the fp16 "
                    f"limit {limit:g} (fp16 max 65504)"
                )
    ctx.forced_cpu.update(over)
    msg = f"{len(info)} tensors ranged over {ctx.options.range_tokens} sample tokens"
    msg += f"; rescaled {len(rescaled)} squared-ReLU chain(s)" + (
        f": {', '.join(rescaled[:3])}{' ...' if len(rescaled) > 3 else ''}" if rescaled else ""
    )
    msg += f"; {len(over)} op(s) kept on the CPU for range" if over else "; all within range"
    ctx.note(NAME, msg)


def _scaled(t, factor: float):
    import onnx_graphsurgeon as gs

    return gs.Constant(
        f"{t.name}.x{factor:g}", (np.asarray(t.values) * np.float32(factor)).astype(np.float32)
    )
