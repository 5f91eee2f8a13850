"""RWKV-5.2 ("Eagle"): the one place that knows what an RWKV-5.2 model is.

The surface of ``rwkv6.py``, with RWKV-4's token-shift mixes and a decay that does not depend
on the token. One block per token (H heads of N channels)::

    xx = LN1(x);  x_j = xx*mix_j + att_shift*(1 - mix_j)           j = k, v, r, g
    r = x_r @ R;  k = x_k @ K;  v = x_v @ V;  g = silu(x_g @ G)
    per head: a = k v^T;  y = r (u*a + S);  S = a + diag(w) S        (S [key, value], fp32)
    x = x + (GroupNorm_H(y, eps 64e-5) * ln_x.w + ln_x.b) * g) @ O
    xx2 = LN2(x);  x = x + sigmoid(x_r @ Rf) * (relu(x_k @ Kf)^2 @ Vf)  (mixes as RWKV-4)

``time_decay`` is (H, N) and ``w = exp(-exp(time_decay))`` is a constant of the file (as
RWKV-4's ``-exp(time_decay)`` is); ``u`` is ``time_faaaa`` (H, N), used as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping, Tuple

import numpy as np

from rwkv2rknn.models import graph, rwkv6, slots
from rwkv2rknn.models.graph import dims
from rwkv2rknn.models.slots import *  # noqa: F403 - the surface the loader and export use
from rwkv2rknn.models.slots import LN_EPS, WKV_PREFIX

ARCH = "rwkv5"
VERSION = "5"
INTER_LAYER = ()
CPU_RECURRENCE_INPUTS = True  # the reshapes of r, k, v and the gate's silu stay with the recurrence
MIXES = ("k", "v", "r", "g")


block_io = slots.block_io_of(INTER_LAYER)  # (inputs, outputs) of mixing_{i}.onnx


@dataclass(frozen=True)
class Shape(slots.Shape):
    """Layers, widths and head size of an RWKV-5.2."""

    def layer_params(self, layer: int) -> Tuple[int, int]:
        c, f = self.width, self.ffn
        return 6 * c * c + 2 * c * f, 14 * c


description = slots.description_of(VERSION, INTER_LAYER)  # for rwkv2rknn-model.json


def shape_of(sd: Mapping[str, object]) -> Shape:
    layers, width, ffn, vocab = slots.base_dims(sd)
    decay = dims(sd["blocks.0.att.time_decay"]) if "blocks.0.att.time_decay" in sd else (0,)
    return Shape(layers, width, ffn, vocab, decay[-1] if len(decay) == 2 else 0, {})


def check_state_dict(sd: Mapping[str, object]) -> Shape:
    """Validate an RWKV-5.2 state dict; return its shape or raise a one-line UnsupportedModel."""
    shape = slots.checked_shape(sd, VERSION, "RWKV-5.2", shape_of, "blocks.0.att.time_decay")
    c, n = shape.width, shape.head_size

    def per_layer(i, b):
        out = {b + f"att.time_mix_{key}": (1, 1, c) for key in MIXES}
        out[b + "att.time_decay"] = out[b + "att.time_faaaa"] = (shape.heads, n)
        out[b + "ffn.time_mix_k"] = out[b + "ffn.time_mix_r"] = (1, 1, c)
        return out

    slots.check_shapes(
        sd, slots.expected_shapes(shape, rwkv6.PROJECTIONS, ("receptance",), per_layer), "RWKV-5.2"
    )
    return shape


def block_params(sd: Mapping[str, object], i: int) -> Dict[str, np.ndarray]:
    return slots.block_params(sd, i, flat=("time_faaaa", "time_decay"))


embed_graph, head_graph = slots.embed_graph, slots.head_graph


def block_graph(sd: Mapping[str, object], i: int):
    p = block_params(sd, i)
    h, n = dims(sd[f"blocks.{i}.att.time_decay"])
    g = graph.Builder()
    xx = g.layer_norm("input", p["ln1.weight"], p["ln1.bias"], "ln1", LN_EPS)
    # xx*m + shift*(1-m) == xx + (shift - xx)*(1-m)
    mixed = slots.shift_mix(g, xx, "att_shift", {m: 1.0 - p[f"att.time_mix_{m}"] for m in MIXES}, "att")[0]
    s = {
        "wkv": "wkv",
        **slots.projections(g, mixed, p),
        "w": g.const(WKV_PREFIX + "decay", np.exp(-np.exp(p["att.time_decay"])).astype(np.float32)),
    }
    return slots.gated_block_tail(g, p, s, h, n, i, xx, 1.0 - p["ffn.time_mix_k"], 1.0 - p["ffn.time_mix_r"])
