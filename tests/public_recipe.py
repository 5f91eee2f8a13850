"""The public recipe for per-layer RWKV-4 ONNX files, rebuilt with the real tools for tests.

A per-stage torch module in the style of the "RWKV in 150 lines" script, exported one file per
stage with ``torch.onnx.export(opset_version=16)`` (the TorchScript exporter), then converted by
onnxconverter-common's ``convert_float_to_float16`` with default arguments.
"""

from __future__ import annotations

import os



def _modules(sd):
    import torch
    import torch.nn.functional as F

    t = {k: torch.tensor(v) for k, v in sd.items()}
    C = t["emb.weight"].shape[1]

    class Embed(torch.nn.Module):
        def forward(self, token):
            x = t["emb.weight"][token]
            x = F.layer_norm(x, (C,), weight=t["blocks.0.ln0.weight"], bias=t["blocks.0.ln0.bias"])
            return torch.flatten(x)

    class Block(torch.nn.Module):
        def __init__(self, i):
            super().__init__()
            self.p = {k[len(f"blocks.{i}."):]: v for k, v in t.items() if k.startswith(f"blocks.{i}.")}

        def forward(self, x, state):
            p = self.p
            xx = F.layer_norm(x, (C,), weight=p["ln1.weight"], bias=p["ln1.bias"])
            xk = xx * p["att.time_mix_k"].flatten() + state[1] * (1 - p["att.time_mix_k"].flatten())
            xv = xx * p["att.time_mix_v"].flatten() + state[1] * (1 - p["att.time_mix_v"].flatten())
            xr = xx * p["att.time_mix_r"].flatten() + state[1] * (1 - p["att.time_mix_r"].flatten())
            r = torch.sigmoid(p["att.receptance.weight"] @ xr)
            k = p["att.key.weight"] @ xk
            v = p["att.value.weight"] @ xv
            aa, bb, pp = state[2], state[3], state[4]
            ww = p["att.time_first"] + k
            q = torch.maximum(pp, ww)
            e1 = torch.exp(pp - q)
            e2 = torch.exp(ww - q)
            wkv = (e1 * aa + e2 * v) / (e1 * bb + e2)
            ww = pp + -torch.exp(p["att.time_decay"])
            q = torch.maximum(ww, k)
            e1 = torch.exp(ww - q)
            e2 = torch.exp(k - q)
            aa2, bb2, pp2 = e1 * aa + e2 * v, e1 * bb + e2, q
            x = x + p["att.output.weight"] @ (r * wkv)
            xx2 = F.layer_norm(x, (C,), weight=p["ln2.weight"], bias=p["ln2.bias"])
            xk = xx2 * p["ffn.time_mix_k"].flatten() + state[0] * (1 - p["ffn.time_mix_k"].flatten())
            xr = xx2 * p["ffn.time_mix_r"].flatten() + state[0] * (1 - p["ffn.time_mix_r"].flatten())
            r = torch.sigmoid(p["ffn.receptance.weight"] @ xr)
            k = torch.square(torch.relu(p["ffn.key.weight"] @ xk))
            x = x + r * (p["ffn.value.weight"] @ k)
            return x, torch.stack([xx2, xx, aa2, bb2, pp2])

    class Head(torch.nn.Module):
        def forward(self, x):
            x = F.layer_norm(x, (C,), weight=t["ln_out.weight"], bias=t["ln_out.bias"])
            return torch.flatten(t["head.weight"] @ x)

    return Embed(), Block, Head(), C


def export_public(sd, out_dir: str, fp16: bool = True) -> str:
    """Per-layer files from state dict ``sd`` by the public recipe; returns ``out_dir``."""
    import onnx
    import torch

    embed, Block, head, C = _modules(sd)
    layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    os.makedirs(out_dir, exist_ok=True)
    stages = [("embed.onnx", embed, (torch.tensor([1], dtype=torch.int32),), ["token"], ["output"])]
    for i in range(layers):
        stages.append((f"mixing_{i}.onnx", Block(i), (torch.zeros(C), torch.zeros(5, C)),
                       ["input", "state_in"], ["output", "state_out"]))
    stages.append(("head.onnx", head, (torch.zeros(C),), ["x"], ["output"]))
    for name, module, args, ins, outs in stages:
        path = os.path.join(out_dir, name)
        with torch.no_grad():
            torch.onnx.export(module, args, path, opset_version=16, input_names=ins,
                              output_names=outs, dynamo=False, do_constant_folding=True)
        if fp16:
            from onnxconverter_common import float16
            onnx.save(float16.convert_float_to_float16(onnx.load(path)), path)
    return out_dir
