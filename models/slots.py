"""The per-layer layout with named state slots, shared by RWKV-6 and RWKV-7.

Each ``mixing_{i}.onnx`` reads ``input`` [C], the inter-layer values the version passes between
blocks (RWKV-7: ``v_first``, from layer 0 to the later ones), and one tensor per state slot;
it writes ``output`` [C], the inter-layer values it makes and ``SLOT_out`` for every slot:

- ``att_shift`` [C]: the time-mix token shift (LN1 of the previous token);
- ``wkv`` [H, N, N]: the per-head matrix state, fp32 maths, zero at the start;
- ``ffn_shift`` [C]: the channel-mix token shift (LN2 of the previous token).

Here: the names, the shape facts every slot version has, the block's I/O and the pieces of
graph both versions write the same way (token-shift mixes, GroupNorm ``ln_x``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Sequence, Tuple

import numpy as np

from rwkv2rknn.models import graph, rwkv4
from rwkv2rknn.models.graph import as_np, dims, vi

EMBED_FILE, HEAD_FILE, BLOCK_FILE = rwkv4.EMBED_FILE, rwkv4.HEAD_FILE, rwkv4.BLOCK_FILE
EMBED_IO, HEAD_IO = rwkv4.EMBED_IO, rwkv4.HEAD_IO
LN_EPS = 1e-5
GN_EPS = 64e-5
OUT_SUFFIX = "_out"
# The recurrent state of one layer: (name, shape kind, accumulates over the sequence).
STATE_SLOTS = (("att_shift", "C", False), ("wkv", "HNN", True), ("ffn_shift", "C", False))
# The loader's view of a block: (input, output, accumulator?) of every state slot.
STATE_IO = tuple((name, name + OUT_SUFFIX, acc) for name, _, acc in STATE_SLOTS)
WKV_PREFIX = "wkv."  # node names of the recurrence inside a block

# The surface every slot version offers the loader and export as its own (``arch.BLOCK_FILE``,
# ...): each one takes it with ``from rwkv2rknn.models.slots import *``.
__all__ = [
    "BLOCK_FILE",
    "EMBED_FILE",
    "EMBED_IO",
    "HEAD_FILE",
    "HEAD_IO",
    "LN_EPS",
    "OUT_SUFFIX",
    "STATE_IO",
    "STATE_SLOTS",
    "WKV_PREFIX",
    "fp32_nodes",
]


@dataclass(frozen=True)
class Shape(rwkv4.Shape):
    """RWKV-4's shape facts plus the head size and the LoRA widths (by name)."""

    head_size: int = 64
    lora: Dict[str, int] = field(default_factory=dict)

    @property
    def heads(self) -> int:
        return self.width // self.head_size

    def slot_shape(self, kind: str) -> Tuple[int, ...]:
        return (self.heads, self.head_size, self.head_size) if kind == "HNN" else (self.width,)

    def layer_params(self, layer: int) -> Tuple[int, int]:
        """(MatMul weights, other parameters) of one layer: each version says."""
        raise NotImplementedError

    def params(self) -> int:
        per_layer = sum(sum(self.layer_params(i)) for i in range(self.layers))
        return 2 * self.vocab * self.width + per_layer + 4 * self.width

    def matmul_flops_per_token(self) -> int:
        mats = sum(self.layer_params(i)[0] for i in range(self.layers))
        return 2 * (mats + self.vocab * self.width)

    def to_dict(self) -> dict:
        return {
            "layers": self.layers,
            "width": self.width,
            "ffn": self.ffn,
            "vocab": self.vocab,
            "head_size": self.head_size,
            "lora": dict(self.lora),
        }


def block_io(i: int, inter: Sequence[str] = ()) -> Tuple[Tuple[str, ...], Tuple[str, ...]]:
    """(inputs, outputs) of ``mixing_{i}.onnx``: layer 0 makes the ``inter`` values, the later
    layers read them."""
    states = tuple(name for name, _, _ in STATE_SLOTS)
    ins = ("input",) + (tuple(inter) if i else ()) + states
    outs = ("output",) + (() if i else tuple(inter)) + tuple(s + OUT_SUFFIX for s in states)
    return ins, outs


