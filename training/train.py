"""Train a small byte-level RWKV-4 (the bundled checkpoint) or RWKV-7 language model on CPU (see
models/README.md).

The model (``rwkv4_torch.py`` or, with ``--version 7``, ``rwkv7_torch.py``, beside this file) is
trained in sequence ("parallel") form and saved as a torch state dict with the official key names
and shapes (fp16 tensors), so every RWKV tool can load it. RWKV-4's:

    emb.weight [V,C]; blocks.0.ln0.{weight,bias}; blocks.N.ln1/ln2.{weight,bias};
    blocks.N.att.time_decay [C] (raw w, the recurrence uses -exp(w)); blocks.N.att.time_first [C];
    blocks.N.att.time_mix_{k,v,r} [1,1,C]; blocks.N.att.{key,value,receptance,output}.weight [C,C];
    blocks.N.ffn.time_mix_{k,r} [1,1,C]; blocks.N.ffn.key.weight [4C,C];
    blocks.N.ffn.receptance.weight [C,C]; blocks.N.ffn.value.weight [C,4C];
    ln_out.{weight,bias}; head.weight [V,C]

Usage (training is not part of the installed package; run it from the repository):

    python training/train.py --check                      # sequence form == token by token
    python training/train.py --out models/default/rwkv4-bytes.pth --layers 4 --width 256 \
        --ctx 128 --batch 16 --steps 4000 --lr 2e-3 --seed 1234 --threads 1
    python training/train.py --version 7 --out rwkv7-bytes.pth --steps 2400 ...   # RWKV-7
    python training/train.py ... --steps 4000 --stop-at 1500   # a long run in parts: stop here,
    python training/train.py ... --steps 4000 --resume         # then go on (same weights at the end)
    python training/train.py --sample models/default/rwkv4-bytes.pth --prompt "The "
    python training/train.py --eval models/default/rwkv4-bytes.pth     # validation bits per byte
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import data as corpus  # noqa: E402  (training/data.py)
from rwkv4_torch import RWKV4, init_weights, wkv_seq  # noqa: E402,F401  (training/rwkv4_torch.py)
import rwkv7_torch  # noqa: E402  (training/rwkv7_torch.py)
from rwkv7_torch import RWKV7  # noqa: E402

VOCAB = 256
DEFAULT_CHUNK = {4: 4, 7: 16}  # WKV chunk lengths (speed only; both forms are exact)


def official_state_dict(model: RWKV4, dtype=torch.float16) -> dict:
    return {k: v.detach().to(dtype).contiguous().clone() for k, v in model.state_dict().items()}


def new_model(a):
    """A freshly initialised model of ``a.version`` (4 or 7) and the shape in ``a``."""
    if a.version == 7:
        model = RWKV7(a.layers, a.width, VOCAB, a.head_size, chunk=a.chunk)
        return rwkv7_torch.init_weights(model, a.seed)
    return init_weights(RWKV4(a.layers, a.width, VOCAB, a.chunk), a.seed)


def load_model(path: str, chunk: Optional[int] = None):
    """An RWKV-4 or RWKV-7 checkpoint (told apart by RWKV-7's ``att.r_k``) as a torch model;
    ``chunk`` None: the version's default WKV chunk (4 for RWKV-4, 16 for RWKV-7)."""
    sd = torch.load(path, map_location="cpu", weights_only=True)
    version = 7 if "blocks.0.att.r_k" in sd else 4
    cls = RWKV7 if version == 7 else RWKV4
    return cls.from_state_dict(sd, chunk=DEFAULT_CHUNK[version] if chunk is None else chunk)


def check(seed: int = 0, layers: int = 2, width: int = 32, T: int = 45, chunk: int = 8) -> float:
    """Max |logits| difference: sequence form (float64, T not a multiple of the chunk, and split
    in two calls with the state carried) vs the token form, one token at a time (the per-token
    recurrence); and a gradcheck of the sequence-form WKV."""
    torch.manual_seed(seed)
    m = init_weights(RWKV4(layers, width, VOCAB, chunk), seed).double()
    with torch.no_grad():  # move every parameter off its init so the check sees generic values
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
    worst = 0.0
    with torch.no_grad():
        seq, _ = m(toks)
        cut = min(19, T - 1)
        a, st = m(toks[:, :cut])
        b, _ = m(toks[:, cut:], st)
        split = torch.cat([a, b], 1)
        for bi in range(2):
            ref, _ = m.steps(toks[bi])
            worst = max(worst, float((seq[bi] - ref).abs().max()), float((split[bi] - ref).abs().max()))
    # Gradients of the sequence form (maxima are detached: the values do not depend on them).
    B_, T_, C_ = 2, 11, 3
    args = [
        torch.rand(C_, dtype=torch.float64) * 2 + 0.05,
        torch.randn(C_, dtype=torch.float64),
        torch.randn(B_, T_, C_, dtype=torch.float64),
        torch.randn(B_, T_, C_, dtype=torch.float64),
        torch.rand(B_, C_, dtype=torch.float64),
        torch.rand(B_, C_, dtype=torch.float64) + 0.5,
        torch.randn(B_, C_, dtype=torch.float64),
    ]
    args = [t.requires_grad_() for t in args]
    fn = lambda w, u, k, v, aa, bb, pp: wkv_seq(w, u, k, v, (aa, bb, pp), 4)[0]  # noqa: E731
    if not torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7):
        worst = float("inf")
    scale = float(seq.abs().max())
    print(
        f"check: layers={layers} width={width} T={T} chunk={chunk}: max |logit diff| = "
        f"{worst:.3e} (logits up to {scale:.2f}); WKV gradcheck ok"
    )
    return worst


