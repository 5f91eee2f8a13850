"""Reading RWKV checkpoints (.pth) and making random ones for tests.

Loading needs torch (the export machine has it; the board never imports this module).
"""

from __future__ import annotations

import os
from typing import Dict, Optional

import numpy as np

from rwkv2rknn.errors import BadInput, MissingDependency
from rwkv2rknn.models import rwkv4


def load_checkpoint(path: str) -> Dict[str, np.ndarray]:
    """A .pth state dict as float32 numpy arrays, with a one-line error for a bad file."""
    if not os.path.isfile(path):
        raise BadInput(f"checkpoint '{path}' does not exist", "give the path of an RWKV .pth file")
    try:
        import torch
    except ImportError as e:  # pragma: no cover - torch is in requirements.txt
        raise MissingDependency("reading .pth checkpoints needs torch",
                                "pip install torch") from e
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise BadInput(f"cannot read checkpoint '{path}' ({type(e).__name__})",
                       "the file is truncated or not a PyTorch state dict") from e
    if not isinstance(sd, dict) or not all(hasattr(v, "shape") for v in sd.values()):
        raise BadInput(f"'{path}' is not a state dict of tensors", "give an RWKV .pth checkpoint")
    return {k: v.detach().float().numpy() for k, v in sd.items()}


def random_checkpoint(layers: int = 2, width: int = 64, vocab: int = 256, ffn: Optional[int] = None,
                      seed: int = 0, scale: float = 1.0) -> Dict[str, np.ndarray]:
    """A random RWKV-4 state dict with a realistic initialisation.

    time_decay spreads over channels as in the official init, time_first around log(0.3),
    mixes in [0, 1] that depend on depth, weights ~ N(0, 1/fan_in) (times ``scale``), LayerNorm
    weights near 1. ``scale`` > 1 makes activations large (used to provoke fp16 overflow).
    """
    rng = np.random.default_rng(seed)
    c, f, v = width, ffn or 4 * width, vocab
    ramp = np.arange(c, dtype=np.float32) / max(c - 1, 1)

    def w(out, inp):
        return (rng.standard_normal((out, inp)) * scale / np.sqrt(inp)).astype(np.float32)

    def near(x0, spread):
        return (x0 + spread * rng.standard_normal(c)).astype(np.float32)

    sd = {"emb.weight": (rng.standard_normal((v, c)) * 0.5).astype(np.float32),
          "blocks.0.ln0.weight": near(1.0, 0.05), "blocks.0.ln0.bias": near(0.0, 0.05)}
    for i in range(layers):
        depth = i / max(layers - 1, 1)
        b = f"blocks.{i}."
        mix = (ramp ** (1.0 - 0.5 * depth)).astype(np.float32)
        sd.update({
            b + "ln1.weight": near(1.0, 0.05), b + "ln1.bias": near(0.0, 0.05),
            b + "ln2.weight": near(1.0, 0.05), b + "ln2.bias": near(0.0, 0.05),
            b + "att.time_decay": (-5 + 8 * ramp ** (0.7 + 1.3 * depth)).astype(np.float32),
            b + "att.time_first": (np.log(0.3) + 0.5 * ((np.arange(c) + 1) % 3 - 1)).astype(np.float32),
            b + "att.time_mix_k": mix.reshape(1, 1, c),
            b + "att.time_mix_v": np.clip(mix + 0.3 * depth, 0, 1).reshape(1, 1, c).astype(np.float32),
            b + "att.time_mix_r": (0.5 * mix).reshape(1, 1, c),
            b + "att.key.weight": w(c, c), b + "att.value.weight": w(c, c),
            b + "att.receptance.weight": w(c, c), b + "att.output.weight": w(c, c),
            b + "ffn.time_mix_k": mix.reshape(1, 1, c), b + "ffn.time_mix_r": mix.reshape(1, 1, c),
            b + "ffn.key.weight": w(f, c), b + "ffn.receptance.weight": w(c, c),
            b + "ffn.value.weight": w(c, f),
        })
    sd.update({"ln_out.weight": near(1.0, 0.05), "ln_out.bias": near(0.0, 0.05),
               "head.weight": w(v, c) * 4})
    rwkv4.check_state_dict(sd)
    return sd


def save_checkpoint(sd: Dict[str, np.ndarray], path: str, dtype: str = "float32") -> None:
    """Write a state dict as an official-looking .pth (torch tensors)."""
    import torch
    tdtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    torch.save({k: torch.from_numpy(np.ascontiguousarray(a)).to(tdtype) for k, a in sd.items()}, path)
