"""RWKV-7 ("Goose") in torch: the torch definition the RWKV-7 byte model is trained with
(``train.py --version 7``).

Module and parameter names give the official RWKV-7 state-dict keys and shapes, the ones
``rwkv2rknn.models.rwkv7`` checks and the `rwkv` package loads (``RWKV_V7_ON=1``):
``blocks.N.att.{x_r,x_w,x_k,x_v,x_a,x_g,w0,a0,v0,k_k,k_a}`` [1, 1, C], ``att.r_k`` [H, N], the
LoRA pairs ``att.{w,a,v,g}1`` (C, D) and ``att.{w,a,v,g}2`` (D, C) used as ``x @ W`` (layer 0 has
no v0/v1/v2), ``att.{receptance,key,value,output}.weight`` [out, in], ``att.ln_x`` (GroupNorm of H
groups, eps 64e-5), ``ffn.x_k``, ``ffn.key.weight`` [F, C], ``ffn.value.weight`` [C, F]. The math
is the one in ``rwkv2rknn/models/rwkv7.py``'s docstring.

The model runs on windows ``idx`` [B, T] from a carried state; every linear map and elementwise
step takes all T rows at once, and the wkv recurrence runs token by token over the window in the
state's dtype (fp32 for training; no chunked form): per head ``S <- S diag(w) - (S kk)(kk*a)^T +
v k^T``, ``y = S r``, with S stored [value, key] as in the package's state. ``steps`` (one token
per call, the state carried) is the same code with T = 1.

A layer's state is ``(att_shift [B, C], wkv [B, H, N, N], ffn_shift [B, C])``, the order of
``rwkv2rknn.models.slots.STATE_SLOTS``.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from rwkv2rknn.models import rwkv7
from rwkv4_torch import LN_EPS, Linear, _shift  # noqa: E402  (training/, beside this file)

GN_EPS = 64e-5
MIXES = ("r", "w", "k", "v", "a", "g")
State = List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def lora_widths(width: int, lora: Optional[Dict[str, int]] = None) -> Dict[str, int]:
    """LoRA widths (w, a, v, g): 32 each by default (the reference suggests 32/32/32/64 at width
    256; the gate's is halved to stay within the RWKV-4 byte model's parameter count)."""
    return {"w": 32, "a": 32, "v": 32, "g": 32, **(lora or {})}


def wkv_seq(r, w, k, v, kk, a, state):
    """The recurrence over a window: r, w, k, v, kk, a [B, T, H, N], state [B, H, N, N] (value,
    key) -> (y [B, T, H, N], the state after the last token). Token by token, in state's dtype."""
    B, T, H, N = r.shape
    dt = state.dtype
    bh = lambda t: t.to(dt).reshape(B, T, H, N).transpose(0, 1).reshape(T, B * H, N)  # noqa: E731
    r_, w_, k_, v_, kk_, a_ = (bh(t) for t in (r, w, k, v, kk, a))
    # S_new = S * w_row + [S kk, v] @ [-(kk*a); k]: one batched product per token
    rows = torch.stack([-(kk_ * a_), k_], 2)  # [T, BH, 2, N]
    s = state.reshape(B * H, N, N)
    out = []
    for t in range(T):
        sa = torch.bmm(s, kk_[t, :, :, None])  # [BH, N, 1]
        s = torch.baddbmm(s * w_[t, :, None, :], torch.cat([sa, v_[t, :, :, None]], 2), rows[t])
        out.append(torch.bmm(s, r_[t, :, :, None]))
    y = torch.stack(out, 0).reshape(T, B, H, N).transpose(0, 1)
    return y, s.reshape(B, H, N, N)


