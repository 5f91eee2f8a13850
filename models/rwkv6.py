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

from rwkv2rknn.models import graph, slots
from rwkv2rknn.models.graph import dims
from rwkv2rknn.models.slots import *  # noqa: F403 - the surface the loader and export use
from rwkv2rknn.models.slots import LN_EPS, WKV_PREFIX

ARCH = "rwkv6"
VERSION = "6"
INTER_LAYER = ()
# Ops that only feed the recurrence (the decay's exp(-exp), the reshapes of r, k, v, the gate's
# silu) stay in fp32 on the CPU with it.
CPU_RECURRENCE_INPUTS = True
MAA = ("w", "k", "v", "r", "g")  # the order of time_maa_w2's first axis
PROJECTIONS = ("receptance", "key", "value", "gate", "output")


block_io = slots.block_io_of(INTER_LAYER)  # (inputs, outputs) of mixing_{i}.onnx


@dataclass(frozen=True)
class Shape(slots.Shape):
    """Layers, widths, head size and the LoRA widths (maa, decay) of an RWKV-6."""

    def layer_params(self, layer: int) -> Tuple[int, int]:
        c, f = self.width, self.ffn
        lora = 2 * 5 * c * self.lora.get("maa", 0) + 2 * c * self.lora.get("decay", 0)
        return 6 * c * c + 2 * c * f + lora, 16 * c


description = slots.description_of(VERSION, INTER_LAYER)  # for rwkv2rknn-model.json


def shape_of(sd: Mapping[str, object]) -> Shape:
    layers, width, ffn, vocab = slots.base_dims(sd)
    faaaa = dims(sd["blocks.0.att.time_faaaa"]) if "blocks.0.att.time_faaaa" in sd else (0, 0)
    lora = {}
    if "blocks.0.att.time_maa_w1" in sd:
        lora["maa"] = dims(sd["blocks.0.att.time_maa_w1"])[-1] // len(MAA)
    if "blocks.0.att.time_decay_w1" in sd:
        lora["decay"] = dims(sd["blocks.0.att.time_decay_w1"])[-1]
    return Shape(layers, width, ffn, vocab, faaaa[-1] if len(faaaa) == 2 else 0, lora)


def check_state_dict(sd: Mapping[str, object]) -> Shape:
    """Validate an RWKV-6 state dict; return its shape or raise a one-line UnsupportedModel."""
    shape = slots.checked_shape(sd, VERSION, "RWKV-6", shape_of, "blocks.0.att.time_faaaa")
    c, n = shape.width, shape.head_size
    d, d2 = shape.lora.get("maa", 0), shape.lora.get("decay", 0)

    def per_layer(i, b):
        out = {b + f"att.time_maa_{key}": (1, 1, c) for key in ("x",) + MAA}
        out[b + "att.time_decay"], out[b + "att.time_faaaa"] = (1, 1, c), (shape.heads, n)
        out[b + "att.time_maa_w1"], out[b + "att.time_maa_w2"] = (c, 5 * d), (5, d, c)
        out[b + "att.time_decay_w1"], out[b + "att.time_decay_w2"] = (c, d2), (d2, c)
        out[b + "ffn.time_maa_k"] = out[b + "ffn.time_maa_r"] = (1, 1, c)
        return out

    slots.check_shapes(sd, slots.expected_shapes(shape, PROJECTIONS, ("receptance",), per_layer), "RWKV-6")
    return shape


def block_params(sd: Mapping[str, object], i: int) -> Dict[str, np.ndarray]:
    return slots.block_params(sd, i, flat=("time_faaaa",))


embed_graph, head_graph = slots.embed_graph, slots.head_graph


def _decay(g: graph.Builder, p, lora: str) -> str:
    """``exp(-exp(time_decay + lora))`` (nodes ``wkv.*``, kept in fp32 on the CPU)."""
    w = g.op("Add", g.const(WKV_PREFIX + "time_decay", p["att.time_decay"]), lora, name=WKV_PREFIX + "w_add")
    w = g.op("Neg", g.op("Exp", w, name=WKV_PREFIX + "w_exp"), name=WKV_PREFIX + "w_neg")
    return g.op("Exp", w, name=WKV_PREFIX + "decay")


def block_graph(sd: Mapping[str, object], i: int):
    p = block_params(sd, i)
    h, n = dims(sd[f"blocks.{i}.att.time_faaaa"])
    d = p["att.time_maa_w1"].shape[1] // len(MAA)
    g = graph.Builder()
    xx = g.layer_norm("input", p["ln1.weight"], p["ln1.bias"], "ln1", LN_EPS)
    mix_x, delta = slots.shift_mix(g, xx, "att_shift", {"x": p["att.time_maa_x"]}, "att")
    xxx = mix_x["x"]
    mixed = {}
    for j, m in enumerate(MAA):  # five LoRA chains: x_j = xx + d * (maa_j + m_j)
        lora = g.rows(
            xxx,
            [p["att.time_maa_w1"][:, j * d : (j + 1) * d], p["att.time_maa_w2"][j]],
            f"att.maa_{m}",
            acts=("Tanh",),
        )
        amount = g.op(
            "Add", g.const(f"att.time_maa_{m}", p[f"att.time_maa_{m}"]), lora, name=f"att.maa_{m}.add"
        )
        mixed[m] = g.op("Add", xx, g.op("Mul", delta, amount, name=f"att.mix_{m}.d"), name=f"att.mix_{m}")
    s = {
        "wkv": "wkv",
        **slots.projections(g, mixed, p),
        "w": g.rows(
            mixed["w"], [p["att.time_decay_w1"], p["att.time_decay_w2"]], "att.decay_lora", acts=("Tanh",)
        ),
    }
    s["w"] = _decay(g, p, s["w"])
    return slots.gated_block_tail(g, p, s, h, n, i, xx, p["ffn.time_maa_k"], p["ffn.time_maa_r"])
