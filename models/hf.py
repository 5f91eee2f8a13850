"""Hugging Face model folders as checkpoints: their keys mapped to the official .pth layout.

What a folder holds (``config.json``, ``tokenizer.json``, weights as ``model.safetensors``,
``pytorch_model.bin`` or shards listed in ``*.index.json``) and how each format names the
official tensors::

    format                      config.json                      key of the official 'blocks.1.att.key.weight'
    transformers RWKV-4         model_type rwkv  RwkvForCausalLM     rwkv.blocks.1.attention.key.weight
    RWKV-5 HF (remote code)     model_type rwkv5 Rwkv5ForCausalLM    rwkv.blocks.1.attention.key.weight
    RWKV-6 HF (remote code)     model_type rwkv6 Rwkv6ForCausalLM    rwkv.blocks.1.attention.key.weight
    fla-hub RWKV-7              model_type rwkv7 RWKV7ForCausalLM    model.layers.1.attn.k_proj.weight

transformers RWKV-4/5/6 (the names of their published modeling code): every key but ``head``
under ``rwkv.``; ``embeddings`` = emb, ``blocks.0.pre_ln`` = ln0, ``attention`` = att,
``feed_forward`` = ffn, ``time_mix_{key,value,receptance,gate}`` = ``time_mix_{k,v,r,g}``; every
other name and shape as the .pth (RWKV-6's ``time_maa_*``, ``time_decay`` [1, 1, C] or [H, N]
as saved, ``time_faaaa`` [H, N]; the stored weights are not rescaled: transformers divides by
``rescale_every`` only in memory).

fla-hub RWKV-7 (flash-linear-attention): ``model.embeddings`` = emb, ``model.layers.i`` =
blocks.i with ``pre_norm`` (layer 0) = ln0, ``attn_norm`` = ln1, ``ffn_norm`` = ln2; ``attn`` =
att with ``x_{r,w,k,v,a,g}`` [1, 1, C] (or one ``x_x`` [6, C] in that order), ``k_k``/``k_a``
[C], ``r_k`` [H, N], ``{r,k,v,o}_proj`` = receptance/key/value/output, the LoRAs as
``nn.Sequential(Linear(C, D), act, Linear(D, C))``: ``{w,a,v,g}_lora.lora.0.weight`` [D, C] =
``{w,a,v,g}1``ᵀ, ``.lora.2.weight`` [C, D] = ``{w,a,v,g}2``ᵀ, ``.lora.2.bias`` = w0/a0/v0 (g has
none; no v_lora in layer 0), ``g_norm`` = ln_x; ``ffn.x_k`` [C]; ``model.norm`` = ln_out,
``lm_head`` = head (the embedding when the head is tied and not saved).

Everything returned is float32 numpy in the official layout, which ``models/rwkv4.py`` ..
``rwkv7.py`` validate as they validate a .pth.
"""

from __future__ import annotations

import json
import os
import re
from typing import Callable, Dict, Optional, Tuple

import numpy as np

from rwkv2rknn.errors import BadInput, MissingDependency, UnsupportedModel

CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)

# the config.json names of each format, for messages
FORMATS = {
    "transformers-rwkv4": ("RwkvForCausalLM", "RWKV-4 (transformers)"),
    "hf-rwkv5": ("Rwkv5ForCausalLM", "RWKV-5 (Hugging Face)"),
    "hf-rwkv6": ("Rwkv6ForCausalLM", "RWKV-6 (Hugging Face)"),
    "fla-rwkv7": ("RWKV7ForCausalLM", "RWKV-7 (flash-linear-attention)"),
}


# --------------------------------------------------------------------------------------------
# reading tensors


def read_safetensors(path: str) -> Dict[str, np.ndarray]:
    """Every tensor of a .safetensors file as float32 numpy (bf16 and fp16 included)."""
    try:
        from safetensors import safe_open
    except ImportError as e:  # pragma: no cover - pinned in requirements.txt
        raise MissingDependency(
            "reading .safetensors files needs the safetensors package", "pip install safetensors"
        ) from e
    out = {}
    try:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                out[key] = f.get_tensor(key).float().numpy()
    except (OSError, ValueError, RuntimeError) as e:
        raise BadInput(
            f"cannot read '{path}' as safetensors ({str(e).splitlines()[0][:80]})",
            "the file is truncated or damaged; download it again",
        ) from e
    except Exception as e:  # noqa: BLE001 - safetensors' own SafetensorError
        raise BadInput(
            f"cannot read '{path}' as safetensors ({str(e).splitlines()[0][:80]})",
            "the file is truncated or damaged; download it again",
        ) from e
    return out


