"""RWKV-4 in torch: the one torch definition of the model, used to train the bundled checkpoint
(``train.py``) and, in the tests, to make per-layer files the way the public ones were made.

Module and parameter names give the official RWKV-4 state-dict keys (``emb.weight``,
``blocks.N.att.key.weight``, ...). Every block runs in one of two forms, with the same code for
everything but the token shift and the WKV:

- sequence form, ``x`` [B, T, C]: the token shift concatenates the carried row with the window,
  and the WKV is computed exactly in chunks (``wkv_seq``). Training uses it.
- token form, ``x`` [C]: one token; the shift is the carried row and the WKV is the per-token
  recurrence (``wkv_step``). Matrix products are ``W[out, in] @ x[in]``, so torch.onnx.export
  of a block gives the public per-layer files' ``MatMul(W, x)``.

A layer's state is a tuple in the per-layer files' row order ``(ffn_xx, att_xx, aa, bb, pp)``
(``rwkv2rknn.models.rwkv4.STATE_ROWS``), each [B, C] or [C].

Sequence form of the WKV (exact, no approximation): with w = exp(time_decay), u = time_first,

    wkv_t = (sum_{i<t} e^{-(t-1-i)w + k_i} v_i + e^{u+k_t} v_t) / (same without v)

computed chunk by chunk (chunk length L): inside a chunk with an L x L masked exponent matrix in
log-space (stable by subtracting maxima), and the sum over all earlier chunks enters as one extra
"virtual token" (aa, bb, pp) = the usual recurrent state, carried from chunk to chunk. So the cost
is O(T L C) instead of O(T^2 C), and the same code continues from any state.
"""

from __future__ import annotations

import math
from typing import List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from rwkv2rknn.models import rwkv4

LN_EPS = rwkv4.LN_EPS
State = List[Tuple[torch.Tensor, ...]]  # per layer, rows in rwkv4.STATE_ROWS order


def wkv_step(decay, u, k, v, aa, bb, pp):
    """The per-token recurrence (decay = -exp(time_decay)): (wkv, (aa, bb, pp) after the token)."""
    ww = u + k
    q = torch.maximum(pp, ww)
    e1 = torch.exp(pp - q)
    e2 = torch.exp(ww - q)
    wkv = (e1 * aa + e2 * v) / (e1 * bb + e2)
    ww = pp + decay
    q = torch.maximum(ww, k)
    e1 = torch.exp(ww - q)
    e2 = torch.exp(k - q)
    return wkv, (e1 * aa + e2 * v, e1 * bb + e2, q)