# ---------------------------------------------------------------------------------------------
# Evaluation, training, sampling


@torch.no_grad()
def evaluate(model: RWKV4, val: np.ndarray, ctx: int, streams: int = 8, limit: Optional[int] = None) -> float:
    """Bits per byte of ``val``, read as ``streams`` contiguous pieces, each from the zero state
    with the state carried from window to window (as the recurrence reads text)."""
    model.eval()
    if limit:
        val = val[:limit]
    n = (len(val) - 1) // streams
    x = torch.from_numpy(val[: n * streams].astype(np.int64)).view(streams, n)
    y = torch.from_numpy(val[1 : n * streams + 1].astype(np.int64))
    y = torch.stack([y[i * n : (i + 1) * n] for i in range(streams)])
    st, tot, cnt = None, 0.0, 0
    for s in range(0, n, ctx):
        logits, st = model(x[:, s : s + ctx], st)
        tot += F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), y[:, s : s + ctx].reshape(-1), reduction="sum"
        ).item()
        cnt += y[:, s : s + ctx].numel()
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
    print(
        f"data: {len(raw)} bytes: {len(tr)} train, {len(va)} validation (last {corpus.VAL_FRACTION:.0%})",
        flush=True,
    )
    model = new_model(a)
    nparams = sum(p.numel() for p in model.parameters())
    print(
        f"model: RWKV-{a.version}, {a.layers} layers x {a.width}, {nparams} parameters; ctx {a.ctx}, batch "
        f"{a.batch}, chunk {a.chunk}, carry {a.carry}; threads {torch.get_num_threads()}",
        flush=True,
    )
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (decay if p.dim() == 2 and n.endswith(".weight") and "emb" not in n else no_decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": a.wd}, {"params": no_decay, "weight_decay": 0.0}],
        lr=a.lr,
        betas=(0.9, 0.99),
        eps=1e-8,
    )
    rng = np.random.RandomState(a.seed)
    B, T = a.batch, a.ctx
    pos = rng.randint(0, len(tr) - T - 1, size=B)
    state = None
    t0 = time.time()
    step, loss_acc, n_acc = 0, 0.0, 0
    total = a.steps
    if a.resume:
        r = load_resume(a)
        model.load_state_dict(r["model"])
        opt.load_state_dict(r["opt"])
        rng.set_state(r["rng"])
        torch.set_rng_state(r["torch_rng"])
        pos, state, step, loss_acc, n_acc = r["pos"], r["state"], r["step"], r["loss_acc"], r["n_acc"]
        t0 -= r["elapsed"]
        print(f"resumed at step {step} of {total} from {resume_path(a.out)}", flush=True)
    while True:
        elapsed = time.time() - t0
        frac = step / total if total else elapsed / (a.minutes * 60)
        if frac >= 1:
            break
        if a.stop_at and step >= a.stop_at:
            save_resume(a, model, opt, rng, pos, state, step, loss_acc, n_acc, elapsed)
            print(
                f"stopped at step {step} of {total}; continue with the same arguments and --resume "
                f"(the run's state is in {resume_path(a.out)})",
                flush=True,
            )
            return
        lr = lr_at(frac, a.lr, a.warmup, a.lr * a.lr_final)
        for grp in opt.param_groups:
            grp["lr"] = lr
        # Streams: each carries its state for `carry` windows, then jumps to a random place.
        if state is not None:
            restart = [(step + b) % a.carry == 0 for b in range(B)]
            keep = torch.tensor([0.0 if r else 1.0 for r in restart])
            state = [
                tuple((t * keep.view(-1, *[1] * (t.dim() - 1)).to(t.dtype)).detach() for t in st)
                for st in state
            ]
            for b in range(B):
                pos[b] = rng.randint(0, len(tr) - T - 1) if restart[b] else pos[b] + T
                if pos[b] + T + 1 > len(tr):
                    pos[b] = rng.randint(0, len(tr) - T - 1)
                    state = [tuple(t.index_fill(0, torch.tensor([b]), 0.0) for t in st) for st in state]
        win = np.stack([tr[p : p + T + 1] for p in pos]).astype(np.int64)
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
            avg = loss_acc / n_acc
            print(
                f"step {step} loss {avg:.4f} bpb {avg / math.log(2):.4f} lr {lr:.2e} "
                f"{step * B * T / el:.0f} tok/s {el / 60:.1f} min",
                flush=True,
            )
            loss_acc, n_acc = 0.0, 0
        if a.eval_every and step % a.eval_every == 0:
            vb = evaluate(model, va, T, limit=a.eval_limit)
            print(f"step {step} val bpb (first {a.eval_limit} bytes) {vb:.4f}", flush=True)
            save(model, a.out)
            if total:  # a run cut short (killed, out of time) goes on from here with --resume
                save_resume(a, model, opt, rng, pos, state, step, loss_acc, n_acc, time.time() - t0)
    el = time.time() - t0
    print(
        f"trained {step} steps ({step * B * T} tokens, {step * B * T / len(tr):.2f} epochs) "
        f"in {el / 60:.1f} min",
        flush=True,
    )
    if a.bench:
        return
    save(model, a.out)
    if os.path.exists(resume_path(a.out)):
        os.remove(resume_path(a.out))  # the run is complete: nothing to resume
    shipped = load_model(a.out, a.chunk)  # the fp16 file as it is shipped
    vb = evaluate(shipped, va, T)
    print(f"final validation bits/byte (fp16 checkpoint, {len(va)} held-out bytes): {vb:.4f}", flush=True)


