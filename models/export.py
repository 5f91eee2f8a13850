"""Export an RWKV-4 checkpoint to the public per-layer ONNX layout.

Files: ``embed.onnx``, ``mixing_{i}.onnx``, ``head.onnx`` (names, shapes and state rows as the
public files), plus ``rwkv2rknn-model.json`` describing the model. fp16 by default, made by
onnxconverter-common's ``convert_float_to_float16`` with default arguments, exactly as the public
files were; ``fp32=True`` keeps float32.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Dict, Optional

import numpy as np

from rwkv2rknn import io
from rwkv2rknn.errors import MissingDependency
from rwkv2rknn.models import rwkv4

log = logging.getLogger(__name__)
MODEL_JSON = "rwkv2rknn-model.json"


def to_fp16(model):
    try:
        from onnxconverter_common import float16
    except ImportError as e:
        raise MissingDependency("fp16 export needs onnxconverter-common",
                                "pip install onnxconverter-common (or pass --fp32)") from e
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        # the converter warns once per constant it clamps to 1e-7 <= |x| <= 1e4
        warnings.simplefilter("always")
        out = float16.convert_float_to_float16(model)
    clamped = sum("truncated" in str(w.message) for w in caught)
    if clamped:
        log.info("fp16 conversion clamped %d constant value(s) to 1e-7 <= |x| <= 1e4", clamped)
    return out


def export(sd: Dict[str, np.ndarray], out_dir: str, fp32: bool = False,
           tokenizer: Optional[str] = None, force: bool = False,
           progress: Optional[Callable[[str], None]] = None) -> rwkv4.Shape:
    """Write the per-layer files of ``sd`` (validated) into ``out_dir``, atomically."""
    shape = rwkv4.check_state_dict(sd)
    stages = [(rwkv4.EMBED_FILE, lambda: rwkv4.embed_graph(sd))]
    stages += [(rwkv4.BLOCK_FILE.format(i), (lambda i=i: rwkv4.block_graph(sd, i)))
               for i in range(shape.layers)]
    stages += [(rwkv4.HEAD_FILE, lambda: rwkv4.head_graph(sd))]
    with io.atomic_dir(out_dir, MODEL_JSON, force=force) as tmp:
        for name, build in stages:
            model = build()
            if not fp32:
                model = to_fp16(model)
            io.save_onnx(model, os.path.join(tmp, name))
            if progress:
                progress(name)
        io.write_json(os.path.join(tmp, MODEL_JSON), {
            "arch": rwkv4.ARCH, "shape": shape.to_dict(), "dtype": "float32" if fp32 else "float16",
            "tokenizer": tokenizer, "state_rows": list(rwkv4.STATE_ROWS)})
    log.info("exported %s (%d layers, width %d, vocab %d) to %s", rwkv4.ARCH, shape.layers,
             shape.width, shape.vocab, out_dir)
    return shape
