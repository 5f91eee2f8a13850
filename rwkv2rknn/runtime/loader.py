"""Open what `run` and `eval` are given: a compiled artifact, an uncompiled folder of per-layer
files (run by pure ONNX Runtime), or nothing (the bundled model, compiled on first use).

``open_model`` returns the model (``step``, ``init_state``, ``logits``, ``vocab``; artifacts also
``prefill``) and the tokenizer spec recorded with it.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Optional, Tuple

from rwkv2rknn import io
from rwkv2rknn.errors import UsageError
from rwkv2rknn.plan import MANIFEST

log = logging.getLogger(__name__)


def is_per_layer_folder(path: str) -> bool:
    """An uncompiled folder of per-layer files (embed.onnx, mixing_N.onnx, head.onnx)."""
    return (os.path.isdir(path) and not os.path.exists(os.path.join(path, MANIFEST))
            and os.path.exists(os.path.join(path, "embed.onnx")))


def open_model(path: Optional[str], backend: str = "auto", core_mask: str = "auto",
               echo: Optional[Callable[[str], None]] = None) -> Tuple[object, Optional[str]]:
    """(model, tokenizer spec) for ``path``: an artifact on ``backend``, a per-layer folder on
    pure ONNX Runtime (``backend`` ort or auto only), or with ``path`` None the bundled model.
    ``echo`` hears which backend was chosen and any notes."""
    echo = echo or log.info
    if path is None:
        from rwkv2rknn.models import bundled  # compiles it on first use (not on a board)
        path = bundled.ensure_compiled(echo=echo)
    if is_per_layer_folder(path):
        if backend not in ("ort", "auto"):
            raise UsageError(f"'{path}' is an uncompiled per-layer model: it runs only with --backend ort",
                             f"compile it first: rwkv2rknn compile {path} -o OUT")
        from rwkv2rknn.runtime.reference import PerLayerModel
        echo("backend: pure onnxruntime over the per-layer files")
        model = PerLayerModel(path)
        for note in model.notes:
            echo(f"note: {note}")
        return model, io.model_facts(path).get("tokenizer")
    from rwkv2rknn.runtime.hybrid import HybridModel, load_manifest, resolve_backend
    load_manifest(path)
    chosen = resolve_backend(backend)
    if backend == "auto":
        echo(f"backend: {chosen} (auto)")
    model = HybridModel(path, backend=chosen, core_mask=core_mask)
    return model, model.manifest.tokenizer
