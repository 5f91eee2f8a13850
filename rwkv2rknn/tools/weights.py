"""Rewrite the weight matrices of one NPU segment of an artifact in place: what a measurement or
a test does to stand for a miscompiled segment (every weight scaled) or for a quantiser (every
weight rounded), through the files the runtime loads, with the manifest's checksums updated."""

from __future__ import annotations

import json
import os
from typing import Callable, Optional, Sequence

import numpy as np

from rwkv2rknn.artifact.plan import MANIFEST, sha256_file

# fn(weight, conv) -> the new weight, or None to leave it: ``conv`` is True for a 1x1 Conv's
# weight [out, in, 1, 1] (the columns forms), False for a MatMul's [in, out]
Rewrite = Callable[[np.ndarray, bool], Optional[np.ndarray]]
FILES = (("onnx", "sha256"), ("seq_onnx", "seq_sha256"))


def rewrite_segment(
    artifact: str, name: str, fn: Rewrite, files: Sequence[str] = ("onnx", "seq_onnx")
) -> int:
    """Apply ``fn`` to every float weight matrix (2-D, or a Conv's weight) of segment ``name``'s
    ONNX files among ``files`` ('onnx': per token, 'seq_onnx': T rows); returns how many weights
    it changed."""
    import onnx
    from onnx import numpy_helper

    path = os.path.join(artifact, MANIFEST)
    with open(path) as f:
        m = json.load(f)
    seg = next(s for s in m["segments"] if s["name"] == name)
    changed = 0
    for key, sha in FILES:
        if key not in files or not seg.get(key):
            continue
        p = os.path.join(artifact, seg[key])
        model = onnx.load(p)
        conv = {n.input[1] for n in model.graph.node if n.op_type == "Conv"}
        for init in model.graph.initializer:
            w = numpy_helper.to_array(init)
            if w.dtype.kind != "f" or not (w.ndim == 2 or init.name in conv):
                continue
            new = fn(w, init.name in conv)
            if new is not None:
                init.CopyFrom(numpy_helper.from_array(new.astype(w.dtype), init.name))
                changed += 1
        onnx.save(model, p)
        seg[sha] = sha256_file(p)
    with open(path, "w") as f:
        json.dump(m, f)
    return changed


def scaled(factor: float) -> Rewrite:
    """Every weight times ``factor``."""
    return lambda w, conv: w * factor