def base_dims(sd) -> Tuple[int, int, int, int]:
    """(layers, width, FFN width, vocabulary) of a checkpoint (FFN 0 if it has no FFN key)."""
    layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    vocab, width = dims(sd["emb.weight"])
    ffn = dims(sd["blocks.0.ffn.key.weight"])[0] if "blocks.0.ffn.key.weight" in sd else 0
    return layers, width, ffn, vocab


def description_of(version: str, inter: Sequence[str] = ()):
    """``description(shape)`` of a version: see ``description``."""
    return lambda shape: description(version, shape, inter)


def block_io_of(inter: Sequence[str] = ()):
    """``block_io(i)`` of a version that passes ``inter`` between layers."""
    return lambda i: block_io(i, inter)


def checked_shape(sd, version: str, what: str, shape_of, head_key: str) -> Shape:
    """The shape of a checkpoint of ``version`` (one-line errors for another version or a head
    size that does not split the width); the caller then checks every key's shape."""
    from rwkv2rknn.errors import UnsupportedModel

    got = rwkv4.detect_version(sd)
    if got != version:
        raise UnsupportedModel(
            f"not an {what} checkpoint (it looks like RWKV-{got})", f"give an official {what} .pth checkpoint"
        )
    shape = shape_of(sd)
    c, n = shape.width, shape.head_size
    if n <= 1 or c % n:
        raise UnsupportedModel(
            f"not an {what} checkpoint: '{head_key}' does not split width {c} into heads",
            "the checkpoint is damaged, or of an older version",
        )
    return shape


def description(version: str, shape: Shape, inter: Sequence[str] = ()) -> dict:
    """What the exporter records about the state beside the files (rwkv2rknn-model.json):
    per layer, each slot's input name, output name, shape and whether it accumulates."""
    return {
        "version": version,
        "inter_layer": list(inter),
        "state_slots": [
            {
                "name": name,
                "input": name,
                "output": name + OUT_SUFFIX,
                "shape": list(shape.slot_shape(kind)),
                "accumulator": acc,
            }
            for name, kind, acc in STATE_SLOTS
        ],
    }


def shift_mix(g: graph.Builder, xx: str, shift: str, mixes: Dict[str, np.ndarray], tag: str):
    """``xx + (shift - xx) * m`` for every named mix ``m``; returns ({name: mixed}, delta)."""
    delta = g.op("Sub", shift, xx, name=f"{tag}.shift_delta")
    return {
        name: g.op(
            "Add",
            xx,
            g.op("Mul", delta, g.const(f"{tag}.{name}", m), name=f"{tag}.mix_{name}.d"),
            name=f"{tag}.mix_{name}",
        )
        for name, m in mixes.items()
    }, delta


def group_norm(g: graph.Builder, y: str, h: int, n: int, w: np.ndarray, b: np.ndarray, tag: str) -> str:
    """GroupNorm over H groups of N of the vector ``y`` (eps 64e-5), scaled and shifted."""
    y = g.reshape(y, [h, n], f"{tag}.heads")
    mean = g.op("ReduceMean", y, name=f"{tag}.mean", axes=[-1])
    d = g.op("Sub", y, mean, name=f"{tag}.sub")
    var = g.op("ReduceMean", g.op("Mul", d, d, name=f"{tag}.sq"), name=f"{tag}.var", axes=[-1])
    std = g.op(
        "Sqrt",
        g.op("Add", var, g.const(f"{tag}.eps", np.float32(GN_EPS)), name=f"{tag}.add_eps"),
        name=f"{tag}.std",
    )
    y = g.reshape(g.op("Div", d, std, name=f"{tag}.div"), [h * n], f"{tag}.flat")
    y = g.op("Mul", y, g.const(f"{tag}.weight", w), name=f"{tag}.scale")
    return g.op("Add", y, g.const(f"{tag}.bias", b), name=f"{tag}.shift")