# What a resumed run must share with the run it continues: everything that decides its steps.
RESUME_KEYS = (
    "version", "layers", "width", "head_size", "ctx", "batch", "chunk", "carry", "steps",
    "lr", "lr_final", "warmup", "wd", "clip", "seed", "data",
)  # fmt: skip


def resume_path(out: str) -> str:
    return out + ".resume"


def save_resume(a, model, opt, rng, pos, state, step, loss_acc, n_acc, elapsed):
    """Everything the next step depends on (full-precision weights, the optimiser's moments, both
    random generators, the streams' places and carried states), so that a run stopped here and
    resumed gives the same weights as one run straight through."""
    r = dict(
        args={k: getattr(a, k) for k in RESUME_KEYS},
        model=model.state_dict(),
        opt=opt.state_dict(),
        rng=rng.get_state(),
        torch_rng=torch.get_rng_state(),
        pos=pos.copy(),
        state=state,
        step=step,
        loss_acc=loss_acc,
        n_acc=n_acc,
        elapsed=elapsed,
    )
    path = resume_path(a.out)
    torch.save(r, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_resume(a) -> dict:
    path = resume_path(a.out)
    if not a.steps:
        sys.exit("error: --resume needs --steps (a run of fixed length)")
    if not os.path.isfile(path):
        sys.exit(f"error: no run to resume: {path} does not exist (start without --resume)")
    r = torch.load(path, map_location="cpu", weights_only=False)
    diff = [k for k in RESUME_KEYS if r["args"].get(k) != getattr(a, k)]
    if diff:
        were = ", ".join(f"--{k.replace('_', '-')} {r['args'].get(k)}" for k in diff)
        sys.exit(f"error: {path} was written by a run with other arguments: {were}; give the same ones")
    return r


def save(model, path: str):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    torch.save(official_state_dict(model), tmp)
    os.replace(tmp, path)


@torch.no_grad()
def sample(a):
    model = load_model(a.sample)
    rng = np.random.RandomState(a.seed)
    prompt = a.prompt.encode("utf-8")
    logits, s = model.steps(prompt)
    logits = logits[-1]
    out = bytearray()
    for _ in range(a.length):
        if a.temperature <= 0 or a.top_p <= 0:
            tok = int(torch.argmax(logits))
        else:
            z = logits.double().numpy() / a.temperature
            pr = np.exp(z - z.max())
            pr /= pr.sum()
            order = np.argsort(-pr)
            cum = np.cumsum(pr[order])
            keep = order[: int(np.searchsorted(cum, a.top_p)) + 1]
            pk = pr[keep] / pr[keep].sum()
            tok = int(rng.choice(keep, p=pk))
        out.append(tok)
        logits, s = model.step(tok, s)
    sys.stdout.write((prompt + bytes(out)).decode("utf-8", "replace") + "\n")


def main():
    ap = argparse.ArgumentParser(description="Train / check / sample a byte-level RWKV-4 or RWKV-7.")
    ap.add_argument("--version", type=int, choices=(4, 7), default=4, help="the architecture")
    ap.add_argument("--head-size", type=int, default=64, help="RWKV-7 head size")
    ap.add_argument(
        "--data", help="a text file; default: Jane Austen from r-cran-janeaustenr (see training/data.py)"
    )
    ap.add_argument("--out", default="models/default/rwkv4-bytes.pth")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument(
        "--chunk",
        type=int,
        help="WKV chunk length (speed only; default 4 for RWKV-4, 16 for RWKV-7, 0 = RWKV-7 token by token)",
    )
    ap.add_argument(
        "--carry",
        type=int,
        default=4,
        help="each stream carries its state over this many windows (1 = independent "
        "random windows from the zero state)",
    )
    ap.add_argument("--steps", type=int, default=0, help="training steps (reproducible)")
    ap.add_argument("--minutes", type=float, default=0, help="or: train for this wall time")
    ap.add_argument(
        "--stop-at",
        type=int,
        default=0,
        help="stop after this step, keeping the run's state in OUT.resume (a long run in parts)",
    )
    ap.add_argument(
        "--resume",
        action="store_true",
        help="go on from OUT.resume (written by --stop-at and at every --eval-every), same arguments",
    )
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
    ap.add_argument(
        "--streams",
        type=int,
        default=8,
        help="--eval reads the text as this many contiguous streams, each from the zero state",
    )
    ap.add_argument(
        "--text", help="--eval scores this file's first --max-bytes bytes instead of the held-out split"
    )
    ap.add_argument("--max-bytes", type=int, default=20000)
    ap.add_argument("--sample", metavar="CKPT", help="generate text from a checkpoint")
    ap.add_argument("--prompt", default="The ")
    ap.add_argument("--length", type=int, default=400)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=0.7, help="0 = greedy")
    a = ap.parse_args()
    chunk_given = a.chunk
    if a.chunk is None:
        a.chunk = DEFAULT_CHUNK[a.version]
    torch.set_num_threads(a.threads)
    torch.set_num_interop_threads(1)
    if a.check:
        worst = max(
            check(0, 2, 32, 45, 8), check(1, 3, 16, 70, 16), check(2, 1, 8, 5, 4), check(3, 2, 16, 130, 4)
        )
        ok = worst < 1e-9
        print("check", "passed" if ok else "FAILED")
        sys.exit(0 if ok else 1)
    if a.sample:
        return sample(a)
    if a.eval:
        if a.text:  # the first --max-bytes of a file, as `rwkv2rknn eval` reads it
            with open(a.text, "rb") as f:
                va = np.frombuffer(f.read(a.max_bytes), dtype=np.uint8)
        else:
            va = np.frombuffer(corpus.split(corpus.load_bytes(a.data))[1], dtype=np.uint8)
        m = load_model(a.eval, chunk_given)
        print(
            f"validation bits/byte: {evaluate(m, va, a.ctx, a.streams):.4f} ({len(va)} bytes, "
            f"{a.streams} streams)"
        )
        return
    if a.bench:
        a.steps, a.log_every, a.eval_every = a.bench, max(1, a.bench // 2), 0
        a.out = "/tmp/rwkv4-bench.pth"
    elif not a.steps and not a.minutes:
        ap.error("give --steps or --minutes")
    train(a)


if __name__ == "__main__":
    main()
