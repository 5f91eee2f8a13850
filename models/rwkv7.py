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
of the wkv step are named ``wkv.*`` (the fp16 export keeps them in fp32).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping, Tuple

import numpy as np

from rwkv2rknn.errors import UnsupportedModel
from rwkv2rknn.models import graph, slots
from rwkv2rknn.models.graph import dims
from rwkv2rknn.models.slots import *  # noqa: F403 - the surface the loader and export use
from rwkv2rknn.models.slots import LN_EPS, OUT_SUFFIX, WKV_PREFIX

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
    returns ``(GroupNorm(y) + bonus) * g``."""
    c = h * n

    def op(kind, *ins, tag, **kw):
        return g.op(kind, *ins, name=WKV_PREFIX + tag, **kw)

    def k_(name, value):
        return g.const(WKV_PREFIX + name, np.asarray(value, np.float32))

    def shaped(x, shape, tag):
        return g.reshape(x, shape, WKV_PREFIX + tag)

    w = op("Sigmoid", op("Add", k_("w0", p["att.w0"]), s["w"], tag="w_add"), tag="w_sigmoid")
    w = op("Exp", op("Mul", w, k_("decay_scale", DECAY_SCALE), tag="w_scale"), tag="decay")
    a = op("Sigmoid", op("Add", k_("a0", p["att.a0"]), s["a"], tag="a_add"), tag="a")
    kk = shaped(op("Mul", s["k"], k_("k_k", p["att.k_k"]), tag="kk"), [h, n], "kk_heads")
    sq = op(
        "ReduceSum",
        op("Mul", kk, kk, tag="kk_sq"),
        g.const(WKV_PREFIX + "axis", np.array([-1], np.int64)),
        tag="kk_sumsq",
        keepdims=1,
    )
    norm = op("Max", op("Sqrt", sq, tag="kk_norm"), k_("norm_eps", NORM_EPS), tag="kk_norm_eps")
    kk = shaped(op("Div", kk, norm, tag="kk_unit"), [c], "kk_flat")
    one = k_("one", 1.0)
    k = op(
        "Mul",
        s["k"],
        op(
            "Add",
            one,
            op("Mul", op("Sub", a, one, tag="a_m1"), k_("k_a", p["att.k_a"]), tag="a_ka"),
            tag="k_scale",
        ),
        tag="k",
    )
    v = s["v"]
    if not first:
        mix = op("Sigmoid", op("Add", k_("v0", p["att.v0"]), s["vl"], tag="v_add"), tag="v_mix")
        v = op("Add", v, op("Mul", op("Sub", s[V_FIRST], v, tag="v_delta"), mix, tag="v_d"), tag="v")
    state = s["wkv"]
    decayed = op("Mul", state, shaped(w, [h, 1, n], "w_row"), tag="S_decay")
    s_kk = op("MatMul", state, shaped(kk, [h, n, 1], "kk_col"), tag="S_kk")
    kka = shaped(op("Mul", kk, a, tag="kk_a"), [h, 1, n], "kka_row")
    removed = op("Sub", decayed, op("MatMul", s_kk, kka, tag="S_kk_kka"), tag="S_remove")
    vk = op("MatMul", shaped(v, [h, n, 1], "v_col"), shaped(k, [h, 1, n], "k_row"), tag="vk")
    new = op("Add", removed, vk, tag="S_new")
    g.op("Identity", new, name="state.wkv_out", out="wkv" + OUT_SUFFIX)
    y = op("MatMul", new, shaped(s["r"], [h, n, 1], "r_col"), tag="y")
    y = slots.group_norm(
        g, shaped(y, [c], "y_flat"), h, n, p["att.ln_x.weight"], p["att.ln_x.bias"], WKV_PREFIX + "ln_x"
    )
    rk = shaped(
        op("Mul", op("Mul", s["r"], k, tag="rk"), k_("r_k", p["att.r_k"]), tag="rkr"), [h, n], "rkr_heads"
    )
    bonus = op(
        "Mul",
        op(
            "ReduceSum",
            rk,
            g.const(WKV_PREFIX + "axis2", np.array([-1], np.int64)),
            tag="bonus_sum",
            keepdims=1,
        ),
        shaped(v, [h, n], "v_heads"),
        tag="bonus",
    )
    y = op("Add", y, shaped(bonus, [c], "bonus_flat"), tag="y_bonus")
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
    s = {
        "wkv": "wkv",
        V_FIRST: V_FIRST,
        "r": g.rows(mixed["r"], [p["att.receptance.weight"]], "att.receptance"),
        "w": g.rows(mixed["w"], [p["att.w1"], p["att.w2"]], "att.w_lora", acts=("Tanh",)),
        "k": g.rows(mixed["k"], [p["att.key.weight"]], "att.key"),
        "v": g.rows(mixed["v"], [p["att.value.weight"]], "att.value", out=V_FIRST if first else ""),
        "a": g.rows(mixed["a"], [p["att.a1"], p["att.a2"]], "att.a_lora"),
        "g": g.rows(mixed["g"], [p["att.g1"], p["att.g2"]], "att.g_lora", acts=("Sigmoid",)),
    }
    if not first:
        s["vl"] = g.rows(mixed["v"], [p["att.v1"], p["att.v2"]], "att.v_lora")
    out = _wkv(g, p, s, h, n, first)
    x = g.op("Add", x, g.rows(out, [p["att.output.weight"]], "att.output"), name="att.residual")
    xx2 = g.layer_norm(x, p["ln2.weight"], p["ln2.bias"], "ln2", LN_EPS)
    fk = slots.shift_mix(g, xx2, "ffn_shift", {"k": p["ffn.x_k"]}, "ffn")[0]["k"]
    kv = slots.squared_relu(g, fk, p["ffn.key.weight"], p["ffn.value.weight"])
    g.op("Add", x, kv, name="ffn.residual", out="output")
    return slots.block_model(g, i, c, h, n, INTER_LAYER, xx, xx2)