def wkv_chunked(r, lw, k, v, kk, a, state, chunk: int = 16):
    """The same recurrence, exactly, a chunk of L tokens at a time; lw = log w (<= 0).

    Within a chunk from state S0, with cumulative log decays c_t = sum_{j<=t} lw_j (per key
    channel) and sa_t = S_{t-1} kk_t, b_t = kk_t * a_t:

        S_t = S0 diag(e^{c_t}) + sum_{i<=t} (v_i k_i^T - sa_i b_i^T) diag(e^{c_t - c_i})
        sa_t + sum_{i<t} (kk_t . e^{c_{t-1} - c_i} b_i) sa_i
             = S0 (e^{c_{t-1}} kk_t) + sum_{i<t} (kk_t . e^{c_{t-1} - c_i} k_i) v_i

    The second line is a unit lower-triangular system for the rows sa_t (solved exactly); then
    y_t = S_t r_t and the state at the chunk's end follow from the first line. The decay ratios
    e^{c_t - c_i} are formed as products e^{c_t} e^{-c_i} so that every sum over channels is a
    matrix product; RWKV-7's decay keeps lw > -0.6066, so |c| < 0.61 L (< 10 for L = 16) and
    these factors stay far inside fp32's range (no cancellation: products only)."""
    B, T, H, N = r.shape
    dt = state.dtype
    bh = lambda t: t.to(dt).transpose(1, 2).reshape(B * H, T, N)  # noqa: E731
    r_, lw_, k_, v_, kk_, a_ = (bh(t) for t in (r, lw, k, v, kk, a))
    b_ = kk_ * a_
    s = state.reshape(B * H, N, N)
    out = []
    for t0 in range(0, T, chunk):
        sl = slice(t0, min(t0 + chunk, T))
        rc, lc, kc, vc, kkc, bc = (x[:, sl] for x in (r_, lw_, k_, v_, kk_, b_))
        L = rc.shape[1]
        c = torch.cumsum(lc, 1)  # [BH, L, N] log W_t
        cx = c - lc  # log W_{t-1}
        ec, ecx, enc = torch.exp(c), torch.exp(cx), torch.exp(-c)
        lower = torch.tril(torch.ones(L, L, dtype=dt), -1)  # i < t
        kkx = kkc * ecx
        mk = torch.bmm(kkx, (kc * enc).transpose(1, 2)) * lower  # [BH, L(t), L(i)]
        mb = torch.bmm(kkx, (bc * enc).transpose(1, 2)) * lower
        rhs = torch.bmm(kkx, s.transpose(1, 2)) + torch.bmm(mk, vc)
        eye = torch.eye(L, dtype=dt).expand_as(mb)
        sa = torch.linalg.solve_triangular(eye + mb, rhs, upper=False, unitriangular=True)
        rx, incl = rc * ec, lower + torch.eye(L, dtype=dt)
        ak = torch.bmm(rx, (kc * enc).transpose(1, 2)) * incl
        ab = torch.bmm(rx, (bc * enc).transpose(1, 2)) * incl
        out.append(torch.bmm(rx, s.transpose(1, 2)) + torch.bmm(ak, vc) - torch.bmm(ab, sa))
        tail = torch.exp(c[:, -1:] - c)  # e^{c_L - c_i}
        s = (
            s * torch.exp(c[:, -1])[:, None, :]
            + torch.bmm(vc.transpose(1, 2), kc * tail)
            - torch.bmm(sa.transpose(1, 2), bc * tail)
        )
    y = torch.cat(out, 1).reshape(B, H, T, N).transpose(1, 2)
    return y, s.reshape(B, H, N, N)


