"""Pure ONNX Runtime over the source files: the reference every comparison is made against.

``PerLayerModel`` steps ``embed -> mixing_0..L-1 -> head`` one token at a time from the zero
state, exactly as the public demo does, in the files' own dtype (fp16 or fp32);
``WholeFileModel`` steps a whole model in one file from its initial state.
"""

from __future__ import annotations

import logging
import os
import re
from typing import List, Sequence, Tuple

import numpy as np

from rwkv2rknn import fileio
from rwkv2rknn.errors import BadInput, UnsupportedModel
from rwkv2rknn.runtime.ort import OrtRunner

log = logging.getLogger(__name__)


def stage_files(folder: str) -> Tuple[str, List[str], str]:
    """The embed, mixing_i (in order) and head paths of a per-layer folder, checked."""
    if not os.path.isdir(folder):
        raise BadInput(
            f"model folder '{folder}' does not exist",
            "give a folder of per-layer RWKV ONNX files (embed.onnx, mixing_N.onnx, head.onnx)",
        )
    names = os.listdir(folder)
    idx = sorted(int(m.group(1)) for n in names if (m := re.fullmatch(r"mixing_(\d+)\.onnx", n)))
    for need in ("embed.onnx", "head.onnx"):
        if need not in names:
            raise BadInput(
                f"'{folder}' has no {need}",
                "give a folder of per-layer RWKV ONNX files (embed.onnx, mixing_N.onnx, head.onnx)",
            )
    if not idx:
        raise BadInput(f"'{folder}' has no mixing_N.onnx files", "export the model again")
    missing = sorted(set(range(idx[-1] + 1)) - set(idx))
    if missing:
        raise BadInput(
            f"'{folder}' is missing mixing_{missing[0]}.onnx",
            f"layers 0..{idx[-1]} must all be there; export the model again",
        )
    want = _described_layers(folder)
    if want and want > len(idx):
        raise BadInput(
            f"'{folder}' is missing mixing_{len(idx)}.onnx (rwkv2rknn-model.json says {want} layers)",
            f"layers 0..{want - 1} must all be there; export the model again",
        )
    return (
        os.path.join(folder, "embed.onnx"),
        [os.path.join(folder, f"mixing_{i}.onnx") for i in idx],
        os.path.join(folder, "head.onnx"),
    )


def _described_layers(folder: str) -> int:
    """The layer count our exporter recorded beside the files (0 if there is no readable record)."""
    shape = fileio.model_facts(folder).get("shape")
    n = shape.get("layers") if isinstance(shape, dict) else 0
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 0


def one_width(widths) -> int:
    """The one width ``widths()`` (a set of the files' widths) finds, or a one-line error."""
    try:
        found = widths()
    except (TypeError, ValueError, IndexError) as e:
        raise UnsupportedModel(
            f"the per-layer files have no fixed width ({e})", "this is not the per-layer RWKV ONNX layout"
        ) from e
    if len(found) != 1:
        raise UnsupportedModel(
            f"the per-layer files disagree on the width ({sorted(found)})",
            "all files must come from one export",
        )
    return found.pop()


V_FIRST = "v_first"  # RWKV-7: layer 0's value vector, read by every later layer


