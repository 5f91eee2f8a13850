"""The bundled default model (``rwkv2rknn.models.bundled``), exported and compiled on first use
into the user's cache folder and reused afterwards. The compile side runs it: the runtime opens
only what it is given."""

from __future__ import annotations

import os
from typing import Callable, Optional

from rwkv2rknn.artifact.plan import MANIFEST
from rwkv2rknn.compiler.driver import compile_model, segment_line
from rwkv2rknn.compiler.ir import Options
from rwkv2rknn.models.bundled import cache_folder, checkpoint_path
from rwkv2rknn.rknn.toolkit import toolkit_installed


def ensure_compiled(echo: Optional[Callable[[str], None]] = None, plan_only: Optional[bool] = None) -> str:
    """The artifact folder of the default model, exporting and compiling it if needed (with
    ``plan_only`` None: .rknn builds only where rknn-toolkit2 is installed)."""
    from rwkv2rknn.models.checkpoint import load_checkpoint  # torch: only for a first export
    from rwkv2rknn.models.export import MODEL_JSON, export

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
    compile_model(
        onnx_dir,
        artifact,
        Options(plan_only=plan_only),
        force=True,
        progress=lambda *a: echo(segment_line(*a)),
    )
    return artifact