class Att(nn.Module):
    def __init__(self, C: int, H: int, layer: int, lora: Dict[str, int]):
        super().__init__()
        vec = lambda: nn.Parameter(torch.zeros(1, 1, C))  # noqa: E731
        for m in MIXES:
            setattr(self, "x_" + m, vec())
        self.w0, self.a0 = vec(), vec()
        if layer:
            self.v0 = vec()
        for name, d in lora.items():
            if layer or name != "v":
                setattr(self, name + "1", nn.Parameter(torch.zeros(C, d)))
                setattr(self, name + "2", nn.Parameter(torch.zeros(d, C)))
        self.k_k, self.k_a = vec(), vec()
        self.r_k = nn.Parameter(torch.zeros(H, C // H))
        self.receptance, self.key = Linear(C, C), Linear(C, C)
        self.value, self.output = Linear(C, C), Linear(C, C)
        self.ln_x = nn.GroupNorm(H, C, eps=GN_EPS)


class Ffn(nn.Module):
    def __init__(self, C: int, F_: int):
        super().__init__()
        self.x_k = nn.Parameter(torch.zeros(1, 1, C))
        self.key, self.value = Linear(C, F_), Linear(F_, C)


class Block(nn.Module):
    def __init__(self, C: int, H: int, layer: int, lora: Dict[str, int], ffn: int):
        super().__init__()
        self.layer = layer
        if layer == 0:
            self.ln0 = nn.LayerNorm(C, eps=LN_EPS)
        self.ln1 = nn.LayerNorm(C, eps=LN_EPS)
        self.ln2 = nn.LayerNorm(C, eps=LN_EPS)
        self.att = Att(C, H, layer, lora)
        self.ffn = Ffn(C, ffn)

    def forward(self, x, st, v_first, chunk: int = 16):
        """x [B, T, C], the layer's state, layer 0's v (None in layer 0) -> (x, state, v_first).
        ``chunk`` 0: the recurrence token by token (``wkv_seq``); else ``wkv_chunked``."""
        att_xx, s, ffn_xx = st
        a, f = self.att, self.ffn
        B, T, C = x.shape
        H, N = a.r_k.shape
        xx = self.ln1(x)
        d = _shift(xx, att_xx) - xx
        xr, xw, xk, xv, xa, xg = (xx + d * getattr(a, "x_" + m) for m in MIXES)
        r, k, v = a.receptance(xr), a.key(xk), a.value(xv)
        lw = rwkv7.DECAY_SCALE * torch.sigmoid(a.w0 + torch.tanh(xw @ a.w1) @ a.w2)  # log w
        if self.layer == 0:
            v_first = v
        else:
            v = v + (v_first - v) * torch.sigmoid(a.v0 + (xv @ a.v1) @ a.v2)
        ia = torch.sigmoid(a.a0 + (xa @ a.a1) @ a.a2)
        g = torch.sigmoid(xg @ a.g1) @ a.g2
        kk = F.normalize((k * a.k_k).view(B, T, H, N), dim=-1, p=2.0, eps=rwkv7.NORM_EPS)
        k = k * (1 + (ia - 1) * a.k_a)
        heads = lambda t: t.view(B, T, H, N)  # noqa: E731
        if chunk:
            y, s = wkv_chunked(heads(r), heads(lw), heads(k), heads(v), kk, heads(ia), s, chunk)
        else:
            y, s = wkv_seq(heads(r), heads(torch.exp(lw)), heads(k), heads(v), kk, heads(ia), s)
        y = a.ln_x(y.to(x.dtype).reshape(B * T, C)).view(B, T, C)
        bonus = (heads(r * k) * a.r_k).sum(-1, keepdim=True) * heads(v)
        x = x + a.output((y + bonus.reshape(B, T, C)) * g)
        xx2 = self.ln2(x)
        xk2 = xx2 + (_shift(xx2, ffn_xx) - xx2) * f.x_k
        x = x + f.value(torch.square(torch.relu(f.key(xk2))))
        return x, (xx[:, -1], s, xx2[:, -1]), v_first


class RWKV7(nn.Module):
    def __init__(
        self,
        layers: int,
        width: int,
        vocab: int,
        head_size: int = 64,
        lora: Optional[Dict[str, int]] = None,
        ffn: int = 0,
        chunk: int = 16,
    ):
        super().__init__()
        self.layers, self.width, self.vocab, self.head_size = layers, width, vocab, head_size
        self.chunk = chunk
        self.lora = lora_widths(width, lora)
        H = width // head_size
        self.emb = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList([Block(width, H, i, self.lora, ffn or 4 * width) for i in range(layers)])
        self.ln_out = nn.LayerNorm(width, eps=LN_EPS)
        self.head = Linear(width, vocab)

    @classmethod
    def from_state_dict(cls, sd, chunk: int = 16, dtype=torch.float32) -> "RWKV7":
        """A model holding an RWKV-7 state dict (torch tensors or numpy arrays) in ``dtype``."""
        shape = rwkv7.check_state_dict(sd)
        m = cls(
            shape.layers, shape.width, shape.vocab, shape.head_size, dict(shape.lora), shape.ffn, chunk
        ).to(dtype)
        own = m.state_dict()
        m.load_state_dict({k: torch.as_tensor(v).to(dtype).reshape(own[k].shape) for k, v in sd.items()})
        return m

    def zero_state(self, B: int = 1) -> State:
        dt, C, N = self.emb.weight.dtype, self.width, self.head_size
        z = torch.zeros(B, C, dtype=dt)
        wkv_dt = torch.float64 if dt == torch.float64 else torch.float32
        return [(z, torch.zeros(B, C // N, N, N, dtype=wkv_dt), z) for _ in range(self.layers)]

    def forward(self, idx: torch.Tensor, state: State = None):
        """idx [B, T] -> (logits [B, T, V], state after the last token)."""
        state = self.zero_state(idx.shape[0]) if state is None else state
        x = self.blocks[0].ln0(self.emb(idx))
        out, v_first = [], None
        for blk, st in zip(self.blocks, state):
            x, st, v_first = blk(x, st, v_first, self.chunk)
            out.append(st)
        return self.head(self.ln_out(x)), out

    def step(self, token: int, state: State = None):
        """One token -> (logits [V], the state after it)."""
        logits, state = self(torch.tensor([[int(token)]]), state)
        return logits[0, 0], state

    def steps(self, tokens, state: State = None):
        """One token per call over ``tokens`` -> (logits [T, V], the state after them)."""
        out = []
        for t in tokens:
            logits, state = self.step(t, state)
            out.append(logits)
        return torch.stack(out), state


def _orthogonal(t: torch.Tensor, gain: float, g: torch.Generator) -> None:
    nn.init.orthogonal_(t, gain=gain, generator=g)


@torch.no_grad()
def init_weights(model: RWKV7, seed: int) -> RWKV7:
    """RWKV-7-style init (the reference trainer's choices): mixes 1 - (c/C)^(p * (1 - l/L)),
    decay base w0 spread over channels plus a per-head zigzag, a0/v0/k_k/k_a/r_k near their
    reference values, LoRA first matrices zero and second ones orthogonal x 0.1, receptance/value
    orthogonal, key orthogonal x 0.1, output and FFN value zero, ln_x weight ((l+1)/L)^0.7, tiny
    embedding (+ ln0), head orthogonal x 0.5 (x sqrt(V/C) when V > C)."""
    g = torch.Generator().manual_seed(seed)
    C, L, N, V = model.width, model.layers, model.head_size, model.vocab
    ch = torch.arange(C, dtype=torch.float64)
    ddd, linear = ch / C, ch / (C - 1) - 0.5
    zig = ((ch % N) - (N - 1) / 2) / ((N - 1) / 2)
    zig = zig * zig.abs()
    vec = lambda t: t.reshape(1, 1, C).float()  # noqa: E731
    model.emb.weight.uniform_(-1e-4, 1e-4, generator=g)
    _orthogonal(model.head.weight, 0.5 * math.sqrt(V / C) if V > C else 0.5, g)
    powers = {"r": 0.2, "w": 0.9, "k": 0.7, "v": 0.7, "a": 0.9, "g": 0.2}
    for i, blk in enumerate(model.blocks):
        a, f = blk.att, blk.ffn
        r01, r10 = i / max(L - 1, 1), 1 - i / L
        for m, p in powers.items():
            getattr(a, "x_" + m).copy_(vec(1 - ddd ** (p * r10)))
        f.x_k.copy_(vec(1 - ddd ** (r10**4)))
        a.w0.copy_(vec(-6 + 6 * (ch / (C - 1)) ** (1 + r01**0.3) + 0.5 + 2.5 * zig))
        a.a0.copy_(vec(-0.19 + 0.3 * zig + 0.4 * linear))
        if i:
            a.v0.copy_(vec(0.73 - 0.4 * linear))
        for name in model.lora:
            if i or name != "v":
                getattr(a, name + "1").zero_()
                _orthogonal(getattr(a, name + "2"), 0.1, g)
        a.k_k.copy_(vec(0.71 - 0.1 * linear))
        a.k_a.fill_(1.02)
        a.r_k.fill_(-0.04)
        _orthogonal(a.receptance.weight, 1.0, g)
        _orthogonal(a.value.weight, 1.0, g)
        _orthogonal(a.key.weight, 0.1, g)
        _orthogonal(f.key.weight, 1.0, g)
        a.output.weight.zero_()
        f.value.weight.zero_()
        a.ln_x.weight.fill_(((1 + i) / L) ** 0.7)
    return model
