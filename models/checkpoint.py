"""Reading RWKV checkpoints (.pth) and making random ones for tests.

Loading needs torch (the export machine has it; the board never imports this module).
"""

from __future__ import annotations

import os
from typing import Dict, Optional

import numpy as np

from rwkv2rknn.errors import BadInput, MissingDependency
from rwkv2rknn.models import rwkv4, rwkv5, rwkv6, rwkv7


def load_checkpoint(path: str) -> Dict[str, np.ndarray]:
    """A checkpoint as float32 numpy arrays in the official .pth layout, with a one-line error
    for a bad file: an official .pth, or a Hugging Face folder / weights file (models/hf.py)."""
    return load_model(path)[0]


def load_model(path: str):
    """(state dict in the official layout, tokenizer.json beside it or None, what it was read
    as) of a .pth, a .safetensors, a Hugging Face model folder or its weights or shard index."""
    from rwkv2rknn.models import hf

    if not os.path.exists(path):
        raise BadInput(
            f"checkpoint '{path}' does not exist", "give an RWKV .pth file or a Hugging Face model folder"
        )
    try:
        import torch  # noqa: F401 - reading .pth and bf16 tensors
    except ImportError as e:  # pragma: no cover - torch is in requirements.txt
        raise MissingDependency("reading checkpoints needs torch", "pip install torch") from e
    return hf.load_model(path)


def random_checkpoint(
    layers: int = 2,
    width: int = 64,
    vocab: int = 256,
    ffn: Optional[int] = None,
    seed: int = 0,
    scale: float = 1.0,
    dtype=np.float32,
) -> Dict[str, np.ndarray]:
    """A random RWKV-4 state dict with a realistic initialisation.

    time_decay spreads over channels as in the official init, time_first around log(0.3),
    mixes in [0, 1] that depend on depth, weights ~ N(0, 1/fan_in) (times ``scale``), LayerNorm
    weights near 1. ``scale`` > 1 makes activations large (used to provoke fp16 overflow).
    ``dtype`` float16 stores the matrices in half the memory (the vectors stay float32).
    """
    rng = np.random.default_rng(seed)
    c, f, v = width, ffn or 4 * width, vocab
    ramp = np.arange(c, dtype=np.float32) / max(c - 1, 1)

    def w(out, inp):
        return (rng.standard_normal((out, inp)) * scale / np.sqrt(inp)).astype(dtype)

    def near(x0, spread):
        return (x0 + spread * rng.standard_normal(c)).astype(np.float32)

    sd = {
        "emb.weight": (rng.standard_normal((v, c)) * 0.5).astype(dtype),
        "blocks.0.ln0.weight": near(1.0, 0.05),
        "blocks.0.ln0.bias": near(0.0, 0.05),
    }
    for i in range(layers):
        depth = i / max(layers - 1, 1)
        b = f"blocks.{i}."
        mix = (ramp ** (1.0 - 0.5 * depth)).astype(np.float32)
        sd.update(
            {
                b + "ln1.weight": near(1.0, 0.05),
                b + "ln1.bias": near(0.0, 0.05),
                b + "ln2.weight": near(1.0, 0.05),
                b + "ln2.bias": near(0.0, 0.05),
                b + "att.time_decay": (-5 + 8 * ramp ** (0.7 + 1.3 * depth)).astype(np.float32),
                b + "att.time_first": (np.log(0.3) + 0.5 * ((np.arange(c) + 1) % 3 - 1)).astype(np.float32),
                b + "att.time_mix_k": mix.reshape(1, 1, c),
                b + "att.time_mix_v": np.clip(mix + 0.3 * depth, 0, 1).reshape(1, 1, c).astype(np.float32),
                b + "att.time_mix_r": (0.5 * mix).reshape(1, 1, c),
                b + "att.key.weight": w(c, c),
                b + "att.value.weight": w(c, c),
                b + "att.receptance.weight": w(c, c),
                b + "att.output.weight": w(c, c),
                b + "ffn.time_mix_k": mix.reshape(1, 1, c),
                b + "ffn.time_mix_r": mix.reshape(1, 1, c),
                b + "ffn.key.weight": w(f, c),
                b + "ffn.receptance.weight": w(c, c),
                b + "ffn.value.weight": w(c, f),
            }
        )
    sd.update({"ln_out.weight": near(1.0, 0.05), "ln_out.bias": near(0.0, 0.05), "head.weight": w(v, c) * 4})
    rwkv4.check_state_dict(sd)
    return sd


