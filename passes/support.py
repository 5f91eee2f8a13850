"""support: which ops the RK3588 NPU takes, with a reason for every refusal.

Each node gets a kind:

- ``anchor``: a constant-weight MatMul, the work the NPU is for (it becomes a 1x1 Conv);
- ``flex``: an op the NPU runs well (elementwise, LayerNorm pieces, reshapes) that may sit on
  either side, and is placed by the partitioner next to its anchors;
- ``cpu``: an op that stays on the CPU, with the reason.

Unsupported is never an error: it falls back to the CPU. Facts behind the rules (rknn-toolkit2
2.5.0, rk3588): Exp always runs on the CPU; Max/Min run on the NPU only for 4-D inputs; every
CPU op inside an RKNN model is an NPU<->CPU hand-off on the board. Two rules come from the model
description and the range guard: ops that compute the recurrent accumulators (the model description names them) stay
in fp32 on the CPU (and, where the model asks for it, the ops that only feed them), and ops
whose values leave fp16's range stay on the CPU.

Precondition: state (for the accumulator rows) and fp16_guard (for ranges) have run.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

from rwkv2rknn.compiler.ir import Context, const_value

NAME = "support"

# elementwise arithmetic: the same on one row as on T rows (``sequence`` builds on it)
ARITHMETIC = {"Add", "Sub", "Mul", "Div", "Relu", "Sigmoid", "Sqrt", "Neg", "Tanh", "Abs"}
ELEMENTWISE = ARITHMETIC | {"Clip", "LeakyRelu", "HardSigmoid", "Softplus"}
LAYOUT = {"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Transpose", "Split"}
REDUCE = {"ReduceMean", "ReduceSum", "LayerNormalization"}
CPU_REASONS = {
    "Exp": "exp does not run on the RK3588 NPU (rknn-toolkit2 places it on the CPU)",
    "Gather": "table lookup by token id: a memory read, nothing for the NPU",
    "Cast": "type conversion: the NPU graph is fp16 throughout",
    "Log": "log does not run on the RK3588 NPU",
}


def classify(node, accumulator: bool) -> Tuple[str, str]:
    op = node.op
    if op == "MatMul":
        weights = [const_value(t) for t in node.inputs]
        if any(w is not None and w.ndim == 2 for w in weights):
            return "anchor", "constant-weight MatMul: a 1x1 Conv on the NPU"
        return "cpu", "MatMul of two activations: no constant weight to keep on the NPU"
    if op in CPU_REASONS:
        return "cpu", CPU_REASONS[op]
    if op in ("Max", "Min") and len(node.outputs[0].shape or []) != 4:
        rank = len(node.outputs[0].shape or [])
        return "cpu", f"{op} on {rank or 'unknown'}-D tensors runs on the CPU inside RKNN (a hand-off)"
    if accumulator:
        return "cpu", "computes a recurrent accumulator of the state: kept in fp32 on the CPU"
    if op in ("Max", "Min"):
        return "flex", f"{op} on 4-D tensors runs on the NPU"
    if op == "Pow":
        e = const_value(node.inputs[1])
        if e is not None and np.asarray(e).size == 1 and float(np.asarray(e).reshape(-1)[0]) == 2.0:
            return "flex", "square"
        return "cpu", "Pow with a non-constant or non-2 exponent"
    if op in ELEMENTWISE or op in LAYOUT or op in REDUCE:
        return "flex", f"{op} runs on the NPU"
    return "cpu", f"{op} is not on the list of ops placed on the NPU"


def _accumulator_nodes(ctx: Context):
    """Nodes downstream of an accumulator state slot, stopping at constant-weight MatMuls (a
    MatMul of two activations, like RWKV-7's state times a vector, is recurrence math)."""
    graph = ctx.graph
    tensors = graph.tensors()
    frontier = [tensors[s.input] for s in ctx.state if s.accumulator and s.input in tensors]
    seen = set()
    while frontier:
        t = frontier.pop()
        for node in t.outputs:
            if node.name in seen or (node.op == "MatMul" and _has_weight(node)):
                continue
            seen.add(node.name)
            frontier.extend(node.outputs)
    if ctx.cpu_recurrence_inputs:
        seen |= _feeding_only(graph, seen)
    return seen


def _has_weight(node) -> bool:
    return any(w is not None and w.ndim == 2 for w in map(const_value, node.inputs))


def _feeding_only(graph, acc):
    """Nodes other than constant-weight MatMuls whose every result is read only by accumulator
    math (found backwards, so chains of them count): the inputs of the recurrence, computed
    where it is."""
    outputs = set(id(t) for t in graph.outputs)
    found = set()
    for node in reversed(graph.nodes):  # toposorted: consumers are decided first
        if (node.op == "MatMul" and _has_weight(node)) or node.name in acc:
            continue
        readers = [c.name for t in node.outputs for c in t.outputs]
        if (
            readers
            and not any(id(t) in outputs for t in node.outputs)
            and all(r in acc or r in found for r in readers)
        ):
            found.add(node.name)
    return found


def by_cost(node, profile) -> Tuple[str, str]:
    """For ``--placement cost``: keep a MatMul on the CPU where the profile says the NPU loses."""
    from rwkv2rknn.passes.partition import matmul_dims

    ((rows, m, k),) = matmul_dims([node])
    npu, cpu = profile.npu_matmul_ms(m, k, rows), profile.cpu_matmul_ms(m, k, rows)
    if cpu < npu:
        return "cpu", (
            f"profile '{profile.name}': the CPU is faster for {m}x{k} at M={rows} "
            f"({cpu:.3f} ms vs {npu:.3f} ms on the NPU, estimated)"
        )
    return "anchor", f"profile '{profile.name}': the NPU is faster ({npu:.3f} vs {cpu:.3f} ms, estimated)"


def run(ctx: Context) -> None:
    acc = _accumulator_nodes(ctx)
    counts = {"anchor": 0, "flex": 0, "cpu": 0}
    profile = ctx.profile
    for node in ctx.graph.nodes:
        kind, reason = classify(node, node.name in acc)
        if kind == "anchor" and ctx.options.placement == "cost":
            kind, reason = by_cost(node, profile)
        if node.name in ctx.forced_cpu and kind != "cpu":
            kind, reason = "cpu", ctx.forced_cpu[node.name]
        ctx.support[node.name] = (kind, reason)
        counts[kind] += 1
    ctx.note(NAME, summary(counts), kind="summary", **counts)


def summary(counts) -> str:
    """The support note's line from its counts (``anchor``, ``flex``, ``cpu``)."""
    return (
        f"{counts['anchor']} MatMuls for the NPU, {counts['flex']} ops that may go "
        f"either way, {counts['cpu']} kept on the CPU"
    )


def reasons(ctx: Context):
    """{reason: count} for the CPU-only nodes (for the report)."""
    out = {}
    for kind, reason in ctx.support.values():
        if kind == "cpu":
            out[reason] = out.get(reason, 0) + 1
    return out


FLEX_ON_CPU = (
    "may run on either side: placed on the CPU beside the ops that must run there (one hand-off fewer)"
)
ANCHOR_ON_CPU = "constant-weight MatMul kept on the CPU: its NPU segment would not pay for the call"


def segment_reasons(ctx: Context, nodes, fallback: str = ""):
    """{reason: count} for the nodes of one CPU segment: why each is on the CPU."""
    out = {}
    for node in nodes:
        kind, reason = ctx.support.get(node.name, ("cpu", "not classified"))
        if fallback:
            reason = f"NPU build failed, the segment fell back: {fallback}" if kind != "cpu" else reason
        elif kind == "flex":
            reason = FLEX_ON_CPU
        elif kind == "anchor":
            reason = ANCHOR_ON_CPU
        out[reason] = out.get(reason, 0) + 1
    return out