def wkv_seq(
    w: torch.Tensor,
    u: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: Tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    chunk: int = 4,
):
    """Exact WKV of k, v [B, T, C] from state (aa, bb, pp) [B, C]; w = exp(time_decay) > 0.

    Returns (wkv [B, T, C], (aa, bb, pp) after the last token). The state means
    aa * e^pp = sum_{i<t} e^{-(t-1-i)w + k_i} v_i and bb * e^pp the same without v, as in the
    recurrence (its pp may differ from the recurrence's by the choice of maximum; the values
    aa * e^pp and bb * e^pp are the same)."""
    B, T, C = k.shape
    L = min(chunk, T)
    Tm = (T // L) * L
    if Tm < T:  # a shorter tail chunk, continued from the state after the full chunks
        out1, st = wkv_seq(w, u, k[:, :Tm], v[:, :Tm], state, L)
        out2, st = wkv_seq(w, u, k[:, Tm:], v[:, Tm:], st, T - Tm)
        return torch.cat([out1, out2], 1), st
    N = T // L
    aa, bb, pp = state
    kc, vc = k.reshape(B, N, L, C), v.reshape(B, N, L, C)
    j = torch.arange(L, dtype=k.dtype, device=k.device)
    dist = j[:, None] - 1 - j[None, :]  # [L(j), L(i)]: j-1-i
    diag = torch.eye(L, dtype=torch.bool, device=k.device)[:, :, None]
    upper = (j[None, :] > j[:, None])[:, :, None]  # i > j: the future
    wmat = torch.where(diag, u, -dist[:, :, None] * w).masked_fill(upper, float("-inf"))

    # Each chunk's own contribution to the state at its end: exponents k_i - (L-1-i) w.
    g = kc - (L - 1 - j)[:, None] * w  # [B, N, L, C]
    gp = g.amax(2).detach()
    ge = torch.exp(g - gp[:, :, None])
    ga, gb = (ge * vc).sum(2), ge.sum(2)  # [B, N, C]

    # Scan over chunks: the state at the start of each chunk.
    starts = []
    decay = L * w
    for n in range(N):
        starts.append((aa, bb, pp))
        old = pp - decay
        q = torch.maximum(old, gp[:, n])
        e1, e2 = torch.exp(old - q), torch.exp(gp[:, n] - q)
        aa, bb, pp = e1 * aa + e2 * ga[:, n], e1 * bb + e2 * gb[:, n], q
    sa = torch.stack([s[0] for s in starts], 1)  # [B, N, C]
    sb = torch.stack([s[1] for s in starts], 1)
    sp = torch.stack([s[2] for s in starts], 1)

    # Inside each chunk: token j sees tokens i <= j of the chunk and the state (exponent pp - j w).
    e = kc[:, :, None, :, :] + wmat  # [B, N, L(j), L(i), C]
    es = sp[:, :, None, :] - j[:, None] * w  # [B, N, L(j), C]
    m = torch.maximum(e.amax(3), es).detach()
    p = torch.exp(e - m[:, :, :, None, :])
    ps = torch.exp(es - m)
    num = (p * vc[:, :, None, :, :]).sum(3) + ps * sa[:, :, None, :]
    den = p.sum(3) + ps * sb[:, :, None, :]
    return (num / den).reshape(B, T, C), (aa, bb, pp)


def _shift(xx: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """The previous token's value at every position: the carried row first (one token: itself)."""
    if xx.dim() == 1:
        return prev
    return torch.cat([prev[:, None], xx[:, :-1]], 1)


def _last(xx: torch.Tensor) -> torch.Tensor:
    return xx if xx.dim() == 1 else xx[:, -1]


def _mix(xx, prev, m):
    m = m.reshape(-1)
    return xx * m + prev * (1 - m)


class Linear(nn.Module):
    """A bias-free linear map with the checkpoint's weight layout [out, in]: one token [in] is
    multiplied as ``W @ x`` (``MatMul(W, x)`` when exported), rows [..., in] as ``x W^T``."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_out, n_in))

    def forward(self, x):
        return self.weight @ x if x.dim() == 1 else F.linear(x, self.weight)


class Att(nn.Module):
    def __init__(self, C: int):
        super().__init__()
        self.time_decay = nn.Parameter(torch.zeros(C))
        self.time_first = nn.Parameter(torch.zeros(C))
        self.time_mix_k = nn.Parameter(torch.zeros(1, 1, C))
        self.time_mix_v = nn.Parameter(torch.zeros(1, 1, C))
        self.time_mix_r = nn.Parameter(torch.zeros(1, 1, C))
        self.key = Linear(C, C)
        self.value = Linear(C, C)
        self.receptance = Linear(C, C)
        self.output = Linear(C, C)


class Ffn(nn.Module):
    def __init__(self, C: int, F_: int):
        super().__init__()
        self.time_mix_k = nn.Parameter(torch.zeros(1, 1, C))
        self.time_mix_r = nn.Parameter(torch.zeros(1, 1, C))
        self.key = Linear(C, F_)
        self.receptance = Linear(C, C)
        self.value = Linear(F_, C)


class Block(nn.Module):
    def __init__(self, C: int, layer: int, ffn: int = 0):
        super().__init__()
        if layer == 0:
            self.ln0 = nn.LayerNorm(C, eps=LN_EPS)
        self.ln1 = nn.LayerNorm(C, eps=LN_EPS)
        self.ln2 = nn.LayerNorm(C, eps=LN_EPS)
        self.att = Att(C)
        self.ffn = Ffn(C, ffn or 4 * C)

    def forward(self, x, st, chunk: int = 4):
        """x [C] (one token) or [B, T, C]; st the layer's state rows -> (x, new state rows)."""
        ffn_xx, att_xx, aa, bb, pp = st
        a, f = self.att, self.ffn
        xx = self.ln1(x)
        xs = _shift(xx, att_xx)
        xk, xv, xr = (_mix(xx, xs, m) for m in (a.time_mix_k, a.time_mix_v, a.time_mix_r))
        r = torch.sigmoid(a.receptance(xr))
        k, v = a.key(xk), a.value(xv)
        decay = -torch.exp(a.time_decay)
        if x.dim() == 1:
            wkv, (aa, bb, pp) = wkv_step(decay, a.time_first, k, v, aa, bb, pp)
        else:
            wkv, (aa, bb, pp) = wkv_seq(-decay, a.time_first, k, v, (aa, bb, pp), chunk)
        x = x + a.output(r * wkv)
        xx2 = self.ln2(x)
        xs2 = _shift(xx2, ffn_xx)
        xk, xr = _mix(xx2, xs2, f.time_mix_k), _mix(xx2, xs2, f.time_mix_r)
        x = x + torch.sigmoid(f.receptance(xr)) * f.value(torch.square(torch.relu(f.key(xk))))
        return x, (_last(xx2), _last(xx), aa, bb, pp)


class RWKV4(nn.Module):
    def __init__(self, layers: int, width: int, vocab: int, chunk: int = 4, ffn: int = 0):
        super().__init__()
        self.layers, self.width, self.vocab, self.chunk = layers, width, vocab, chunk
        self.emb = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList([Block(width, i, ffn) for i in range(layers)])
        self.ln_out = nn.LayerNorm(width, eps=LN_EPS)
        self.head = Linear(width, vocab)

    @classmethod
    def from_state_dict(cls, sd, chunk: int = 4, dtype=torch.float32) -> "RWKV4":
        """A model holding an RWKV-4 state dict (torch tensors or numpy arrays) in ``dtype``."""
        shape = rwkv4.check_state_dict(sd)
        m = cls(shape.layers, shape.width, shape.vocab, chunk, shape.ffn).to(dtype)
        own = m.state_dict()
        m.load_state_dict({k: torch.as_tensor(v).to(dtype).reshape(own[k].shape) for k, v in sd.items()})
        return m

    def zero_state(self, B: int = 0) -> State:
        """The all-zero state for B streams (B = 0: one token stream in token form)."""
        z = torch.zeros(*((B,) if B else ()), self.width, dtype=self.emb.weight.dtype)
        return [(z,) * len(rwkv4.STATE_ROWS) for _ in range(self.layers)]

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        return self.blocks[0].ln0(self.emb(idx))

    def forward(self, idx: torch.Tensor, state: State = None):
        """idx [B, T] -> (logits [B, T, V], state after the last token)."""
        if state is None:
            state = self.zero_state(idx.shape[0])
        x = self.embed(idx)
        out = []
        for blk, st in zip(self.blocks, state):
            x, st = blk(x, st, self.chunk)
            out.append(st)
        return self.head(self.ln_out(x)), out

    def step(self, token: int, state: State):
        """Token form: one token from ``state`` -> (logits [V], the state after it)."""
        x = self.embed(torch.tensor([int(token)])).reshape(-1)
        out = []
        for blk, st in zip(self.blocks, state):
            x, st = blk(x, st)
            out.append(st)
        return self.head(self.ln_out(x)), out

    def steps(self, tokens, state: State = None):
        """Token form over ``tokens`` one at a time -> (logits [T, V], the state after them)."""
        state = self.zero_state() if state is None else state
        out = []
        for t in tokens:
            logits, state = self.step(int(t), state)
            out.append(logits)
        return torch.stack(out), state


@torch.no_grad()
def init_weights(model: RWKV4, seed: int) -> RWKV4:
    """RWKV-4-style init: decays spread over channels, mixes in [0, 1], weights ~ 1/sqrt(fan_in)."""
    g = torch.Generator().manual_seed(seed)
    C, L = model.width, model.layers
    model.emb.weight.uniform_(-1e-4, 1e-4, generator=g)  # small emb + ln0 (RWKV-4 trick)
    model.head.weight.normal_(0, 0.5 / math.sqrt(C), generator=g)
    ch = torch.arange(C, dtype=torch.float32)
    for i, blk in enumerate(model.blocks):
        r01 = i / max(L - 1, 1)  # 0 -> 1 over layers
        r10 = 1 - i / L  # 1 -> ~0 over layers
        x = ch / C
        a, f = blk.att, blk.ffn
        a.time_decay.copy_(-5 + 8 * (ch / (C - 1)) ** (0.7 + 1.3 * r01))
        zig = ((ch + 1) % 3 - 1) * 0.5
        a.time_first.copy_(math.log(0.3) + zig)
        a.time_mix_k.copy_((x**r10).view(1, 1, C))
        a.time_mix_v.copy_((x**r10 + 0.3 * r01).clamp(0, 1).view(1, 1, C))
        a.time_mix_r.copy_((x ** (0.5 * r10)).view(1, 1, C))
        f.time_mix_k.copy_((x**r10).view(1, 1, C))
        f.time_mix_r.copy_((x**r10).view(1, 1, C))
        out_scale = 1 / math.sqrt(2 * L)
        for lin, scale in (
            (a.key, 1.0),
            (a.value, 1.0),
            (a.receptance, 1.0),
            (a.output, out_scale),
            (f.key, 1.0),
            (f.receptance, 1.0),
            (f.value, out_scale),
        ):
            fan_in = lin.weight.shape[1]
            lin.weight.normal_(0, scale / math.sqrt(fan_in), generator=g)
    return model
