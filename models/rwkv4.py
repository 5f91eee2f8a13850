"""RWKV-4: the one place that knows what an RWKV-4 model is.

Everything else (exporter, compiler passes, runtime) asks this module, so that RWKV-5/6/7 can be
added as sibling modules with the same surface:

- ``ARCH``, ``STATE_ROWS``, ``ACCUMULATOR_ROWS``: the recurrent state layout per layer.
- ``Shape`` and ``shape_of(state_dict)``: layers, width, FFN width and vocabulary of a checkpoint.
- ``check_state_dict(state_dict)``: a clear error for anything that is not an RWKV-4 checkpoint.
- ``embed_graph`` / ``block_graph`` / ``head_graph``: the per-stage ONNX graphs of the public
  per-layer layout (opset 16, decomposed LayerNorm, ``MatMul(W[out, in], x[in])``).

The per-token recurrence (one block)::

    xx = LN1(x);  xk = xx*mix_k + att_xx*(1-mix_k)   (same for v, r)
    r = sigmoid(Wr xr);  k = Wk xk;  v = Wv xv
    ww = time_first + k;  q = max(pp, ww);  e1 = exp(pp-q);  e2 = exp(ww-q)
    wkv = (e1*aa + e2*v) / (e1*bb + e2)
    ww = pp + time_decay;  q = max(ww, k);  e1 = exp(ww-q);  e2 = exp(k-q)
    aa' = e1*aa + e2*v;  bb' = e1*bb + e2;  pp' = q;  att_xx' = xx
    x = x + Wo (r*wkv)
    xx2 = LN2(x);  xk, xr mixed with ffn_xx;  ffn_xx' = xx2
    x = x + sigmoid(Wr2 xr) * (Wv2 relu(Wk2 xk)^2)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping

import numpy as np

from rwkv2rknn.errors import UnsupportedModel
from rwkv2rknn.models import graph
from rwkv2rknn.models.graph import as_np as _np, dims as _dims, vi as _vi

ARCH = "rwkv4"
OPSET = graph.OPSET
LN_EPS = 1e-5

# Row order of the per-layer state tensor [5, C] (the public per-layer files, rwkv.cpp).
STATE_ROWS = ("ffn_xx", "att_xx", "aa", "bb", "pp")
# Rows that accumulate over the whole sequence: their maths stays in fp32 on the CPU.
ACCUMULATOR_ROWS = ("aa", "bb", "pp")
# The initial value of each row (the public demo starts from all zeros).
STATE_INIT = {"ffn_xx": 0.0, "att_xx": 0.0, "aa": 0.0, "bb": 0.0, "pp": 0.0}

# Whole-model files from other exporters: the row order of their per-row state inputs, by
# layout (recognised by the state input names), and the initial state the rwkv package uses
# when a file does not carry its own.
LAYOUT_ROWS = {"rwkv2onnx": ("att_xx", "aa", "bb", "pp", "ffn_xx")}
LAYOUT_STATE_NAMES = {"rwkv2onnx": r"state_(\d+)_(\d+)"}
RWKV_INIT = {"ffn_xx": 0.0, "att_xx": 0.0, "aa": 0.0, "bb": 0.0, "pp": -1e30}

# Names of the stage files and of their inputs and outputs.
EMBED_FILE, HEAD_FILE = "embed.onnx", "head.onnx"
BLOCK_FILE = "mixing_{}.onnx"
EMBED_IO = (("token",), ("output",))
BLOCK_IO = (("input", "state_in"), ("output", "state_out"))
HEAD_IO = (("x",), ("output",))
# The loader's view of a block: no values passed between layers, one state tensor per layer
# (input, output, accumulator?) that the state pass unpacks into STATE_ROWS.
INTER_LAYER = ()
STATE_IO = ()  # no named slots
WHOLE_STATE_IO = ("state_in", "state_out")


def block_io(i: int):
    """(inputs, outputs) of ``mixing_{i}.onnx``: the same for every layer."""
    return BLOCK_IO


_BLOCK_KEYS = {
    "ln1.weight": "C",
    "ln1.bias": "C",
    "ln2.weight": "C",
    "ln2.bias": "C",
    "att.time_decay": "C",
    "att.time_first": "C",
    "att.time_mix_k": "11C",
    "att.time_mix_v": "11C",
    "att.time_mix_r": "11C",
    "att.key.weight": "CC",
    "att.value.weight": "CC",
    "att.receptance.weight": "CC",
    "att.output.weight": "CC",
    "ffn.time_mix_k": "11C",
    "ffn.time_mix_r": "11C",
    "ffn.key.weight": "FC",
    "ffn.receptance.weight": "CC",
    "ffn.value.weight": "CF",
}
# Keys that only later RWKV versions have, and the version each one means.
_LATER_VERSION_KEYS = (
    ("att.x_a", "7"),
    ("att.w0", "7"),
    ("att.time_maa_x", "6"),
    ("att.time_decay_w1", "6"),
    ("att.ln_x.weight", "5"),
    ("att.gate.weight", "5"),
    ("att.time_faaaa", "5"),
)


@dataclass(frozen=True)
class Shape:
    layers: int
    width: int
    ffn: int
    vocab: int

    def params(self) -> int:
        c, f, v = self.width, self.ffn, self.vocab
        per_layer = 5 * c * c + 2 * c * f + 11 * c
        return 2 * v * c + self.layers * per_layer + 4 * c

    def matmul_flops_per_token(self) -> int:
        c, f = self.width, self.ffn
        return 2 * (self.layers * (5 * c * c + 2 * c * f) + self.vocab * c)

    def to_dict(self) -> dict:
        return {"layers": self.layers, "width": self.width, "ffn": self.ffn, "vocab": self.vocab}


def description(shape: Shape) -> dict:
    """What the exporter records about the state beside the files (rwkv2rknn-model.json)."""
    return {"version": "4", "state_rows": list(STATE_ROWS)}


def detect_version(sd: Mapping[str, object]) -> str:
    """'4' for an RWKV-4 checkpoint, '5'/'6'/'7' for later ones; raises for anything else."""
    if "emb.weight" not in sd or not any(k.startswith("blocks.") for k in sd):
        raise UnsupportedModel(
            "not an RWKV checkpoint (no 'emb.weight' / 'blocks.N.*' keys)",
            "give an official RWKV-4 .pth checkpoint",
        )
    for suffix, version in _LATER_VERSION_KEYS:
        if f"blocks.0.{suffix}" in sd:
            return version
    return "4"


def shape_of(sd: Mapping[str, object]) -> Shape:
    layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    vocab, width = _dims(sd["emb.weight"])
    ffn = _dims(sd["blocks.0.ffn.key.weight"])[0] if "blocks.0.ffn.key.weight" in sd else 4 * width
    return Shape(layers, width, ffn, vocab)


def outer_shapes(c: int, v: int) -> Dict[str, tuple]:
    """The shapes of the keys around the layers (embedding, ln0, the last LayerNorm, the head) of
    width ``c`` and vocabulary ``v``: the same in every version."""
    return {
        "emb.weight": (v, c),
        "blocks.0.ln0.weight": (c,),
        "blocks.0.ln0.bias": (c,),
        "ln_out.weight": (c,),
        "ln_out.bias": (c,),
        "head.weight": (v, c),
    }


def check_state_dict(sd: Mapping[str, object]) -> Shape:
    """Validate an RWKV-4 state dict; return its shape or raise a one-line UnsupportedModel."""
    version = detect_version(sd)
    if version != "4":
        raise UnsupportedModel(
            f"RWKV-{version} is not supported yet", "only RWKV-4 checkpoints can be exported for now"
        )
    shape = shape_of(sd)
    c, f, v = shape.width, shape.ffn, shape.vocab
    dims = {"C": (c,), "11C": (1, 1, c), "CC": (c, c), "FC": (f, c), "CF": (c, f)}
    expected = outer_shapes(c, v)
    for i in range(shape.layers):
        for key, kind in _BLOCK_KEYS.items():
            expected[f"blocks.{i}.{key}"] = dims[kind]
    error = graph.shape_error(sd, expected, "RWKV-4")
    if error is not None:
        raise error
    return shape


# --------------------------------------------------------------------------------------------
# Parameters in the form the graphs use (float32 numpy, time_decay = -exp(.), mixes flat)


def block_params(sd: Mapping[str, object], i: int) -> Dict[str, np.ndarray]:
    p = {}
    for key, kind in _BLOCK_KEYS.items():
        arr = _np(sd[f"blocks.{i}.{key}"])
        p[key] = arr if kind in ("CC", "FC", "CF") else arr.reshape(-1)
    p["att.time_decay"] = -np.exp(p["att.time_decay"])
    return p


# --------------------------------------------------------------------------------------------
# ONNX graphs (the public per-layer layout)


class _Builder(graph.Builder):
    """The shared graph writer plus RWKV-4's time-shift mix and WKV step."""

    def mix(self, xx: str, prev: str, m: np.ndarray, tag: str) -> str:
        a = self.op("Mul", xx, self.const(f"{tag}", m), name=f"{tag}.cur")
        b = self.op("Mul", prev, self.const(f"{tag}.inv", (1.0 - m).astype(np.float32)), name=f"{tag}.prev")
        return self.op("Add", a, b, name=f"{tag}.mix")

    def decayed_sum(self, a: str, b: str, aa: str, bb: str, v: str, tag: str):
        """The WKV step in log space: q = max(a, b); (e^(a-q) aa + e^(b-q) v, e^(a-q) bb + e^(b-q))."""
        q = self.op("Max", a, b, name=f"{tag}.q")
        e1 = self.op("Exp", self.op("Sub", a, q, name=f"{tag}.d1"), name=f"{tag}.e1")
        e2 = self.op("Exp", self.op("Sub", b, q, name=f"{tag}.d2"), name=f"{tag}.e2")
        num = self.op(
            "Add",
            self.op("Mul", e1, aa, name=f"{tag}.e1aa"),
            self.op("Mul", e2, v, name=f"{tag}.e2v"),
            name=f"{tag}.num",
        )
        den = self.op("Add", self.op("Mul", e1, bb, name=f"{tag}.e1bb"), e2, name=f"{tag}.den")
        return q, num, den

    def matmul(self, w: np.ndarray, x: str, tag: str) -> str:
        return self.op("MatMul", self.const(f"{tag}.weight", w), x, name=tag)


