"""RWKV-7 ("Goose"): the one place that knows what an RWKV-7 model is.

The same surface as ``rwkv4.py``: ``ARCH``, ``Shape``/``shape_of``, ``check_state_dict``, the
per-layer file names and I/O, the state slots, and ``embed_graph``/``block_graph``/``head_graph``.

The per-token recurrence of one block (H heads of N channels, C = H*N; ``@ W`` is a row
vector times a stored matrix, the LoRA pairs are stored (in, out))::

    xx = LN1(x);  d = att_shift - xx;  x_r = xx + d*mix_r   (same for w, k, v, a, g)
    r = x_r @ R;  k = x_k @ K;  v = x_v @ V
    w = exp(-0.606531 * sigmoid(w0 + tanh(x_w @ w1) @ w2))
    a = sigmoid(a0 + (x_a @ a1) @ a2);  g = sigmoid(x_g @ g1) @ g2
    kk = L2-normalise(k * k_k) per head;  k = k * (1 + (a - 1) * k_a)
    layer 0: v_first = v;  later: v = v + (v_first - v) * sigmoid(v0 + (x_v @ v1) @ v2)
    per head: S = S diag(w) - (S kk)(kk*a)^T + v k^T;  y = S r      (S [value, key], fp32)
    y = GroupNorm_H(y, eps 64e-5) * ln_x.w + ln_x.b + sum(r*k*r_k per head) * v
    x = x + (y * g) @ O
    xx2 = LN2(x);  x_k = xx2 + (ffn_shift - xx2)*ffn.x_k;  x = x + relu(x_k @ Kf)^2 @ Vf
    att_shift' = xx;  ffn_shift' = xx2

Per-layer files (``mixing_{i}.onnx``): inputs ``input`` [C], ``v_first`` [C] (layers >= 1),
``att_shift`` [C], ``wkv`` [H, N, N], ``ffn_shift`` [C]; outputs ``output`` [C], ``v_first``
[C] (layer 0 only), ``att_shift_out``, ``wkv_out``, ``ffn_shift_out``. ``v_first`` is an
inter-layer value (layer 0's value vector, read by every later layer in the same token), not a
state. Every projection is a constant-weight MatMul in row form (``x[1, K] @ W[K, N]``); the nodes
of the wkv step are named ``wkv.*`` (the fp16 export keeps them in fp32). The wkv step is written
in few, large ops (``_wkv``): every op of a token is a barrier of onnxruntime's thread pool, and
every state-sized temporary a pass over 16 KB a head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping, Tuple

import numpy as np

from rwkv2rknn.errors import UnsupportedModel
from rwkv2rknn.models import graph, slots
from rwkv2rknn.models.graph import dims
from rwkv2rknn.models.slots import *  # noqa: F403 - the surface the loader and export use
from rwkv2rknn.models.slots import GN_EPS, LN_EPS, OUT_SUFFIX, WKV_PREFIX

ARCH = "rwkv7"
VERSION = "7"
DECAY_SCALE = -0.606531  # -exp(-0.5)
NORM_EPS = 1e-12  # torch.nn.functional.normalize

V_FIRST = "v_first"
INTER_LAYER = (V_FIRST,)
# The compiler keeps in fp32 on the CPU every op that only feeds the recurrence (the decay's
# sigmoid and exp, the kk norm, the k and v adjustments, the bonus), not only the ops downstream
# of the wkv state: the NPU segments then hold the projections and their row-wise neighbours.
CPU_RECURRENCE_INPUTS = True

LORAS = ("w", "a", "v", "g")  # att.{w,a,v,g}1 (C, D) and att.{w,a,v,g}2 (D, C)
_VEC = ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "k_k", "k_a")


block_io = slots.block_io_of(INTER_LAYER)  # (inputs, outputs) of mixing_{i}.onnx


@dataclass(frozen=True)
class Shape(slots.Shape):
    """Layers, widths, head size and the LoRA widths (w, a, v, g) of an RWKV-7."""

    def layer_params(self, layer: int) -> Tuple[int, int]:
        c, f = self.width, self.ffn
        lora = sum(2 * c * d for name, d in self.lora.items() if layer or name != "v")
        return 4 * c * c + 2 * c * f + lora, (19 if layer else 18) * c


description = slots.description_of(VERSION, INTER_LAYER)  # for rwkv2rknn-model.json


def shape_of(sd: Mapping[str, object]) -> Shape:
    layers, width, ffn, vocab = slots.base_dims(sd)
    heads, head_size = dims(sd["blocks.0.att.r_k"]) if "blocks.0.att.r_k" in sd else (0, 0)
    lora = {}
    for name in LORAS:
        key = f"blocks.{1 if name == 'v' and layers > 1 else 0}.att.{name}1"
        if key in sd:
            lora[name] = dims(sd[key])[-1]
    return Shape(layers, width, ffn, vocab, head_size, lora)


def check_state_dict(sd: Mapping[str, object]) -> Shape:
    """Validate an RWKV-7 state dict; return its shape or raise a one-line UnsupportedModel."""
    shape = slots.checked_shape(sd, VERSION, "RWKV-7", shape_of, "blocks.0.att.r_k")
    c, n = shape.width, shape.head_size
    missing = [x for x in LORAS if x not in shape.lora]
    if missing:
        raise UnsupportedModel(
            f"not an RWKV-7 checkpoint: no 'att.{missing[0]}1' LoRA matrix",
            "give an official RWKV-7 .pth checkpoint",
        )

    def per_layer(i, b):
        out = {b + "att." + key: (1, 1, c) for key in _VEC}
        out[b + "ffn.x_k"], out[b + "att.r_k"] = (1, 1, c), (shape.heads, n)
        for name, d in shape.lora.items():
            if i or name != "v":
                out[b + f"att.{name}1"], out[b + f"att.{name}2"] = (c, d), (d, c)
        if i:
            out[b + "att.v0"] = (1, 1, c)
        return out

    slots.check_shapes(
        sd, slots.expected_shapes(shape, ("receptance", "key", "value", "output"), (), per_layer), "RWKV-7"
    )
    return shape


def block_params(sd: Mapping[str, object], i: int) -> Dict[str, np.ndarray]:
    return slots.block_params(sd, i, flat=("r_k",))


# --------------------------------------------------------------------------------------------
# ONNX graphs


embed_graph, head_graph = slots.embed_graph, slots.head_graph


def _wkv(g: graph.Builder, p, s: Dict[str, str], h: int, n: int, first: bool) -> str:
    """The recurrence of one block (nodes named ``wkv.*``): the new state goes to ``wkv_out``;
    returns ``(GroupNorm(y) + bonus) * g`` as a row [1, C].

    The vectors arrive in the layout their state product wants, straight from their projection's
    Reshape: ``r`` and ``v`` (and the v LoRA) as columns [H, N, 1], ``k`` and the w and a LoRA
    outputs as rows [H, 1, N]; ``g`` is the gate row [1, C]. The per-head work then needs no
    Reshape but the kk column, the v_first column, and the GroupNorm's [1, H, N] view (one
    InstanceNormalization, ln_x applied after it)."""
    c = h * n
    row, col, view = [h, 1, n], [h, n, 1], [1, h, n]

    def op(kind, *ins, tag, **kw):
        return g.op(kind, *ins, name=WKV_PREFIX + tag, **kw)

    def k_(name, value, shape=()):
        return g.const(WKV_PREFIX + name, np.asarray(value, np.float32).reshape(shape))

    def shaped(x, shape, tag):
        return g.reshape(x, shape, WKV_PREFIX + tag)

    w = op("Sigmoid", op("Add", k_("w0", p["att.w0"], row), s["w"], tag="w_add"), tag="w_sigmoid")
    w = op("Exp", op("Mul", w, k_("decay_scale", DECAY_SCALE), tag="w_scale"), tag="decay")
    a = op("Sigmoid", op("Add", k_("a0", p["att.a0"], row), s["a"], tag="a_add"), tag="a")
    kk = op("Mul", s["k"], k_("k_k", p["att.k_k"], row), tag="kk")
    norm = op("ReduceL2", kk, tag="kk_norm", axes=[-1], keepdims=1)
    norm = op("Max", norm, k_("norm_eps", NORM_EPS), tag="kk_norm_eps")
    kk = op("Div", kk, norm, tag="kk_unit")
    # -k = k * ((k_a - 1) - a * k_a): k's scale 1 + (a - 1) * k_a with its constants negated
    # (one op fewer than as written, the sign for free); -k is what the state update and the
    # bonus (r_k negated) read
    k_a = p["att.k_a"]
    scale = op(
        "Add", k_("k_a_m1", k_a - 1.0, row), op("Mul", a, k_("neg_k_a", -k_a, row), tag="a_ka"), tag="k_scale"
    )
    neg_k = op("Mul", s["k"], scale, tag="neg_k")
    v = s["v"]
    if not first:
        mix = op("Sigmoid", op("Add", k_("v0", p["att.v0"], col), s["vl"], tag="v_add"), tag="v_mix")
        v_first = shaped(s[V_FIRST], col, "v_first_col")
        v = op("Add", v, op("Mul", op("Sub", v_first, v, tag="v_delta"), mix, tag="v_d"), tag="v")
    # S' = S diag(w) - (S kk)(kk a)^T + v k^T = S diag(w) - [S kk, v] @ [kk a; -k]: the two
    # rank-one terms in one [N, 2] x [2, N] product: 3 state-sized temporaries a layer, not 5
    state = s["wkv"]
    s_kk = op("MatMul", state, shaped(kk, col, "kk_col"), tag="S_kk")
    left = op("Concat", s_kk, v, tag="left", axis=-1)
    right = op("Concat", op("Mul", kk, a, tag="kk_a"), neg_k, tag="right", axis=-2)
    update = op("MatMul", left, right, tag="S_update")
    new = op("Sub", op("Mul", state, w, tag="S_decay"), update, tag="S_new")
    g.op("Identity", new, name="state.wkv_out", out="wkv" + OUT_SUFFIX)
    y = shaped(op("MatMul", new, s["r"], tag="y"), view, "y_view")
    y = op(
        "InstanceNormalization",
        y,
        k_("ln_x.one", np.ones(h), (h,)),
        k_("ln_x.zero", np.zeros(h), (h,)),
        tag="ln_x.norm",
        epsilon=GN_EPS,
    )
    y = op("Mul", y, k_("ln_x.weight", p["att.ln_x.weight"], view), tag="ln_x.scale")
    y = op("Add", y, k_("ln_x.bias", p["att.ln_x.bias"], view), tag="ln_x.shift")
    # the bonus sum(r * k * r_k per head) * v: the per-head sum as a [1, N] x [N, 1] product
    rk = op("MatMul", neg_k, op("Mul", s["r"], k_("neg_r_k", -p["att.r_k"], col), tag="r_rk"), tag="rkr_sum")
    bonus = shaped(op("Mul", v, rk, tag="bonus"), view, "bonus_view")
    y = shaped(op("Add", y, bonus, tag="y_bonus"), [1, c], "y_row")
    return op("Mul", y, s["g"], tag="gated")


def block_graph(sd: Mapping[str, object], i: int):
    p = block_params(sd, i)
    c = p["ln1.weight"].shape[0]
    h, n = dims(sd[f"blocks.{i}.att.r_k"])
    first = i == 0
    g = graph.Builder()
    x = "input"
    xx = g.layer_norm(x, p["ln1.weight"], p["ln1.bias"], "ln1", LN_EPS)
    mixed, _ = slots.shift_mix(g, xx, "att_shift", {m: p[f"att.x_{m}"] for m in "rwkvag"}, "att")
    row, col = [h, 1, n], [h, n, 1]
    v_row = g.reshape(mixed["v"], [1, c], "att.v_to_row")  # read by the value and the v LoRA
    s = {
        "wkv": "wkv",
        V_FIRST: V_FIRST,
        "r": g.rows(mixed["r"], [p["att.receptance.weight"]], "att.receptance", shape=col),
        "w": g.rows(mixed["w"], [p["att.w1"], p["att.w2"]], "att.w_lora", acts=("Tanh",), shape=row),
        "k": g.rows(mixed["k"], [p["att.key.weight"]], "att.key", shape=row),
        "a": g.rows(mixed["a"], [p["att.a1"], p["att.a2"]], "att.a_lora", shape=row),
        "g": g.rows(mixed["g"], [p["att.g1"], p["att.g2"]], "att.g_lora", acts=("Sigmoid",), shape=[1, c]),
    }
    if first:  # the value vector is also the block's v_first output
        v = g.rows(v_row, [p["att.value.weight"]], "att.value", out=V_FIRST, row_in=True)
        s["v"] = g.reshape(v, col, "att.value.to_heads")
    else:
        s["v"] = g.rows(v_row, [p["att.value.weight"]], "att.value", shape=col, row_in=True)
        s["vl"] = g.rows(v_row, [p["att.v1"], p["att.v2"]], "att.v_lora", shape=col, row_in=True)
    out = _wkv(g, p, s, h, n, first)
    x = g.op("Add", x, g.rows(out, [p["att.output.weight"]], "att.output", row_in=True), name="att.residual")
    xx2 = g.layer_norm(x, p["ln2.weight"], p["ln2.bias"], "ln2", LN_EPS)
    fk = slots.shift_mix(g, xx2, "ffn_shift", {"k": p["ffn.x_k"]}, "ffn")[0]["k"]
    kv = slots.squared_relu(g, fk, p["ffn.key.weight"], p["ffn.value.weight"])
    g.op("Add", x, kv, name="ffn.residual", out="output")
    return slots.block_model(g, i, c, h, n, INTER_LAYER, xx, xx2)
