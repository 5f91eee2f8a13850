"""RWKV-6 ("Finch"): the one place that knows what an RWKV-6 model is.

The surface of ``rwkv7.py`` (shape, checkpoint check, per-layer graphs with the named state
slots of ``slots.py``; no inter-layer values). One block per token (H heads of N channels;
``@ W`` is a row vector times a stored matrix; ``time_maa_w1`` is (C, 5D), ``time_maa_w2``
(5, D, C) in the order w, k, v, r, g)::

    xx = LN1(x);  d = att_shift - xx;  xxx = xx + d*maa_x
    m_j = tanh(xxx @ maa_w1[:, jD:(j+1)D]) @ maa_w2[j]           j = w, k, v, r, g
    x_j = xx + d*(maa_j + m_j)
    r = x_r @ R;  k = x_k @ K;  v = x_v @ V;  g = silu(x_g @ G)
    w = exp(-exp(time_decay + tanh(x_w @ decay_w1) @ decay_w2))
    per head: a = k v^T;  y = r (u*a + S);  S = a + diag(w) S        (S [key, value], fp32)
    x = x + (GroupNorm_H(y, eps 64e-5) * ln_x.w + ln_x.b) * g) @ O
    xx2 = LN2(x);  x_k, x_r mixed with ffn_shift;  x = x + sigmoid(x_r @ Rf) * (relu(x_k @ Kf)^2 @ Vf)

``u`` is ``time_faaaa`` (H, N), used as it is. The five maa LoRA chains are five MatMul pairs
(the tanh is elementwise, so splitting ``maa_w1`` by columns is exact): every projection is a
constant-weight row-form MatMul the NPU takes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping, Tuple

import numpy as np

from rwkv2rknn.errors import UnsupportedModel
from rwkv2rknn.models import graph, rwkv4, slots
from rwkv2rknn.models.graph import as_np, dims
from rwkv2rknn.models.slots import (LN_EPS, OUT_SUFFIX, STATE_IO, STATE_SLOTS,  # noqa: F401
                                    WKV_PREFIX, fp32_nodes)  # the surface the loader and export use

ARCH = "rwkv6"
VERSION = "6"
EMBED_FILE, HEAD_FILE, BLOCK_FILE = rwkv4.EMBED_FILE, rwkv4.HEAD_FILE, rwkv4.BLOCK_FILE
EMBED_IO, HEAD_IO = rwkv4.EMBED_IO, rwkv4.HEAD_IO
INTER_LAYER = ()
# Ops that only feed the recurrence (the decay's exp(-exp), the reshapes of r, k, v, the gate's
# silu) stay in fp32 on the CPU with it.
CPU_RECURRENCE_INPUTS = True
MAA = ("w", "k", "v", "r", "g")  # the order of time_maa_w2's first axis


def block_io(i: int) -> Tuple[Tuple[str, ...], Tuple[str, ...]]:
    return slots.block_io(i, INTER_LAYER)


@dataclass(frozen=True)
class Shape(slots.Shape):
    """Layers, widths, head size and the LoRA widths (maa, decay) of an RWKV-6."""

    def layer_params(self, layer: int) -> Tuple[int, int]:
        c, f = self.width, self.ffn
        lora = 2 * 5 * c * self.lora.get("maa", 0) + 2 * c * self.lora.get("decay", 0)
        return 6 * c * c + 2 * c * f + lora, 16 * c


def description(shape: Shape) -> dict:
    return slots.description(VERSION, shape, INTER_LAYER)


def shape_of(sd: Mapping[str, object]) -> Shape:
    layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    vocab, width = dims(sd["emb.weight"])
    ffn = dims(sd["blocks.0.ffn.key.weight"])[0] if "blocks.0.ffn.key.weight" in sd else 0
    faaaa = dims(sd["blocks.0.att.time_faaaa"]) if "blocks.0.att.time_faaaa" in sd else (0, 0)
    lora = {}
    if "blocks.0.att.time_maa_w1" in sd:
        lora["maa"] = dims(sd["blocks.0.att.time_maa_w1"])[-1] // len(MAA)
    if "blocks.0.att.time_decay_w1" in sd:
        lora["decay"] = dims(sd["blocks.0.att.time_decay_w1"])[-1]
    return Shape(layers, width, ffn, vocab, faaaa[-1] if len(faaaa) == 2 else 0, lora)


def check_state_dict(sd: Mapping[str, object]) -> Shape:
    """Validate an RWKV-6 state dict; return its shape or raise a one-line UnsupportedModel."""
    version = rwkv4.detect_version(sd)
    if version != VERSION:
        raise UnsupportedModel(f"not an RWKV-6 checkpoint (it looks like RWKV-{version})",
                               "give an official RWKV-6 .pth checkpoint")
    shape = shape_of(sd)
    c, f, v, n = shape.width, shape.ffn, shape.vocab, shape.head_size
    if n <= 0 or c % n:
        raise UnsupportedModel("RWKV-6 'blocks.0.att.time_faaaa' does not split the width into "
                               "heads", "the checkpoint is damaged")
    d, d2 = shape.lora.get("maa", 0), shape.lora.get("decay", 0)
    expected = {"emb.weight": (v, c), "blocks.0.ln0.weight": (c,), "blocks.0.ln0.bias": (c,),
                "ln_out.weight": (c,), "ln_out.bias": (c,), "head.weight": (v, c)}
    for i in range(shape.layers):
        b = f"blocks.{i}."
        for key in ("ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias", "att.ln_x.weight",
                    "att.ln_x.bias"):
            expected[b + key] = (c,)
        for key in ("x",) + MAA:
            expected[b + f"att.time_maa_{key}"] = (1, 1, c)
        expected[b + "att.time_decay"] = (1, 1, c)
        expected[b + "att.time_faaaa"] = (shape.heads, n)
        expected[b + "att.time_maa_w1"], expected[b + "att.time_maa_w2"] = (c, 5 * d), (5, d, c)
        expected[b + "att.time_decay_w1"], expected[b + "att.time_decay_w2"] = (c, d2), (d2, c)
        for key in ("receptance", "key", "value", "gate", "output"):
            expected[b + f"att.{key}.weight"] = (c, c)
        expected[b + "ffn.time_maa_k"] = expected[b + "ffn.time_maa_r"] = (1, 1, c)
        expected[b + "ffn.key.weight"], expected[b + "ffn.value.weight"] = (f, c), (c, f)
        expected[b + "ffn.receptance.weight"] = (c, c)
    error = graph.shape_error(sd, expected, "RWKV-6")
    if error is not None:
        raise error
    return shape


def block_params(sd: Mapping[str, object], i: int) -> Dict[str, np.ndarray]:
    """Layer ``i``'s tensors by their name after ``blocks.{i}.``: vectors flat, projections
    transposed to (in, out), the LoRA matrices as stored."""
    prefix = f"blocks.{i}."
    p = {}
    for key, t in sd.items():
        if key.startswith(prefix):
            name, arr = key[len(prefix):], as_np(t)
            if name.endswith(".weight") and arr.ndim == 2:
                arr = arr.T
            elif arr.shape[:2] == (1, 1) or name.endswith("time_faaaa"):
                arr = arr.reshape(-1)
            p[name] = np.ascontiguousarray(arr)
    return p


# --------------------------------------------------------------------------------------------
# ONNX graphs


def embed_graph(sd: Mapping[str, object]):
    return rwkv4.embed_graph(sd)


def head_graph(sd: Mapping[str, object]):
    return slots.head_graph(sd)


def _wkv(g: graph.Builder, p, s: Dict[str, str], h: int, n: int) -> str:
    """The recurrence (nodes ``wkv.*``): new state to ``wkv_out``; returns GroupNorm(y) * g."""
    def op(kind, *ins, tag, **kw):
        return g.op(kind, *ins, name=WKV_PREFIX + tag, **kw)

    def shaped(x, shape, tag):
        return g.reshape(x, shape, WKV_PREFIX + tag)

    w = op("Add", g.const(WKV_PREFIX + "time_decay", p["att.time_decay"]), s["w"], tag="w_add")
    w = op("Exp", op("Neg", op("Exp", w, tag="w_exp"), tag="w_neg"), tag="decay")
    a = op("MatMul", shaped(s["k"], [h, n, 1], "k_col"), shaped(s["v"], [h, 1, n], "v_row"),
           tag="kv")
    u = g.const(WKV_PREFIX + "time_faaaa", p["att.time_faaaa"].reshape(h, n, 1))
    y = op("MatMul", shaped(s["r"], [h, 1, n], "r_row"),
           op("Add", op("Mul", u, a, tag="ua"), s["wkv"], tag="ua_S"), tag="y")
    new = op("Add", a, op("Mul", shaped(w, [h, n, 1], "w_col"), s["wkv"], tag="S_decay"),
             tag="S_new")
    g.op("Identity", new, name="state.wkv_out", out="wkv" + OUT_SUFFIX)
    y = slots.group_norm(g, shaped(y, [h * n], "y_flat"), h, n, p["att.ln_x.weight"],
                         p["att.ln_x.bias"], WKV_PREFIX + "ln_x")
    gate = op("Mul", s["g"], op("Sigmoid", s["g"], tag="g_sigmoid"), tag="g_silu")
    return op("Mul", y, gate, tag="gated")


def block_graph(sd: Mapping[str, object], i: int):
    p = block_params(sd, i)
    c = p["ln1.weight"].shape[0]
    h, n = dims(sd[f"blocks.{i}.att.time_faaaa"])
    d = p["att.time_maa_w1"].shape[1] // len(MAA)
    g = graph.Builder()
    x = "input"
    xx = g.layer_norm(x, p["ln1.weight"], p["ln1.bias"], "ln1", LN_EPS)
    mix_x, delta = slots.shift_mix(g, xx, "att_shift", {"x": p["att.time_maa_x"]}, "att")
    xxx = mix_x["x"]
    mixed = {}
    for j, m in enumerate(MAA):
        lora = g.rows(xxx, [p["att.time_maa_w1"][:, j * d:(j + 1) * d], p["att.time_maa_w2"][j]],
                      f"att.maa_{m}", acts=("Tanh",))
        amount = g.op("Add", g.const(f"att.time_maa_{m}", p[f"att.time_maa_{m}"]), lora,
                      name=f"att.maa_{m}.add")
        mixed[m] = g.op("Add", xx, g.op("Mul", delta, amount, name=f"att.mix_{m}.d"),
                        name=f"att.mix_{m}")
    s = {"wkv": "wkv",
         "r": g.rows(mixed["r"], [p["att.receptance.weight"]], "att.receptance"),
         "k": g.rows(mixed["k"], [p["att.key.weight"]], "att.key"),
         "v": g.rows(mixed["v"], [p["att.value.weight"]], "att.value"),
         "g": g.rows(mixed["g"], [p["att.gate.weight"]], "att.gate"),
         "w": g.rows(mixed["w"], [p["att.time_decay_w1"], p["att.time_decay_w2"]], "att.decay_lora",
                     acts=("Tanh",))}
    out = _wkv(g, p, s, h, n)
    x = g.op("Add", x, g.rows(out, [p["att.output.weight"]], "att.output"), name="att.residual")
    xx2 = g.layer_norm(x, p["ln2.weight"], p["ln2.bias"], "ln2", LN_EPS)
    fm = slots.shift_mix(g, xx2, "ffn_shift", {"k": p["ffn.time_maa_k"], "r": p["ffn.time_maa_r"]},
                         "ffn")[0]
    fr = g.op("Sigmoid", g.rows(fm["r"], [p["ffn.receptance.weight"]], "ffn.receptance"),
              name="ffn.r")
    kv = slots.squared_relu(g, fm["k"], p["ffn.key.weight"], p["ffn.value.weight"])
    g.op("Add", x, g.op("Mul", fr, kv, name="ffn.rkv"), name="ffn.residual", out="output")
    return slots.block_model(g, i, c, h, n, INTER_LAYER, xx, xx2)