def embed_graph(sd: Mapping[str, object]):
    from onnx import TensorProto

    g = _Builder()
    emb = g.const("emb.weight", _np(sd["emb.weight"]))
    row = g.op("Gather", emb, "token", name="emb", axis=0)
    y = g.layer_norm(row, _np(sd["blocks.0.ln0.weight"]), _np(sd["blocks.0.ln0.bias"]), "ln0")
    g.op("Reshape", y, g.const("flat", np.array([-1], np.int64)), name="flatten", out="output")
    c = _dims(sd["emb.weight"])[1]
    return g.model([_vi("token", TensorProto.INT32, [1])], [_vi("output", TensorProto.FLOAT, [c])], "embed")


def block_graph(sd: Mapping[str, object], i: int):
    from onnx import TensorProto

    p = block_params(sd, i)
    c = p["att.time_first"].shape[0]
    g = _Builder()
    rows = {}
    for r, row in enumerate(STATE_ROWS):
        rows[row] = g.op(
            "Gather", "state_in", g.const(f"row.{row}", np.array(r, np.int64)), name=f"state_in.{row}", axis=0
        )
    x = "input"
    # time mixing
    xx = g.layer_norm(x, p["ln1.weight"], p["ln1.bias"], "ln1")
    xk = g.mix(xx, rows["att_xx"], p["att.time_mix_k"], "att.mix_k")
    xv = g.mix(xx, rows["att_xx"], p["att.time_mix_v"], "att.mix_v")
    xr = g.mix(xx, rows["att_xx"], p["att.time_mix_r"], "att.mix_r")
    r = g.op("Sigmoid", g.matmul(p["att.receptance.weight"], xr, "att.receptance"), name="att.r")
    k = g.matmul(p["att.key.weight"], xk, "att.key")
    v = g.matmul(p["att.value.weight"], xv, "att.value")
    aa, bb, pp = rows["aa"], rows["bb"], rows["pp"]
    ww = g.op("Add", g.const("att.time_first", p["att.time_first"]), k, name="wkv.ww")
    _, num, den = g.decayed_sum(pp, ww, aa, bb, v, "wkv")
    wkv = g.op("Div", num, den, name="wkv.out")
    ww2 = g.op("Add", pp, g.const("att.time_decay", p["att.time_decay"]), name="state.ww")
    q2, aa2, bb2 = g.decayed_sum(ww2, k, aa, bb, v, "state")
    rwkv = g.op("Mul", r, wkv, name="att.rwkv")
    x = g.op("Add", x, g.matmul(p["att.output.weight"], rwkv, "att.output"), name="att.residual")
    # channel mixing
    xx2 = g.layer_norm(x, p["ln2.weight"], p["ln2.bias"], "ln2")
    fk = g.mix(xx2, rows["ffn_xx"], p["ffn.time_mix_k"], "ffn.mix_k")
    fr = g.mix(xx2, rows["ffn_xx"], p["ffn.time_mix_r"], "ffn.mix_r")
    fr = g.op("Sigmoid", g.matmul(p["ffn.receptance.weight"], fr, "ffn.receptance"), name="ffn.r")
    fk = g.op("Relu", g.matmul(p["ffn.key.weight"], fk, "ffn.key"), name="ffn.relu")
    fk = g.op("Mul", fk, fk, name="ffn.square")
    kv = g.matmul(p["ffn.value.weight"], fk, "ffn.value")
    g.op("Add", x, g.op("Mul", fr, kv, name="ffn.rkv"), name="ffn.residual", out="output")
    new = {"ffn_xx": xx2, "att_xx": xx, "aa": aa2, "bb": bb2, "pp": q2}
    axis0 = g.const("axis0", np.array([0], np.int64))
    parts = [g.op("Unsqueeze", new[row], axis0, name=f"state_out.{row}") for row in STATE_ROWS]
    g.op("Concat", *parts, name="state_out", out="state_out", axis=0)
    n = len(STATE_ROWS)
    return g.model(
        [_vi("input", TensorProto.FLOAT, [c]), _vi("state_in", TensorProto.FLOAT, [n, c])],
        [_vi("output", TensorProto.FLOAT, [c]), _vi("state_out", TensorProto.FLOAT, [n, c])],
        f"mixing_{i}",
    )


def head_graph(sd: Mapping[str, object]):
    from onnx import TensorProto

    g = _Builder()
    v, c = _dims(sd["head.weight"])
    y = g.layer_norm("x", _np(sd["ln_out.weight"]), _np(sd["ln_out.bias"]), "ln_out")
    g.op("MatMul", g.const("head.weight", _np(sd["head.weight"])), y, name="head", out="output")
    return g.model([_vi("x", TensorProto.FLOAT, [c])], [_vi("output", TensorProto.FLOAT, [v])], "head")