def block_params(sd, i: int, flat: Sequence[str] = ()) -> Dict[str, np.ndarray]:
    """Layer ``i``'s tensors by their name after ``blocks.{i}.``: projections (``*.weight``)
    transposed to (in, out), ``[1, 1, C]`` vectors and the names ending in ``flat`` made flat,
    the LoRA matrices as stored."""
    prefix = f"blocks.{i}."
    p = {}
    for key, t in sd.items():
        if key.startswith(prefix):
            name, arr = key[len(prefix) :], as_np(t)
            if name.endswith(".weight") and arr.ndim == 2:
                arr = arr.T
            elif arr.shape[:2] == (1, 1) or name.endswith(tuple(flat)):
                arr = arr.reshape(-1)
            p[name] = np.ascontiguousarray(arr)
    return p


def projections(g, mixed: Dict[str, str], p) -> Dict[str, str]:
    """r, k, v and the gate g of RWKV-5.2 and 6: each mixed input times its (C, C) projection."""
    names = {"r": "receptance", "k": "key", "v": "value", "g": "gate"}
    return {m: g.rows(mixed[m], [p[f"att.{name}.weight"]], f"att.{name}") for m, name in names.items()}


def expected_shapes(
    shape: Shape, projections: Sequence[str], ffn: Sequence[str], per_layer
) -> Dict[str, tuple]:
    """The shape of every key a checkpoint must have: embedding, ln0, the per-layer LayerNorms
    and ``ln_x``, ``att.{projections}.weight`` (C, C), the channel mix's key (F, C), value
    (C, F) and the (C, C) ``ffn`` ones, plus what ``per_layer(i, prefix)`` adds, and the head."""
    c, f, v = shape.width, shape.ffn, shape.vocab
    out = rwkv4.outer_shapes(c, v)
    for i in range(shape.layers):
        b = f"blocks.{i}."
        for key in ("ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias", "att.ln_x.weight", "att.ln_x.bias"):
            out[b + key] = (c,)
        for key in projections:
            out[b + f"att.{key}.weight"] = (c, c)
        for key in ffn:
            out[b + f"ffn.{key}.weight"] = (c, c)
        out[b + "ffn.key.weight"], out[b + "ffn.value.weight"] = (f, c), (c, f)
        out.update(per_layer(i, b))
    return out


def check_shapes(sd, expected: Dict[str, tuple], what: str) -> None:
    error = graph.shape_error(sd, expected, what)
    if error is not None:
        raise error


def embed_graph(sd):
    """Token -> LN0(emb[token]): the same stage as RWKV-4's."""
    return rwkv4.embed_graph(sd)


def squared_relu(g: graph.Builder, x: str, key: np.ndarray, value: np.ndarray) -> str:
    """``relu(x[1, C] @ K)^2 @ V`` as a vector: the channel mix's key and value projections."""
    hid = g.op(
        "MatMul",
        g.reshape(x, [1, key.shape[0]], "ffn.to_row"),
        g.const("ffn.key.weight", key),
        name="ffn.key",
    )
    hid = g.op("Relu", hid, name="ffn.relu")
    hid = g.op("Mul", hid, hid, name="ffn.square")
    kv = g.op("MatMul", hid, g.const("ffn.value.weight", value), name="ffn.value")
    return g.reshape(kv, [value.shape[1]], "ffn.to_vec")


def kv_wkv(g: graph.Builder, p, s: Dict[str, str], h: int, n: int) -> str:
    """The RWKV-5.2/6 recurrence (nodes ``wkv.*``), state S [key, value] per head::

        a = k v^T;  y = r (u*a + S);  S' = a + diag(w) S;  out = GroupNorm(y) * silu(g)

    ``s`` names the vectors r, k, v, g, w (the decay, [C]) and the state ``wkv``; ``u`` is
    ``att.time_faaaa``. The new state goes to ``wkv_out``; returns ``out``."""

    def op(kind, *ins, tag, **kw):
        return g.op(kind, *ins, name=WKV_PREFIX + tag, **kw)

    def shaped(x, shape, tag):
        return g.reshape(x, shape, WKV_PREFIX + tag)

    a = op("MatMul", shaped(s["k"], [h, n, 1], "k_col"), shaped(s["v"], [h, 1, n], "v_row"), tag="kv")
    u = g.const(WKV_PREFIX + "time_faaaa", p["att.time_faaaa"].reshape(h, n, 1))
    y = op(
        "MatMul",
        shaped(s["r"], [h, 1, n], "r_row"),
        op("Add", op("Mul", u, a, tag="ua"), s["wkv"], tag="ua_S"),
        tag="y",
    )
    new = op("Add", a, op("Mul", shaped(s["w"], [h, n, 1], "w_col"), s["wkv"], tag="S_decay"), tag="S_new")
    g.op("Identity", new, name="state.wkv_out", out="wkv" + OUT_SUFFIX)
    y = group_norm(
        g, shaped(y, [h * n], "y_flat"), h, n, p["att.ln_x.weight"], p["att.ln_x.bias"], WKV_PREFIX + "ln_x"
    )
    gate = op("Mul", s["g"], op("Sigmoid", s["g"], tag="g_sigmoid"), tag="g_silu")
    return op("Mul", y, gate, tag="gated")


