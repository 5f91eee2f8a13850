"""Train a small byte-level RWKV-4 language model on CPU, self-contained.

The model is trained in sequence ("parallel") form and saved as a torch state dict with the
official RWKV-4 key names and shapes (fp16 tensors), so every RWKV-4 tool can load it:

    emb.weight [V,C]; blocks.0.ln0.{weight,bias}; blocks.N.ln1/ln2.{weight,bias};
    blocks.N.att.time_decay [C] (raw w, the recurrence uses -exp(w)); blocks.N.att.time_first [C];
    blocks.N.att.time_mix_{k,v,r} [1,1,C]; blocks.N.att.{key,value,receptance,output}.weight [C,C];
    blocks.N.ffn.time_mix_{k,r} [1,1,C]; blocks.N.ffn.key.weight [4C,C];
    blocks.N.ffn.receptance.weight [C,C]; blocks.N.ffn.value.weight [C,4C];
    ln_out.{weight,bias}; head.weight [V,C]

Sequence form of the WKV (exact, no approximation): with w = exp(time_decay), u = time_first,

    wkv_t = (sum_{i<t} e^{-(t-1-i)w + k_i} v_i + e^{u+k_t} v_t) / (same without v)

computed chunk by chunk (chunk length L, default 4): inside a chunk with an L x L masked
exponent matrix in log-space (stable by subtracting maxima), and the sum over all earlier chunks
enters as one extra "virtual token" (aa, bb, pp) = the usual recurrent state, carried from chunk
to chunk. So the cost is O(T L C) instead of O(T^2 C), and the same code continues from any state.

Usage (see models/README.md):

    python models/train.py --check                      # sequence form == step-by-step recurrence
    python models/train.py --out models/default/rwkv4-bytes.pth --layers 4 --width 256 \
        --ctx 128 --batch 16 --steps 4000 --lr 2e-3 --seed 1234 --threads 1
    python models/train.py --sample models/default/rwkv4-bytes.pth --prompt "The "
    python models/train.py --eval models/default/rwkv4-bytes.pth     # validation bits per byte
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import data as corpus  # noqa: E402  (models/data.py)

VOCAB = 256
LN_EPS = 1e-5

State = List[Tuple[torch.Tensor, ...]]  # per layer: (att_xx, ffn_xx, aa, bb, pp), each [B, C]


# ---------------------------------------------------------------------------------------------
# Sequence-form WKV


def wkv_seq(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            state: Tuple[torch.Tensor, torch.Tensor, torch.Tensor], chunk: int = 4):
    """Exact WKV of k, v [B, T, C] from state (aa, bb, pp) [B, C]; w = exp(time_decay) > 0.

    Returns (wkv [B, T, C], (aa, bb, pp) after the last token). The state means
    aa * e^pp = sum_{i<t} e^{-(t-1-i)w + k_i} v_i and bb * e^pp the same without v, as in the
    recurrence (its pp may differ from the recurrence's by the choice of maximum; the values
    aa * e^pp and bb * e^pp are the same)."""
    B, T, C = k.shape
    L = min(chunk, T)
    Tm = (T // L) * L
    if Tm < T:   # a shorter tail chunk, continued from the state after the full chunks
        out1, st = wkv_seq(w, u, k[:, :Tm], v[:, :Tm], state, L)
        out2, st = wkv_seq(w, u, k[:, Tm:], v[:, Tm:], st, T - Tm)
        return torch.cat([out1, out2], 1), st
    N = T // L
    aa, bb, pp = state
    kc, vc = k.reshape(B, N, L, C), v.reshape(B, N, L, C)
    j = torch.arange(L, dtype=k.dtype, device=k.device)
    dist = (j[:, None] - 1 - j[None, :])                       # [L(j), L(i)]: j-1-i
    diag = torch.eye(L, dtype=torch.bool, device=k.device)[:, :, None]
    upper = (j[None, :] > j[:, None])[:, :, None]              # i > j: the future
    wmat = torch.where(diag, u, -dist[:, :, None] * w).masked_fill(upper, float("-inf"))

    # Each chunk's own contribution to the state at its end: exponents k_i - (L-1-i) w.
    g = kc - (L - 1 - j)[:, None] * w                          # [B, N, L, C]
    gp = g.amax(2).detach()
    ge = torch.exp(g - gp[:, :, None])
    ga, gb = (ge * vc).sum(2), ge.sum(2)                       # [B, N, C]

    # Scan over chunks: the state at the start of each chunk.
    starts = []
    decay = L * w
    for n in range(N):
        starts.append((aa, bb, pp))
        old = pp - decay
        q = torch.maximum(old, gp[:, n])
        e1, e2 = torch.exp(old - q), torch.exp(gp[:, n] - q)
        aa, bb, pp = e1 * aa + e2 * ga[:, n], e1 * bb + e2 * gb[:, n], q
    sa = torch.stack([s[0] for s in starts], 1)                # [B, N, C]
    sb = torch.stack([s[1] for s in starts], 1)
    sp = torch.stack([s[2] for s in starts], 1)

    # Inside each chunk: token j sees tokens i <= j of the chunk and the state (exponent pp - j w).
    e = kc[:, :, None, :, :] + wmat                            # [B, N, L(j), L(i), C]
    es = sp[:, :, None, :] - j[:, None] * w                    # [B, N, L(j), C]
    m = torch.maximum(e.amax(3), es).detach()
    p = torch.exp(e - m[:, :, :, None, :])
    ps = torch.exp(es - m)
    num = (p * vc[:, :, None, :, :]).sum(3) + ps * sa[:, :, None, :]
    den = p.sum(3) + ps * sb[:, :, None, :]
    return (num / den).reshape(B, T, C), (aa, bb, pp)


# ---------------------------------------------------------------------------------------------
# The model (module names give the official RWKV-4 state-dict keys)


class Att(nn.Module):
    def __init__(self, C: int):
        super().__init__()
        self.time_decay = nn.Parameter(torch.zeros(C))
        self.time_first = nn.Parameter(torch.zeros(C))
        self.time_mix_k = nn.Parameter(torch.zeros(1, 1, C))
        self.time_mix_v = nn.Parameter(torch.zeros(1, 1, C))
        self.time_mix_r = nn.Parameter(torch.zeros(1, 1, C))
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)


class Ffn(nn.Module):
    def __init__(self, C: int):
        super().__init__()
        self.time_mix_k = nn.Parameter(torch.zeros(1, 1, C))
        self.time_mix_r = nn.Parameter(torch.zeros(1, 1, C))
        self.key = nn.Linear(C, 4 * C, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(4 * C, C, bias=False)


class Block(nn.Module):
    def __init__(self, C: int, layer: int):
        super().__init__()
        if layer == 0:
            self.ln0 = nn.LayerNorm(C, eps=LN_EPS)
        self.ln1 = nn.LayerNorm(C, eps=LN_EPS)
        self.ln2 = nn.LayerNorm(C, eps=LN_EPS)
        self.att = Att(C)
        self.ffn = Ffn(C)

    def forward(self, x, st, chunk):
        att_xx, ffn_xx, aa, bb, pp = st
        a, f = self.att, self.ffn
        xx = self.ln1(x)
        xs = torch.cat([att_xx[:, None], xx[:, :-1]], 1)
        xk = xx * a.time_mix_k + xs * (1 - a.time_mix_k)
        xv = xx * a.time_mix_v + xs * (1 - a.time_mix_v)
        xr = xx * a.time_mix_r + xs * (1 - a.time_mix_r)
        r = torch.sigmoid(a.receptance(xr))
        k, v = a.key(xk), a.value(xv)
        wkv, (aa, bb, pp) = wkv_seq(torch.exp(a.time_decay), a.time_first, k, v, (aa, bb, pp), chunk)
        x = x + a.output(r * wkv)
        xx2 = self.ln2(x)
        xs2 = torch.cat([ffn_xx[:, None], xx2[:, :-1]], 1)
        xk = xx2 * f.time_mix_k + xs2 * (1 - f.time_mix_k)
        xr = xx2 * f.time_mix_r + xs2 * (1 - f.time_mix_r)
        x = x + torch.sigmoid(f.receptance(xr)) * f.value(torch.relu(f.key(xk)) ** 2)
        return x, (xx[:, -1], xx2[:, -1], aa, bb, pp)


class RWKV4(nn.Module):
    def __init__(self, layers: int, width: int, vocab: int = VOCAB, chunk: int = 4):
        super().__init__()
        self.layers, self.width, self.vocab, self.chunk = layers, width, vocab, chunk
        self.emb = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList([Block(width, i) for i in range(layers)])
        self.ln_out = nn.LayerNorm(width, eps=LN_EPS)
        self.head = nn.Linear(width, vocab, bias=False)

    def zero_state(self, B: int) -> State:
        z = torch.zeros(B, self.width, dtype=self.emb.weight.dtype)
        return [(z, z, z, z, z) for _ in range(self.layers)]

    def forward(self, idx: torch.Tensor, state: Optional[State] = None):
        """idx [B, T] -> (logits [B, T, V], state after the last token)."""
        if state is None:
            state = self.zero_state(idx.shape[0])
        x = self.blocks[0].ln0(self.emb(idx))
        out = []
        for blk, st in zip(self.blocks, state):
            x, st = blk(x, st, self.chunk)
            out.append(st)
        return self.head(self.ln_out(x)), out

    @torch.no_grad()
    def init_weights(self, seed: int):
        """RWKV-4-style init: decays spread over channels, mixes in [0, 1], weights ~ 1/sqrt(fan_in)."""
        g = torch.Generator().manual_seed(seed)
        C, L = self.width, self.layers
        self.emb.weight.uniform_(-1e-4, 1e-4, generator=g)   # small emb + ln0 (RWKV-4 trick)
        self.head.weight.normal_(0, 0.5 / math.sqrt(C), generator=g)
        ch = torch.arange(C, dtype=torch.float32)
        for i, blk in enumerate(self.blocks):
            r01 = i / max(L - 1, 1)                 # 0 -> 1 over layers
            r10 = 1 - i / L                         # 1 -> ~0 over layers
            x = ch / C
            a, f = blk.att, blk.ffn
            a.time_decay.copy_(-5 + 8 * (ch / (C - 1)) ** (0.7 + 1.3 * r01))
            zig = ((ch + 1) % 3 - 1) * 0.5
            a.time_first.copy_(math.log(0.3) + zig)
            a.time_mix_k.copy_((x ** r10).view(1, 1, C))
            a.time_mix_v.copy_((x ** r10 + 0.3 * r01).clamp(0, 1).view(1, 1, C))
            a.time_mix_r.copy_((x ** (0.5 * r10)).view(1, 1, C))
            f.time_mix_k.copy_((x ** r10).view(1, 1, C))
            f.time_mix_r.copy_((x ** r10).view(1, 1, C))
            out_scale = 1 / math.sqrt(2 * L)
            for lin, scale in ((a.key, 1.0), (a.value, 1.0), (a.receptance, 1.0),
                               (a.output, out_scale), (f.key, 1.0), (f.receptance, 1.0),
                               (f.value, out_scale)):
                fan_in = lin.weight.shape[1]
                lin.weight.normal_(0, scale / math.sqrt(fan_in), generator=g)


def official_state_dict(model: RWKV4, dtype=torch.float16) -> dict:
    return {k: v.detach().to(dtype).contiguous().clone() for k, v in model.state_dict().items()}


def load_model(path: str, chunk: int = 4) -> RWKV4:
    sd = torch.load(path, map_location="cpu", weights_only=True)
    layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    vocab, width = sd["emb.weight"].shape
    m = RWKV4(layers, width, vocab, chunk)
    m.load_state_dict({k: v.float() for k, v in sd.items()})
    return m


# ---------------------------------------------------------------------------------------------
# Step-by-step recurrence (numpy), written from the per-token formulas: the check and the sampler


class Recurrent:
    def __init__(self, sd: dict, dtype=np.float32):
        p = {k: (v.detach().double().numpy() if hasattr(v, "detach") else np.asarray(v)).astype(dtype)
             for k, v in sd.items()}
        self.p, self.dt = p, dtype
        self.layers = 1 + max(int(k.split(".")[1]) for k in p if k.startswith("blocks."))
        self.width = p["emb.weight"].shape[1]

    def zero_state(self):
        return np.zeros((self.layers, 5, self.width), self.dt)   # att_xx, ffn_xx, aa, bb, pp

    @staticmethod
    def _ln(x, w, b):
        mu = x.mean()
        var = ((x - mu) ** 2).mean()
        return (x - mu) / np.sqrt(var + LN_EPS) * w + b

    def step(self, token: int, s: np.ndarray) -> np.ndarray:
        p = self.p
        sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
        x = self._ln(p["emb.weight"][token], p["blocks.0.ln0.weight"], p["blocks.0.ln0.bias"])
        for i in range(self.layers):
            b = f"blocks.{i}."
            g = lambda n: p[b + n].reshape(-1) if "time_" in n else p[b + n]  # noqa: E731
            xx = self._ln(x, g("ln1.weight"), g("ln1.bias"))
            att_xx, ffn_xx, aa, bb, pp = s[i]
            mk, mv, mr = g("att.time_mix_k"), g("att.time_mix_v"), g("att.time_mix_r")
            xk = xx * mk + att_xx * (1 - mk)
            xv = xx * mv + att_xx * (1 - mv)
            xr = xx * mr + att_xx * (1 - mr)
            r = sig(g("att.receptance.weight") @ xr)
            k = g("att.key.weight") @ xk
            v = g("att.value.weight") @ xv
            ww = g("att.time_first") + k
            q = np.maximum(pp, ww)
            e1, e2 = np.exp(pp - q), np.exp(ww - q)
            wkv = (e1 * aa + e2 * v) / (e1 * bb + e2)
            ww = pp + (-np.exp(g("att.time_decay")))
            q = np.maximum(ww, k)
            e1, e2 = np.exp(ww - q), np.exp(k - q)
            s[i, 2], s[i, 3], s[i, 4] = e1 * aa + e2 * v, e1 * bb + e2, q
            s[i, 0] = xx
            x = x + g("att.output.weight") @ (r * wkv)
            xx2 = self._ln(x, g("ln2.weight"), g("ln2.bias"))
            fk, fr = g("ffn.time_mix_k"), g("ffn.time_mix_r")
            xk = xx2 * fk + ffn_xx * (1 - fk)
            xr = xx2 * fr + ffn_xx * (1 - fr)
            s[i, 1] = xx2
            kk = np.maximum(g("ffn.key.weight") @ xk, 0) ** 2
            x = x + sig(g("ffn.receptance.weight") @ xr) * (g("ffn.value.weight") @ kk)
        x = self._ln(x, p["ln_out.weight"], p["ln_out.bias"])
        return p["head.weight"] @ x


def check(seed: int = 0, layers: int = 2, width: int = 32, T: int = 45, chunk: int = 8) -> float:
    """Max |logits| difference: sequence form (float64, T not a multiple of the chunk, and split
    in two calls with the state carried) vs the numpy step-by-step recurrence."""
    torch.manual_seed(seed)
    m = RWKV4(layers, width, VOCAB, chunk).double()
    m.init_weights(seed)
    with torch.no_grad():   # move every parameter off its init so the check sees generic values
        for name, prm in m.named_parameters():
            if "time_mix" in name:
                prm.uniform_(0, 1)
            elif "time_decay" in name:
                prm.copy_(torch.linspace(-6, 2.5, width)[torch.randperm(width)])
            elif "time_first" in name:
                prm.normal_(0, 1)
            elif prm.dim() == 2:
                prm.normal_(0, 1.5 / math.sqrt(prm.shape[1]))
            else:
                prm.add_(torch.randn_like(prm) * 0.3)
    toks = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        seq, _ = m(toks)
        cut = min(19, T - 1)
        a, st = m(toks[:, :cut])
        b, _ = m(toks[:, cut:], st)
        split = torch.cat([a, b], 1)
    rec = Recurrent(m.state_dict(), np.float64)
    worst = 0.0
    for bi in range(2):
        s = rec.zero_state()
        ref = np.stack([rec.step(int(t), s) for t in toks[bi]])
        worst = max(worst, float(np.abs(seq[bi].numpy() - ref).max()),
                    float(np.abs(split[bi].numpy() - ref).max()))
    # Gradients of the sequence form (maxima are detached: the values do not depend on them).
    B_, T_, C_ = 2, 11, 3
    args = [torch.rand(C_, dtype=torch.float64) * 2 + 0.05, torch.randn(C_, dtype=torch.float64),
            torch.randn(B_, T_, C_, dtype=torch.float64), torch.randn(B_, T_, C_, dtype=torch.float64),
            torch.rand(B_, C_, dtype=torch.float64), torch.rand(B_, C_, dtype=torch.float64) + 0.5,
            torch.randn(B_, C_, dtype=torch.float64)]
    args = [t.requires_grad_() for t in args]
    fn = lambda w, u, k, v, aa, bb, pp: wkv_seq(w, u, k, v, (aa, bb, pp), 4)[0]  # noqa: E731
    if not torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7):
        worst = float("inf")
    scale = float(seq.abs().max())
    print(f"check: layers={layers} width={width} T={T} chunk={chunk}: max |logit diff| = "
          f"{worst:.3e} (logits up to {scale:.2f}); WKV gradcheck ok")
    return worst


# ---------------------------------------------------------------------------------------------
# Evaluation, training, sampling


@torch.no_grad()
def evaluate(model: RWKV4, val: np.ndarray, ctx: int, streams: int = 8,
             limit: Optional[int] = None) -> float:
    """Bits per byte of ``val``, read as ``streams`` contiguous pieces, each from the zero state
    with the state carried from window to window (as the recurrence reads text)."""
    model.eval()
    if limit:
        val = val[:limit]
    n = (len(val) - 1) // streams
    x = torch.from_numpy(val[:n * streams].astype(np.int64)).view(streams, n)
    y = torch.from_numpy(val[1:n * streams + 1].astype(np.int64))
    y = torch.stack([y[i * n:(i + 1) * n] for i in range(streams)])
    st, tot, cnt = None, 0.0, 0
    for s in range(0, n, ctx):
        logits, st = model(x[:, s:s + ctx], st)
        tot += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[:, s:s + ctx].reshape(-1),
                               reduction="sum").item()
        cnt += y[:, s:s + ctx].numel()
    model.train()
    return tot / cnt / math.log(2)


def lr_at(frac: float, lr: float, warm_frac: float, final: float) -> float:
    if frac < warm_frac:
        return lr * frac / warm_frac
    t = (frac - warm_frac) / max(1e-9, 1 - warm_frac)
    return final + (lr - final) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def train(a):
    torch.manual_seed(a.seed)
    raw = corpus.load_bytes(a.data)
    tr_b, va_b = corpus.split(raw)
    tr = np.frombuffer(tr_b, dtype=np.uint8)
    va = np.frombuffer(va_b, dtype=np.uint8)
    print(f"data: {len(raw)} bytes: {len(tr)} train, {len(va)} validation (last "
          f"{corpus.VAL_FRACTION:.0%})", flush=True)
    model = RWKV4(a.layers, a.width, VOCAB, a.chunk)
    model.init_weights(a.seed)
    nparams = sum(p.numel() for p in model.parameters())
    print(f"model: {a.layers} layers x {a.width}, {nparams} parameters; ctx {a.ctx}, batch "
          f"{a.batch}, chunk {a.chunk}, carry {a.carry}; threads {torch.get_num_threads()}",
          flush=True)
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (decay if p.dim() == 2 and "emb" not in n else no_decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.wd},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.99), eps=1e-8)
    rng = np.random.RandomState(a.seed)
    B, T = a.batch, a.ctx
    pos = rng.randint(0, len(tr) - T - 1, size=B)
    state = None
    t0 = time.time()
    step, loss_acc, n_acc = 0, 0.0, 0
    total = a.steps
    while True:
        elapsed = time.time() - t0
        frac = step / total if total else elapsed / (a.minutes * 60)
        if frac >= 1:
            break
        lr = lr_at(frac, a.lr, a.warmup, a.lr * a.lr_final)
        for grp in opt.param_groups:
            grp["lr"] = lr
        # Streams: each carries its state for `carry` windows, then jumps to a random place.
        if state is not None:
            restart = [(step + b) % a.carry == 0 for b in range(B)]
            keep = torch.tensor([0.0 if r else 1.0 for r in restart])[:, None]
            state = [tuple((t * keep).detach() for t in st) for st in state]
            for b in range(B):
                pos[b] = rng.randint(0, len(tr) - T - 1) if restart[b] else pos[b] + T
                if pos[b] + T + 1 > len(tr):
                    pos[b] = rng.randint(0, len(tr) - T - 1)
                    state = [tuple(t.index_fill(0, torch.tensor([b]), 0.0) for t in st)
                             for st in state]
        win = np.stack([tr[p:p + T + 1] for p in pos]).astype(np.int64)
        x, y = torch.from_numpy(win[:, :-1]), torch.from_numpy(win[:, 1:])
        logits, state = model(x, state)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), a.clip)
        opt.step()
        state = [tuple(t.detach() for t in st) for st in state]
        loss_acc += loss.item()
        n_acc += 1
        step += 1
        if step % a.log_every == 0:
            el = time.time() - t0
            l = loss_acc / n_acc
            print(f"step {step} loss {l:.4f} bpb {l / math.log(2):.4f} lr {lr:.2e} "
                  f"{step * B * T / el:.0f} tok/s {el / 60:.1f} min", flush=True)
            loss_acc, n_acc = 0.0, 0
        if a.eval_every and step % a.eval_every == 0:
            vb = evaluate(model, va, T, limit=a.eval_limit)
            print(f"step {step} val bpb (first {a.eval_limit} bytes) {vb:.4f}", flush=True)
            save(model, a.out)
    el = time.time() - t0
    print(f"trained {step} steps ({step * B * T} tokens, {step * B * T / len(tr):.2f} epochs) "
          f"in {el / 60:.1f} min", flush=True)
    if a.bench:
        return
    save(model, a.out)
    shipped = load_model(a.out, a.chunk)      # the fp16 file as it is shipped
    vb = evaluate(shipped, va, T)
    print(f"final validation bits/byte (fp16 checkpoint, {len(va)} held-out bytes): {vb:.4f}",
          flush=True)


def save(model: RWKV4, path: str):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    torch.save(official_state_dict(model), tmp)
    os.replace(tmp, path)


def sample(a):
    sd = torch.load(a.sample, map_location="cpu", weights_only=True)
    rec = Recurrent(sd, np.float32)
    rng = np.random.RandomState(a.seed)
    s = rec.zero_state()
    prompt = a.prompt.encode("utf-8")
    for t in prompt:
        logits = rec.step(t, s)
    out = bytearray()
    for _ in range(a.length):
        if a.temperature <= 0 or a.top_p <= 0:
            tok = int(np.argmax(logits))
        else:
            z = logits.astype(np.float64) / a.temperature
            pr = np.exp(z - z.max())
            pr /= pr.sum()
            order = np.argsort(-pr)
            cum = np.cumsum(pr[order])
            keep = order[:int(np.searchsorted(cum, a.top_p)) + 1]
            pk = pr[keep] / pr[keep].sum()
            tok = int(rng.choice(keep, p=pk))
        out.append(tok)
        logits = rec.step(tok, s)
    sys.stdout.write((prompt + bytes(out)).decode("utf-8", "replace") + "\n")


def main():
    ap = argparse.ArgumentParser(description="Train / check / sample a byte-level RWKV-4.")
    ap.add_argument("--data", help="a text file; default: Jane Austen from r-cran-janeaustenr "
                    "(see models/data.py)")
    ap.add_argument("--out", default="models/default/rwkv4-bytes.pth")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=4, help="WKV chunk length (speed only)")
    ap.add_argument("--carry", type=int, default=4,
                    help="each stream carries its state over this many windows (1 = independent "
                         "random windows from the zero state)")
    ap.add_argument("--steps", type=int, default=0, help="training steps (reproducible)")
    ap.add_argument("--minutes", type=float, default=0, help="or: train for this wall time")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--lr-final", type=float, default=0.05, help="final lr as a fraction of --lr")
    ap.add_argument("--warmup", type=float, default=0.02, help="warm-up, fraction of training")
    ap.add_argument("--wd", type=float, default=0.01)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--eval-limit", type=int, default=32768)
    ap.add_argument("--check", action="store_true", help="verify the sequence form and exit")
    ap.add_argument("--bench", type=int, default=0, help="time this many training steps and exit")
    ap.add_argument("--eval", metavar="CKPT", help="validation bits/byte of a checkpoint")
    ap.add_argument("--sample", metavar="CKPT", help="generate text from a checkpoint")
    ap.add_argument("--prompt", default="The ")
    ap.add_argument("--length", type=int, default=400)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=0.7, help="0 = greedy")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.set_num_interop_threads(1)
    if a.check:
        worst = max(check(0, 2, 32, 45, 8), check(1, 3, 16, 70, 16), check(2, 1, 8, 5, 4), check(3, 2, 16, 130, 4))
        ok = worst < 1e-9
        print("check", "passed" if ok else "FAILED")
        sys.exit(0 if ok else 1)
    if a.sample:
        return sample(a)
    if a.eval:
        va = np.frombuffer(corpus.split(corpus.load_bytes(a.data))[1], dtype=np.uint8)
        m = load_model(a.eval, a.chunk)
        print(f"validation bits/byte: {evaluate(m, va, a.ctx):.4f} ({len(va)} bytes)")
        return
    if a.bench:
        a.steps, a.log_every, a.eval_every = a.bench, max(1, a.bench // 2), 0
        a.out = "/tmp/rwkv4-bench.pth"
    elif not a.steps and not a.minutes:
        ap.error("give --steps or --minutes")
    train(a)


if __name__ == "__main__":
    main()