class PerLayerModel:
    """The per-layer files run one token at a time by ONNX Runtime.

    Two block layouts: the public RWKV-4 one (``input, state_in [rows, C]`` -> ``output,
    state_out``), whose state is an array [layers, rows, C]; and named state slots (RWKV-5.2/6/7:
    ``input, [v_first,] att_shift, wkv, ffn_shift`` -> ``output, [v_first,] att_shift_out, ...``),
    whose state is one flat array holding every layer's slots in file order (``slots`` gives
    each one's layer, name, offset and shape).
    """

    def __init__(self, folder: str, threads: int = 0):
        embed, blocks, head = stage_files(folder)
        self.folder = folder
        self.embed = OrtRunner(embed, "embed.onnx", threads)
        self.blocks = [OrtRunner(p, os.path.basename(p), threads) for p in blocks]
        self.head = OrtRunner(head, "head.onnx", threads)
        fell_back = [r for r in (self.embed, *self.blocks, self.head) if r.note]
        self.notes = (
            [f"{len(fell_back)} file(s): onnxruntime's default optimisation failed; used ORT_ENABLE_EXTENDED"]
            if fell_back
            else []
        )
        self.rows_layout = self.blocks[0].inputs == ["input", "state_in"]
        self._check_io()
        self.dtype = self.blocks[0].input_types["input"]
        try:
            self.width = int(self.head.input_shapes["x"][0])
            self.vocab = int(self.head.session.get_outputs()[0].shape[-1])
            self.slots = self._slots()
        except (TypeError, ValueError, IndexError) as e:
            raise UnsupportedModel(
                f"the per-layer files have no fixed state or vocabulary shape ({e})",
                "this is not the per-layer RWKV ONNX layout",
            ) from e
        self.layers = len(self.blocks)
        if self.rows_layout:
            self.state_shape = (self.layers,) + tuple(self.slots[0][3])
        else:
            self.state_shape = (sum(int(np.prod(s[3])) for s in self.slots),)

    def _slots(self):
        """[(layer, input name, offset, shape)]: the state tensors of every block in order."""
        out, offset = [], 0
        for i, block in enumerate(self.blocks):
            names = (
                ["state_in"] if self.rows_layout else [n for n in block.inputs if n not in ("input", V_FIRST)]
            )
            for name in names:
                shape = tuple(int(d) for d in block.input_shapes[name])
                out.append((i, name, offset, shape))
                offset += int(np.prod(shape))
        return out

    def _check_io(self):
        want = [(self.embed, ["token"], ["output"]), (self.head, ["x"], ["output"])]
        inter = V_FIRST in self.blocks[0].outputs  # RWKV-7 passes v_first; RWKV-6 passes nothing
        for i, b in enumerate(self.blocks):
            if self.rows_layout:
                want.append((b, ["input", "state_in"], ["output", "state_out"]))
                continue
            names = [n for n in b.inputs if n not in ("input", V_FIRST)]
            ins = ["input"] + ([V_FIRST] if i and inter else []) + names
            outs = ["output"] + ([] if i or not inter else [V_FIRST]) + [n + "_out" for n in names]
            want.append((b, ins, outs))
        for runner, ins, outs in want:
            if runner.inputs != ins or runner.outputs != outs:
                raise UnsupportedModel(
                    f"{runner.name} has inputs {runner.inputs} and outputs {runner.outputs}, "
                    f"expected {ins} and {outs}",
                    "this is not the per-layer RWKV ONNX layout",
                )

        def widths():
            found = {int(b.input_shapes["input"][0]) for b in self.blocks}
            if self.rows_layout:
                found |= {int(b.input_shapes["state_in"][1]) for b in self.blocks}
            return found | {int(self.head.input_shapes["x"][0])}

        one_width(widths)

    def init_state(self) -> np.ndarray:
        return np.zeros(self.state_shape, dtype=self.dtype)

    def step(self, token: int, state: np.ndarray) -> np.ndarray:
        """Advance by one token; updates ``state`` in place and returns float32 logits [V]."""
        x = self.embed.infer({"token": np.array([token], np.int32)})["output"]
        if self.rows_layout:
            for i, block in enumerate(self.blocks):
                out = block.infer({"input": x, "state_in": state[i]})
                x = out["output"]
                state[i] = out["state_out"]
            return self.head.infer({"x": x})["output"].astype(np.float32)
        views = [[] for _ in self.blocks]
        for layer, name, offset, shape in self.slots:
            views[layer].append((name, state[offset : offset + int(np.prod(shape))].reshape(shape)))
        carried = {}
        for block, slots in zip(self.blocks, views):
            feed = {"input": x, **carried, **dict(slots)}
            out = block.infer({k: feed[k] for k in block.inputs})
            x = out["output"]
            if V_FIRST in out:
                carried[V_FIRST] = out[V_FIRST]
            for name, view in slots:
                view[...] = out[name + "_out"]
        return self.head.infer({"x": x})["output"].astype(np.float32)

    def state_by_slot(self, state: np.ndarray) -> dict:
        """{(layer, slot name): view} of a named-slot state ({} for the rows layout)."""
        if self.rows_layout:
            return {}
        return {
            (layer, name): state[o : o + int(np.prod(shape))].reshape(shape)
            for layer, name, o, shape in self.slots
        }

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Teacher-forced logits [T, V] from the zero state."""
        state = self.init_state()
        return np.stack([self.step(int(t), state) for t in tokens])


class WholeFileModel:
    """A whole model in one .onnx file run by ONNX Runtime, one token a step: the reference for
    artifacts compiled from such a file. ``source_state`` lists the file's (state input, state
    output, initial value) as the compiler recognised them; the token and logits keep their
    names in the artifact."""

    def __init__(self, path: str, token: str, logits: str, source_state, threads: int = 0):
        if not os.path.isfile(path):
            raise BadInput(
                f"the model file the artifact was compiled from is not at '{path}'",
                "put it back, or compile the model again",
            )
        self.runner = OrtRunner(path, os.path.basename(path), threads)
        self.token, self.logits_name = token, logits
        self.pairs = [(str(i), str(o), float(v)) for i, o, v in source_state]
        missing = [n for n in [token] + [i for i, _, _ in self.pairs] if n not in self.runner.inputs]
        if missing or logits not in self.runner.outputs:
            raise BadInput(
                f"'{path}' is not the model the artifact was compiled from (no '{(missing or [logits])[0]}')",
                "compile the model again",
            )
        shapes = self.runner.input_shapes
        self.token_shape = [d if isinstance(d, int) else 1 for d in shapes[token]]
        self.state_shapes = {i: [d if isinstance(d, int) else 1 for d in shapes[i]] for i, _, _ in self.pairs}
        out = self.runner.session.get_outputs()[self.runner.outputs.index(logits)]
        self.vocab = int(out.shape[-1]) if out.shape and isinstance(out.shape[-1], int) else 0

    def init_state(self) -> dict:
        return {i: np.full(self.state_shapes[i], v, self.runner.input_types[i]) for i, _, v in self.pairs}

    def step(self, token: int, state: dict) -> np.ndarray:
        """Advance by one token; updates ``state`` in place and returns float32 logits [V]."""
        feed = dict(state)
        feed[self.token] = np.full(self.token_shape, token)
        out = self.runner.infer(feed)
        for i, o, _ in self.pairs:  # some exporters' new state has extra unit axes
            state[i] = out[o].reshape(self.state_shapes[i])
        return np.asarray(out[self.logits_name], np.float32).reshape(-1)

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        state = self.init_state()
        return np.stack([self.step(int(t), state) for t in tokens])
