"""The bundled default model: a small byte-level RWKV-4 trained on English text (see README.md).

``ensure_compiled`` exports and compiles it on first use into the user's cache folder
($XDG_CACHE_HOME/rwkv2rknn/default/<checkpoint hash>/), and reuses that afterwards.
"""

from __future__ import annotations

import hashlib
import os
from typing import Callable, Optional

from rwkv2rknn.errors import BadInput

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKPOINT = os.path.join(HERE, "default", "rwkv4-bytes.pth")


def checkpoint_path() -> str:
    if not os.path.exists(CHECKPOINT):
        raise BadInput(f"the bundled model is missing ({CHECKPOINT})",
                       "reinstall rwkv2rknn, or give an artifact: rwkv2rknn run ARTIFACT --prompt ...")
    return CHECKPOINT


def cache_folder() -> str:
    from rwkv2rknn.fileio import cache_root
    with open(checkpoint_path(), "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    return os.path.join(cache_root(), "default", digest)


def ensure_compiled(echo: Optional[Callable[[str], None]] = None,
                    plan_only: Optional[bool] = None) -> str:
    """The artifact folder of the default model, exporting and compiling it if needed (with
    ``plan_only`` None: .rknn builds only where rknn-toolkit2 is installed)."""
    from rwkv2rknn.compiler.driver import compile_model, segment_line
    from rwkv2rknn.compiler.ir import Options
    from rwkv2rknn.models.checkpoint import load_checkpoint
    from rwkv2rknn.models.export import MODEL_JSON, export
    from rwkv2rknn.artifact.plan import MANIFEST
    from rwkv2rknn.rknn.toolkit import toolkit_installed

    echo = echo or (lambda m: None)
    root = cache_folder()
    onnx_dir, artifact = os.path.join(root, "onnx"), os.path.join(root, "artifact")
    if os.path.exists(os.path.join(artifact, MANIFEST)):
        return artifact
    if not os.path.exists(os.path.join(onnx_dir, MODEL_JSON)):
        echo(f"exporting the bundled model to {onnx_dir} ...")
        export(load_checkpoint(checkpoint_path()), onnx_dir, tokenizer="bytes", force=True)
    if plan_only is None:
        plan_only = not toolkit_installed()
    echo(f"compiling it to {artifact} (first use only) ...")
    compile_model(onnx_dir, artifact, Options(plan_only=plan_only), force=True,
                  progress=lambda *a: echo(segment_line(*a)))
    return artifact
