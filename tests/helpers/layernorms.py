"""Decomposed LayerNorms in a written segment file, and whether each is one run of nodes
(rknn-toolkit2 2.5.0 fuses a LayerNorm only from neighbouring nodes; passes/cut.py)."""

import onnx


def layernorms(path):
    """[(names of the LayerNorm's nodes in file order, their indices)] for each decomposed
    LayerNorm: ReduceMean(x) -> Sub(x, mean) -> square -> ReduceMean -> ... -> Div(d, .)."""
    nodes = list(onnx.load(path, load_external_data=False).graph.node)
    readers = {}
    for i, n in enumerate(nodes):
        for t in n.input:
            readers.setdefault(t, []).append(i)
    found = []
    for i, n in enumerate(nodes):
        if n.op_type != "ReduceMean":
            continue
        sub = [
            j
            for j in readers.get(n.output[0], [])
            if nodes[j].op_type == "Sub" and nodes[j].input[0] == n.input[0]
        ]
        if not sub:
            continue
        d = nodes[sub[0]].output[0]
        square = [j for j in readers.get(d, []) if nodes[j].op_type in ("Mul", "Pow")]
        div = [j for j in readers.get(d, []) if nodes[j].op_type == "Div"]
        if not square or not div:
            continue
        chain, k = [i, sub[0], square[0]], square[0]
        while k != div[0]:
            nxt = readers.get(nodes[k].output[0], [])
            if len(nxt) != 1:
                break
            k = nxt[0]
            chain.append(k)
        chain.sort()
        found.append(([nodes[k].name for k in chain], chain))
    return found


def split_layernorms(path):
    """The LayerNorms of a segment file whose nodes are not one run: [(first node, the nodes
    between its own)]."""
    nodes = list(onnx.load(path, load_external_data=False).graph.node)
    out = []
    for names, idx in layernorms(path):
        between = [nodes[k].name for k in range(idx[0], idx[-1] + 1) if k not in idx]
        if between:
            out.append((names[0], between))
    return out
