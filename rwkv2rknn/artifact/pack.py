"""``rwkv2rknn pack ARTIFACT -o DIR``: exactly what the board runtime loads, nothing else.

A packed artifact holds the NPU segments as ``.rknn`` (and ``.seq.rknn``) only, the CPU segments
as ONNX (and their ``.seq.onnx``), the NPU segments' golden vectors (the board's self-test), the
tokenizer file, and ``manifest.json`` marked ``packed``
with the NPU segments' ONNX entries removed. The board backends (``rknn-rt``, ``rknn-lite``) run
it; ``ort`` and ``rknn-sim`` refuse it in one line (they need the NPU segments' ONNX).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Dict

from rwkv2rknn import fileio
from rwkv2rknn.errors import BadInput, UsageError
from rwkv2rknn.artifact.plan import MANIFEST, sha256_file


def pack(artifact: str, out_dir: str, force: bool = False) -> Dict[str, int]:
    """Write the packed copy of ``artifact`` to ``out_dir``; returns its bytes, the model's
    parameter count and the board's memory need (bytes, and described)."""
    from rwkv2rknn.runtime import device
    from rwkv2rknn.runtime.hybrid import load_manifest
    from rwkv2rknn.runtime.loader import TOKENIZER_DIR, tokenizer_file

    m = load_manifest(artifact)
    if m.packed:
        raise UsageError(f"'{artifact}' is packed already", "copy it to the board as it is")
    if not m.token_input or not m.logits_output:
        raise BadInput(
            f"'{artifact}' was compiled from a single ONNX graph, not a whole model",
            "compile the folder of per-layer files to pack it",
        )
    no_rknn = [s.name for s in m.segments if s.backend == "npu" and not (s.token.rknn or s.seq.rknn)]
    if no_rknn:
        raise BadInput(
            f"'{artifact}' has NPU segments without .rknn ({no_rknn[0]}, ...; compiled with --plan-only)",
            "compile it without --plan-only, then pack",
        )
    if os.path.abspath(out_dir) == os.path.abspath(artifact):
        raise UsageError("pack writes a new folder", "give another -o DIR")
    segments, files = [], []
    for s in m.segments:
        if s.golden:  # the board's self-test
            files.append((s.golden, s.golden_sha256))
        if s.backend == "npu":
            files += [(b.rknn, b.rknn_sha256) for b in (s.token, s.seq)]
            segments.append(
                dataclasses.replace(  # the ONNX and datasets are the simulator's
                    s,
                    token=dataclasses.replace(s.token, onnx="", sha256="", calib=None),
                    seq=dataclasses.replace(s.seq, onnx=None, sha256="", calib=None),
                )
            )
        else:
            files += [(b.onnx, b.sha256) for b in (s.token, s.seq)]
            segments.append(s)
    _, tok = tokenizer_file(m.tokenizer)
    if tok and not os.path.isabs(tok) and tok.startswith(TOKENIZER_DIR + "/"):
        files.append((tok, ""))
    packed = dataclasses.replace(m, segments=tuple(segments), packed=True)
    with fileio.atomic_dir(out_dir, MANIFEST, force=force) as tmp:
        for rel, sha in files:
            if not rel:
                continue
            src = os.path.join(artifact, rel)
            if not os.path.isfile(src):
                raise BadInput(f"'{src}' is missing", "compile the model again")
            if sha and sha256_file(src) != sha:
                raise BadInput(
                    f"'{src}' changed since it was compiled (checksum mismatch)", "compile the model again"
                )
            os.makedirs(os.path.dirname(os.path.join(tmp, rel)), exist_ok=True)
            shutil.copyfile(src, os.path.join(tmp, rel))
            if rel.endswith(".onnx") and os.path.isfile(src + ".data"):  # its external weights
                shutil.copyfile(src + ".data", os.path.join(tmp, rel) + ".data")
        fileio.write_json(os.path.join(tmp, MANIFEST), packed.to_dict())
        need = device.memory_need(packed, tmp)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out_dir) for f in fs)
    return {
        "bytes": size,
        "parameters": parameter_count(artifact, m),
        "memory": need["total"],
        "need": device.describe_need(need),
    }


def parameter_count(artifact: str, manifest) -> int:
    """Weights of the model: the float initializers (of two or more values) of the per-token
    segments, where each weight lives once; constants folded at export count too (under 1% of
    a small model)."""
    import onnx

    # float weights, and a token table stored as int8 (rwkv2rknn.embedding; its row scales are
    # not parameters of the model)
    floats = {
        onnx.TensorProto.FLOAT,
        onnx.TensorProto.FLOAT16,
        onnx.TensorProto.BFLOAT16,
        onnx.TensorProto.INT8,
    }
    n = 0
    for s in manifest.segments:
        model = onnx.load(os.path.join(artifact, s.token.onnx), load_external_data=False)
        for init in model.graph.initializer:
            size = 1
            for d in init.dims:
                size *= d
            n += size if init.data_type in floats and size > 1 and not init.name.endswith("/row_scale") else 0
    return n