def read_torch(path: str) -> Dict[str, np.ndarray]:
    """A torch state dict file (``pytorch_model.bin``, ``.pth``) as float32 numpy."""
    import torch

    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise BadInput(
            f"cannot read checkpoint '{path}' ({type(e).__name__})",
            "the file is truncated or not a PyTorch state dict",
        ) from e
    if isinstance(sd, dict):
        _refuse_converted(sd, path)
    if not isinstance(sd, dict) or not all(hasattr(v, "shape") for v in sd.values()):
        raise BadInput(f"'{path}' is not a state dict of tensors", "give an RWKV checkpoint")
    return {k: v.detach().float().numpy() for k, v in sd.items()}


def read_weights(path: str) -> Dict[str, np.ndarray]:
    """The tensors of one weights file, or of every shard an ``*.index.json`` lists."""
    if path.endswith(".index.json"):
        try:
            with open(path, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise BadInput(
                f"'{path}' is not a shard index (no 'weight_map')", "download the model folder again"
            ) from e
        out = {}
        for name in shards:
            shard = os.path.join(os.path.dirname(path), name)
            if not os.path.isfile(shard):
                raise BadInput(
                    f"shard '{name}' listed in '{os.path.basename(path)}' is missing",
                    "download every file of the model folder",
                )
            out.update(read_weights(shard))
        return out
    if sniff(path) == "safetensors":
        return read_safetensors(path)
    return read_torch(path)


def sniff(path: str) -> str:
    """What a file is by its first bytes: 'safetensors', 'torch' (zip or pickle), 'gguf',
    'ggml', 'onnx', 'json' or 'unknown'."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:2] == b"PK" or head[:1] == b"\x80":
        return "torch"
    if head[:4] == b"GGUF":
        return "gguf"
    if head[:4] in (b"ggml", b"ggmf", b"ggjt", b"lmgg", b"fmgg", b"tjgg"):
        return "ggml"
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < (1 << 30):
        return "safetensors"
    if head.lstrip()[:1] in (b"{", b"["):
        return "json"
    if path.endswith(".onnx"):
        return "onnx"
    return "unknown"


# --------------------------------------------------------------------------------------------
# the key maps


_TRANSFORMERS_NAMES = {
    "time_mix_key": "time_mix_k",
    "time_mix_value": "time_mix_v",
    "time_mix_receptance": "time_mix_r",
    "time_mix_gate": "time_mix_g",
}


def _from_transformers(sd: Dict[str, np.ndarray], config: dict) -> Dict[str, np.ndarray]:
    """transformers RWKV-4 / RWKV-5 / RWKV-6 -> the official keys."""
    out = {}
    for key, arr in sd.items():
        if key == "head.weight":
            out[key] = arr
            continue
        if not key.startswith("rwkv."):
            raise UnsupportedModel(
                f"unexpected key '{key}' in a transformers RWKV checkpoint",
                "the folder mixes files of several models",
            )
        k = key[len("rwkv.") :]
        k = re.sub(r"^embeddings\.", "emb.", k)
        k = k.replace(".pre_ln.", ".ln0.").replace(".attention.", ".att.")
        k = k.replace(".feed_forward.", ".ffn.")
        parts = k.split(".")
        parts = [_TRANSFORMERS_NAMES.get(p, p) for p in parts]
        out[".".join(parts)] = arr
    if "head.weight" not in out and "emb.weight" in out and config.get("tie_word_embeddings"):
        out["head.weight"] = out["emb.weight"]
    if any(k.endswith("att.time_maa_x") for k in out):  # RWKV-6: time_decay [1, 1, C] as the .pth
        for k in [k for k in out if k.endswith("att.time_decay")]:  # (a fresh HF init has [H, N])
            out[k] = out[k].reshape(1, 1, -1)
    return out


_FLA_LORA = {"w": ("w", True), "a": ("a", True), "v": ("v", True), "g": ("g", False)}
_FLA_BLOCK = {"pre_norm": "ln0", "attn_norm": "ln1", "ffn_norm": "ln2"}
_FLA_ATT = {"r_proj": "receptance", "k_proj": "key", "v_proj": "value", "o_proj": "output", "g_norm": "ln_x"}


def _from_fla(sd: Dict[str, np.ndarray], config: dict) -> Dict[str, np.ndarray]:
    """fla-hub RWKV-7 -> the official keys (LoRA matrices transposed, vectors [1, 1, C])."""
    out = {}

    def vec(a):
        return np.ascontiguousarray(a.reshape(1, 1, -1))

    for key, arr in sd.items():
        if key == "model.embeddings.weight":
            out["emb.weight"] = arr
        elif key == "lm_head.weight":
            out["head.weight"] = arr
        elif key.startswith("model.norm."):
            out["ln_out." + key.split(".")[-1]] = arr
        elif key.startswith("model.layers."):
            _, _, i, *rest = key.split(".")
            b = f"blocks.{i}."
            if rest[0] in _FLA_BLOCK:
                out[b + f"{_FLA_BLOCK[rest[0]]}.{rest[-1]}"] = arr
            elif rest[0] == "ffn":
                out[b + "ffn." + ".".join(rest[1:])] = vec(arr) if rest[1] == "x_k" else arr
            elif rest[0] == "attn":
                _fla_att(out, b + "att.", rest[1:], arr, vec)
            else:
                raise UnsupportedModel(
                    f"unexpected key '{key}' in an fla-hub RWKV-7 checkpoint",
                    "this fla model variant is not supported",
                )
        else:
            raise UnsupportedModel(
                f"unexpected key '{key}' in an fla-hub RWKV-7 checkpoint",
                "the folder mixes files of several models",
            )
    if "head.weight" not in out and "emb.weight" in out and config.get("tie_word_embeddings"):
        out["head.weight"] = out["emb.weight"]
    return out


def _fla_att(out, b: str, rest, arr, vec) -> None:
    name = rest[0]
    if name == "x_x":  # one [6, C] table (an earlier fla layout), rows r, w, k, v, a, g
        for row, m in zip(arr, "rwkvag"):
            out[b + f"x_{m}"] = vec(row)
    elif name.startswith("x_") or name in ("k_k", "k_a"):
        out[b + name] = vec(arr)
    elif name == "r_k":
        out[b + name] = arr
    elif name in _FLA_ATT:
        out[b + f"{_FLA_ATT[name]}.{rest[-1]}"] = arr
    elif name.endswith("_lora") and name[0] in _FLA_LORA and rest[1] == "lora":
        m = name[0]
        which, kind = rest[2], rest[3]
        if which == "0" and kind == "weight":
            out[b + f"{m}1"] = np.ascontiguousarray(arr.T)
        elif which == "2" and kind == "weight":
            out[b + f"{m}2"] = np.ascontiguousarray(arr.T)
        elif which == "2" and kind == "bias":
            out[b + f"{m}0"] = vec(arr)
        else:
            raise UnsupportedModel(
                f"unexpected LoRA tensor 'attn.{'.'.join(rest)}' in an fla-hub RWKV-7 checkpoint",
                "this fla model variant is not supported",
            )
    else:
        raise UnsupportedModel(
            f"unexpected key 'attn.{'.'.join(rest)}' in an fla-hub RWKV-7 checkpoint",
            "this fla model variant is not supported",
        )


MAPPERS: Dict[str, Callable] = {
    "transformers-rwkv4": _from_transformers,
    "hf-rwkv5": _from_transformers,
    "hf-rwkv6": _from_transformers,
    "fla-rwkv7": _from_fla,
}


def format_of(keys, config: dict) -> Optional[str]:
    """The format of a state dict by its keys (config.json names it only for messages), or
    None for the official layout."""
    keys = set(keys)
    if "emb.weight" in keys:
        return None
    if "model.embeddings.weight" in keys and any(".attn.r_proj." in k for k in keys):
        return "fla-rwkv7"
    if "rwkv.embeddings.weight" in keys:
        if any(".attention.time_maa_x" in k for k in keys):
            return "hf-rwkv6"
        if any(".attention.time_faaaa" in k for k in keys):
            return "hf-rwkv5"
        return "transformers-rwkv4"
    arch = _architecture(config)
    sample = ", ".join(sorted(keys)[:3])
    what = f"a {arch} model, not an RWKV checkpoint" if arch else "not an RWKV checkpoint"
    raise UnsupportedModel(
        f"{what} (keys {sample}, ...)",
        "rwkv2rknn exports RWKV-4, 5.2, 6 and 7: the official .pth, transformers "
        "RwkvForCausalLM, Rwkv5/Rwkv6ForCausalLM or fla-hub RWKV7ForCausalLM",
    )


def _architecture(config: dict) -> str:
    archs = config.get("architectures") or []
    return str(archs[0]) if archs else str(config.get("model_type") or "")


# --------------------------------------------------------------------------------------------
# folders


def find_weights(folder: str) -> str:
    """The weights file of a model folder (a shard index before a single file)."""
    for name in (
        "model.safetensors.index.json",
        "model.safetensors",
        "pytorch_model.bin.index.json",
        "pytorch_model.bin",
    ):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    found = sorted(f for f in os.listdir(folder) if f.endswith((".safetensors", ".pth")))
    if len(found) == 1:
        return os.path.join(folder, found[0])
    onnx = [f for f in os.listdir(folder) if f.endswith(".onnx")]
    if onnx:
        raise BadInput(
            f"'{folder}' holds ONNX files, not a checkpoint",
            f"it is exported already: run `rwkv2rknn compile {folder}`",
        )
    raise BadInput(
        f"'{folder}' holds no model weights (no {', '.join(WEIGHT_FILES[:3])} or one .pth)"
        if not found
        else f"'{folder}' holds several weight files ({', '.join(found[:4])})",
        "give the checkpoint file itself",
    )


def read_config(folder: str) -> dict:
    path = os.path.join(folder, CONFIG)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise BadInput(f"cannot read '{path}' ({e})", "download the model folder again") from e
    return config if isinstance(config, dict) else {}


def load_model(path: str) -> Tuple[Dict[str, np.ndarray], Optional[str], str]:
    """(state dict in the official layout, the folder's tokenizer.json or None, what it was)
    of a checkpoint file or a model folder: the official .pth, a Hugging Face folder (or its
    weights file, or its shard index), a .safetensors in any of these layouts."""
    if os.path.isdir(path):
        folder, weights = path, find_weights(path)
    else:
        folder, weights = os.path.dirname(os.path.abspath(path)), path
    kind = "json" if weights.endswith(".index.json") else sniff(weights)
    _refuse_kind(weights, kind)
    config = (
        read_config(folder)
        if (
            os.path.isdir(path)
            or kind == "safetensors"
            or os.path.basename(weights).startswith(("pytorch_model", "model."))
        )
        else {}
    )
    sd = read_weights(weights)
    _refuse_converted(sd, weights)
    fmt = format_of(sd.keys(), config)
    tok = os.path.join(folder, TOKENIZER)
    tok = tok if os.path.isfile(tok) and (fmt or os.path.isdir(path)) else None
    if fmt is None:
        return sd, tok, "official layout"
    return MAPPERS[fmt](sd, config), tok, FORMATS[fmt][1]


def _refuse_kind(path: str, kind: str) -> None:
    name = os.path.basename(path)
    if kind == "gguf":
        raise UnsupportedModel(
            f"'{name}' is a GGUF file (llama.cpp)", "export from the original .pth or the Hugging Face folder"
        )
    if kind == "ggml":
        raise UnsupportedModel(
            f"'{name}' is a ggml file (rwkv.cpp)", "export from the original .pth it was converted from"
        )
    if kind == "onnx" or name.endswith(".onnx"):
        raise BadInput(
            f"'{name}' is an ONNX file, not a checkpoint",
            f"it is exported already: run `rwkv2rknn compile {path}`",
        )
    if kind == "json" and not name.endswith(".index.json"):
        raise BadInput(
            f"'{name}' is a JSON file, not model weights", "give the model folder or its weights file"
        )


def _refuse_converted(sd, path: str) -> None:
    """The `rwkv` package's own converted file (convert_and_save_and_exit) keeps '_strategy'."""
    if "_strategy" in sd or any(k.startswith("_") for k in sd):
        raise UnsupportedModel(
            f"'{os.path.basename(path)}' was converted by the rwkv package for "
            f"one strategy (its weights transposed and cast)",
            "give the original checkpoint it was converted from",
        )