def save_checkpoint(sd: Dict[str, np.ndarray], path: str, dtype: str = "float32") -> None:
    """Write a state dict as an official-looking .pth (torch tensors)."""
    import torch

    tdtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    torch.save({k: torch.from_numpy(np.ascontiguousarray(a)).to(tdtype) for k, a in sd.items()}, path)


class _Draws:
    """Random tensors for one RWKV-5.2/6/7 checkpoint, drawn in a fixed order from ``seed``."""

    def __init__(self, width: int, vocab: int, head_size: int, seed: int, scale: float, dtype=np.float32):
        if width % head_size:
            raise ValueError(f"width {width} is not a multiple of the head size {head_size}")
        self.rng, self.c, self.v, self.scale = np.random.default_rng(seed), width, vocab, scale
        self.head_size = head_size
        self.dtype = dtype  # of the matrices (float16: half the memory; vectors stay float32)
        self.ramp = np.arange(width, dtype=np.float32) / max(width - 1, 1)

    def w(self, *shape, gain: float = 1.0) -> np.ndarray:
        """~ N(0, 1/fan_in) (fan_in = shape[-2]) times ``gain`` and the checkpoint's scale."""
        return (self.rng.standard_normal(shape) * gain * self.scale / np.sqrt(shape[-2])).astype(self.dtype)

    def near(self, x0, spread: float, shape=None) -> np.ndarray:
        return (x0 + spread * self.rng.standard_normal(shape or (self.c,))).astype(np.float32)

    def vec3(self, x) -> np.ndarray:
        return np.asarray(x, np.float32).reshape(1, 1, self.c)

    def layers(self, sd: dict, layers: int):
        """The embedding and ln0 into ``sd``; then per layer its LayerNorms, yielding (i,
        'blocks.i.', depth in [0, 1], a channel ramp that depends on depth); then the head."""
        c, v = self.c, self.v
        sd.update(
            {
                "emb.weight": (self.rng.standard_normal((v, c)) * 0.5).astype(self.dtype),
                "blocks.0.ln0.weight": self.near(1.0, 0.05),
                "blocks.0.ln0.bias": self.near(0.0, 0.05),
            }
        )
        for i in range(layers):
            depth, b = i / max(layers - 1, 1), f"blocks.{i}."
            sd.update(
                {
                    b + "ln1.weight": self.near(1.0, 0.05),
                    b + "ln1.bias": self.near(0.0, 0.05),
                    b + "ln2.weight": self.near(1.0, 0.05),
                    b + "ln2.bias": self.near(0.0, 0.05),
                }
            )
            yield i, b, depth, self.ramp ** (1.0 - 0.5 * depth)
        sd.update(
            {
                "ln_out.weight": self.near(1.0, 0.05),
                "ln_out.bias": self.near(0.0, 0.05),
                "head.weight": self.w(v, c) * 4,
            }
        )