def gated_block_tail(
    g: graph.Builder,
    p,
    s: Dict[str, str],
    h: int,
    n: int,
    i: int,
    xx: str,
    ffn_k: np.ndarray,
    ffn_r: np.ndarray,
):
    """RWKV-5.2/6 from the projections on: the recurrence, the output projection and residual,
    the channel mix ``x + sigmoid(x_r @ Rf) * (relu(x_k @ Kf)^2 @ Vf)`` (token-shift amounts
    ``ffn_k``, ``ffn_r``), and the finished block."""
    c = h * n
    out = kv_wkv(g, p, s, h, n)
    x = g.op("Add", "input", g.rows(out, [p["att.output.weight"]], "att.output"), name="att.residual")
    xx2 = g.layer_norm(x, p["ln2.weight"], p["ln2.bias"], "ln2", LN_EPS)
    fm = shift_mix(g, xx2, "ffn_shift", {"k": ffn_k, "r": ffn_r}, "ffn")[0]
    fr = g.op("Sigmoid", g.rows(fm["r"], [p["ffn.receptance.weight"]], "ffn.receptance"), name="ffn.r")
    kv = squared_relu(g, fm["k"], p["ffn.key.weight"], p["ffn.value.weight"])
    g.op("Add", x, g.op("Mul", fr, kv, name="ffn.rkv"), name="ffn.residual", out="output")
    return block_model(g, i, c, h, n, (), xx, xx2)


def head_graph(sd):
    """``x`` [C] -> LN(ln_out) -> ``x[1, C] @ head^T`` -> logits [V]."""
    from onnx import TensorProto

    g = graph.Builder()
    v, c = dims(sd["head.weight"])
    y = g.layer_norm("x", as_np(sd["ln_out.weight"]), as_np(sd["ln_out.bias"]), "ln_out", LN_EPS)
    g.rows(y, [as_np(sd["head.weight"]).T], "head", out="output")
    return g.model([vi("x", TensorProto.FLOAT, [c])], [vi("output", TensorProto.FLOAT, [v])], "head")


def block_model(g: graph.Builder, i: int, c: int, h: int, n: int, inter: Sequence[str], xx: str, xx2: str):
    """Finish a block: the shift outputs (``xx``, ``xx2``) and the model with its typed I/O
    (the graph must already write ``output`` and ``wkv_out``)."""
    from onnx import TensorProto

    g.op("Identity", xx, name="att.shift_out", out="att_shift" + OUT_SUFFIX)
    g.op("Identity", xx2, name="ffn.shift_out", out="ffn_shift" + OUT_SUFFIX)
    shapes = {"wkv": [h, n, n]}
    ins, outs = block_io(i, inter)

    def info(name):
        base = name[: -len(OUT_SUFFIX)] if name.endswith(OUT_SUFFIX) else name
        return vi(name, TensorProto.FLOAT, shapes.get(base, [c]))

    return g.model([info(t) for t in ins], [info(t) for t in outs], f"mixing_{i}")


def fp32_nodes(model) -> list:
    """Names of the nodes an fp16 export keeps in fp32 (the recurrence), but for those that read
    a graph output (RWKV-7's ``v_first`` in layer 0): onnxconverter-common casts no graph output
    for them."""
    outputs = {o.name for o in model.graph.output}
    return [
        node.name
        for node in model.graph.node
        if node.name.startswith(WKV_PREFIX) and not outputs & set(node.input)
    ]
