"""The public recipe for per-layer RWKV-4 ONNX files, rebuilt with the real tools for tests.

Per-stage torch modules over the token form of ``training/rwkv4_torch.py`` (one token, every
matrix product ``W[out, in] @ x[in]``, as in the "RWKV in 150 lines" script the public files
came from), exported one file per stage with ``torch.onnx.export(opset_version=16)`` (the
TorchScript exporter), then converted by onnxconverter-common's ``convert_float_to_float16``
with default arguments.
"""

from __future__ import annotations

import os


def _modules(sd):
    import torch
    from rwkv4_torch import RWKV4  # training/, on the path by conftest.py

    model = RWKV4.from_state_dict(sd)
    # The public script held its weights as plain tensors, not parameters: the exporter records
    # them as Constant nodes and folds what depends only on them (-exp(time_decay), 1 - mix).
    for mod in model.modules():
        for name, p in list(mod.named_parameters(recurse=False)):
            del mod._parameters[name]
            setattr(mod, name, p.detach())

    class Embed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.ln0 = model.emb, model.blocks[0].ln0

        def forward(self, token):
            return torch.flatten(self.ln0(self.emb(token)))

    class Block(torch.nn.Module):
        """state [5, C] in and out, rows (ffn_xx, att_xx, aa, bb, pp)."""

        def __init__(self, i):
            super().__init__()
            self.block = model.blocks[i]

        def forward(self, x, state):
            x, new = self.block(x, tuple(state[r] for r in range(state.shape[0])))
            return x, torch.stack(new)

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_out, self.head = model.ln_out, model.head

        def forward(self, x):
            return torch.flatten(self.head(self.ln_out(x)))

    return Embed(), Block, Head(), model.width, model.layers


def export_public(sd, out_dir: str, fp16: bool = True) -> str:
    """Per-layer files from state dict ``sd`` by the public recipe; returns ``out_dir``."""
    import onnx
    import torch

    embed, Block, head, C, layers = _modules(sd)
    os.makedirs(out_dir, exist_ok=True)
    stages = [("embed.onnx", embed, (torch.tensor([1], dtype=torch.int32),), ["token"], ["output"])]
    for i in range(layers):
        stages.append(
            (
                f"mixing_{i}.onnx",
                Block(i),
                (torch.zeros(C), torch.zeros(5, C)),
                ["input", "state_in"],
                ["output", "state_out"],
            )
        )
    stages.append(("head.onnx", head, (torch.zeros(C),), ["x"], ["output"]))
    for name, module, args, ins, outs in stages:
        path = os.path.join(out_dir, name)
        with torch.no_grad():
            torch.onnx.export(
                module,
                args,
                path,
                opset_version=16,
                input_names=ins,
                output_names=outs,
                dynamo=False,
                do_constant_folding=True,
            )
        if fp16:
            from onnxconverter_common import float16

            onnx.save(float16.convert_float_to_float16(onnx.load(path)), path)
    return out_dir