def _slot_checkpoint(check):
    """The maker of a random RWKV-6/7 state dict in the official key layout, around
    ``fill(r, sd, layers, lora, ffn)``, which draws the version's tensors (``r``: a ``_Draws``,
    ``lora``: the LoRA widths given, by name) into ``sd``; ``check`` validates the result. The
    maker takes the arguments below and has ``fill``'s name and docstring."""

    def wrap(fill):
        def make(
            layers: int = 2,
            width: int = 128,
            vocab: int = 256,
            head_size: int = 64,
            lora: Optional[Dict[str, int]] = None,
            ffn: Optional[int] = None,
            seed: int = 0,
            scale: float = 1.0,
            dtype=np.float32,
        ) -> Dict[str, np.ndarray]:
            r = _Draws(width, vocab, head_size, seed, scale, dtype)
            sd: Dict[str, np.ndarray] = {}
            fill(r, sd, layers, dict(lora or {}), ffn)
            check(sd)
            return sd

        make.__name__, make.__qualname__, make.__doc__ = fill.__name__, fill.__qualname__, fill.__doc__
        return make

    return wrap


@_slot_checkpoint(rwkv7.check_state_dict)
def random_rwkv7(r: "_Draws", sd: Dict[str, np.ndarray], layers: int, lora: Dict[str, int], ffn) -> None:
    """A random RWKV-7 state dict in the official key layout and shapes.

    Mixes in [0, 1] that depend on depth, decay base ``w0`` spread over channels as in the
    official init (so that decays range from fast to slow), LoRA pairs (in, out) with widths
    ``lora`` (w/a/v/g), ``r_k`` (H, N), no v0/v1/v2 in layer 0, GroupNorm ``ln_x`` weights
    growing with depth; matrices ~ N(0, 1/fan_in) times ``scale``.
    """
    c, head_size, w, near, vec3 = r.c, r.head_size, r.w, r.near, r.vec3
    f = ffn or 4 * c
    dims = {"w": 40, "a": 36, "v": 20, "g": 56, **lora}
    for i, b, depth, mix in r.layers(sd, layers):
        for j, m in enumerate("rwkvag"):
            jitter = 0.05 * r.rng.standard_normal(c)
            sd[b + f"att.x_{m}"] = vec3(np.clip(1.0 - mix ** (0.5 + 0.2 * j) + jitter, 0, 1))
        sd[b + "att.w0"] = vec3(-7 + 5 * r.ramp ** (0.85 + depth**0.5) + 0.5 + near(0, 0.3))
        sd[b + "att.w1"], sd[b + "att.w2"] = w(c, dims["w"]), w(dims["w"], c, gain=0.5)
        sd[b + "att.a0"] = vec3(near(0.0, 0.5))
        sd[b + "att.a1"], sd[b + "att.a2"] = w(c, dims["a"]), w(dims["a"], c, gain=0.5)
        if i:
            sd[b + "att.v0"] = vec3(near(1.0, 0.3))
            sd[b + "att.v1"], sd[b + "att.v2"] = w(c, dims["v"]), w(dims["v"], c, gain=0.5)
        sd[b + "att.g1"], sd[b + "att.g2"] = w(c, dims["g"]), w(dims["g"], c, gain=0.5)
        sd[b + "att.k_k"] = vec3(near(0.85, 0.1))
        sd[b + "att.k_a"] = vec3(near(1.0, 0.1))
        sd[b + "att.r_k"] = near(-0.04, 0.1, (c // head_size, head_size))
        for name in ("receptance", "key", "value", "output"):
            sd[b + f"att.{name}.weight"] = w(c, c)
        sd[b + "att.ln_x.weight"] = near(((1 + i) / layers) ** 0.7, 0.05)
        sd[b + "att.ln_x.bias"] = near(0.0, 0.05)
        sd[b + "ffn.x_k"] = vec3(1.0 - mix**4)
        sd[b + "ffn.key.weight"], sd[b + "ffn.value.weight"] = w(f, c), w(c, f)


@_slot_checkpoint(rwkv6.check_state_dict)
def random_rwkv6(r: "_Draws", sd: Dict[str, np.ndarray], layers: int, lora: Dict[str, int], ffn) -> None:
    """A random RWKV-6 state dict in the official key layout and shapes: ``time_maa_*``
    [1, 1, C], ``time_maa_w1`` (C, 5D), ``time_maa_w2`` (5, D, C), ``time_decay`` [1, 1, C] spread
    over channels as in the official init, its LoRA (C, D2)/(D2, C), ``time_faaaa`` (H, N), FFN
    width 3.5 C; LoRA widths ``lora`` (maa, decay) not powers of two by default."""
    c, head_size, w, near, vec3 = r.c, r.head_size, r.w, r.near, r.vec3
    f = ffn or int(3.5 * c) // 32 * 32
    d = {"maa": 20, "decay": 44, **lora}
    for i, b, depth, mix in r.layers(sd, layers):
        for j, m in enumerate("xwkvrg"):
            sd[b + f"att.time_maa_{m}"] = vec3(np.clip(1.0 - mix ** (0.5 + 0.2 * j), 0, 1))
        sd[b + "att.time_maa_w1"] = w(c, 5 * d["maa"])
        sd[b + "att.time_maa_w2"] = w(5, d["maa"], c, gain=0.3)
        sd[b + "att.time_decay"] = vec3(-6 + 5 * r.ramp ** (0.7 + 1.3 * depth) + near(0, 0.2))
        sd[b + "att.time_decay_w1"] = w(c, d["decay"])
        sd[b + "att.time_decay_w2"] = w(d["decay"], c, gain=0.5)
        zigzag = ((np.arange(c) + 1) % 3 - 1) * 0.1
        sd[b + "att.time_faaaa"] = (
            (r.ramp * (1 - r.ramp) + zigzag).reshape(c // head_size, head_size).astype(np.float32)
        )
        for name in ("receptance", "key", "value", "gate", "output"):
            sd[b + f"att.{name}.weight"] = w(c, c)
        sd[b + "att.ln_x.weight"] = near(1.0, 0.05)
        sd[b + "att.ln_x.bias"] = near(0.0, 0.05)
        sd[b + "ffn.time_maa_k"] = vec3(1.0 - mix**2)
        sd[b + "ffn.time_maa_r"] = vec3(1.0 - mix**2)
        sd[b + "ffn.key.weight"], sd[b + "ffn.value.weight"] = w(f, c), w(c, f)
        sd[b + "ffn.receptance.weight"] = w(c, c)


def random_rwkv5(
    layers: int = 2,
    width: int = 128,
    vocab: int = 256,
    head_size: int = 64,
    ffn: Optional[int] = None,
    seed: int = 0,
    dtype=np.float32,
) -> Dict[str, np.ndarray]:
    """A random RWKV-5.2 state dict in the official key layout: RWKV-6's (same projections,
    ``ln_x``, ``time_faaaa`` (H, N), FFN width 3.5 C) with RWKV-4's ``time_mix_*`` [1, 1, C] in
    place of the maa LoRA, and ``time_decay`` (H, N) with no LoRA."""
    sd = random_rwkv6(
        layers=layers, width=width, vocab=vocab, head_size=head_size, ffn=ffn, seed=seed, dtype=dtype
    )
    h = width // head_size
    for i in range(layers):
        b = f"blocks.{i}.att."
        for m in "xwkvrg":
            mix = sd.pop(b + f"time_maa_{m}")
            if m in "kvrg":
                sd[b + f"time_mix_{m}"] = (1.0 - mix).astype(np.float32)
        for key in ("time_maa_w1", "time_maa_w2", "time_decay_w1", "time_decay_w2"):
            sd.pop(b + key)
        sd[b + "time_decay"] = sd[b + "time_decay"].reshape(h, head_size)
        for m in "kr":
            maa = sd.pop(f"blocks.{i}.ffn.time_maa_{m}")
            sd[f"blocks.{i}.ffn.time_mix_{m}"] = (1.0 - maa).astype(np.float32)
    rwkv5.check_state_dict(sd)
    return sd
