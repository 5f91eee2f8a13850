"""Open what `run` and `eval` are given: a compiled artifact, or an uncompiled folder of per-layer
files (run by pure ONNX Runtime). (Given nothing, the command line compiles the bundled model
first: ``rwkv2rknn.compiler.bundled``; the runtime never starts a compile.)

``open_model`` returns the model (``step``, ``init_state``, ``logits``, ``vocab``; artifacts also
``prefill``) and the tokenizer spec recorded with it.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Optional, Tuple

from rwkv2rknn import fileio
from rwkv2rknn.errors import UsageError
from rwkv2rknn.artifact.plan import MANIFEST

log = logging.getLogger(__name__)


def is_per_layer_folder(path: str) -> bool:
    """An uncompiled folder of per-layer files (embed.onnx, mixing_N.onnx, head.onnx)."""
    return (
        os.path.isdir(path)
        and not os.path.exists(os.path.join(path, MANIFEST))
        and os.path.exists(os.path.join(path, "embed.onnx"))
    )


def open_model(
    path: str,
    backend: str = "auto",
    core_mask: str = "auto",
    echo: Optional[Callable[[str], None]] = None,
    rknn_io: str = "auto",
    verify: bool = False,
) -> Tuple[object, Optional[str]]:
    """(model, tokenizer spec) for ``path``: an artifact on ``backend``, or a per-layer folder on
    pure ONNX Runtime (``backend`` ort or auto only). ``echo`` hears which backend was chosen and
    any notes. An artifact on a board backend is self-tested against its golden vectors on its
    first run there (``verify``: every time, on any backend); ``rknn_io``: rknn-rt's io path
    (copy, zero-copy, auto)."""
    echo = echo or log.info
    if path is None:
        raise UsageError("no model given", "give a compiled ARTIFACT folder")
    if is_per_layer_folder(path):
        if backend not in ("ort", "auto"):
            raise UsageError(
                f"'{path}' is an uncompiled per-layer model: it runs only with --backend ort",
                f"compile it first: rwkv2rknn compile {path} -o OUT",
            )
        from rwkv2rknn.runtime.reference import PerLayerModel

        echo("backend: pure onnxruntime over the per-layer files")
        model = PerLayerModel(path)
        for note in model.notes:
            echo(f"note: {note}")
        return model, fileio.model_facts(path).get("tokenizer")
    from rwkv2rknn.runtime.hybrid import HybridModel, load_manifest, resolve_backend

    load_manifest(path)
    chosen = resolve_backend(backend)
    if backend == "auto":
        echo(f"backend: {chosen} (auto)")
    model = HybridModel(path, backend=chosen, core_mask=core_mask, rknn_io=rknn_io)
    try:
        from rwkv2rknn.runtime import selftest

        report = selftest.ensure(model, echo, force=verify)
        if report is not None and verify:
            for c in report.checks:
                echo(c.line())
    except BaseException:
        model.close()
        raise
    return model, artifact_tokenizer(model.manifest.tokenizer, path)


TOKENIZER_DIR = "tokenizer"  # inside an artifact: the tokenizer file it was compiled with


def tokenizer_file(spec: Optional[str]) -> Tuple[str, str]:
    """(prefix, path) of a tokenizer spec that names a file: 'world:P' -> ('world:', P), 'hf:P' ->
    ('hf:', P), a path -> ('', P); ('', '') for 'bytes' and 'world' (no file of its own)."""
    s = (spec or "").strip()
    if s.lower() in ("", "bytes", "byte", "world"):
        return "", ""
    for prefix in ("world:", "hf:"):
        if s.lower().startswith(prefix):
            return prefix, s[len(prefix) :]
    return "", s


def artifact_tokenizer(spec: Optional[str], artifact: str) -> Optional[str]:
    """The spec with a file stored inside the artifact (relative) made a path from here."""
    prefix, rel = tokenizer_file(spec)
    if rel and not os.path.isabs(rel) and os.path.exists(os.path.join(artifact, rel)):
        return prefix + os.path.join(artifact, rel)
    return spec


def bundle_tokenizer(spec: Optional[str], source: str, out_dir: str) -> Optional[str]:
    """Copy the tokenizer file ``spec`` names (a path as given at export: absolute, relative to
    here or to the ``source`` model folder; 'world' means the vocabulary the rwkv package ships)
    into ``out_dir``/tokenizer/, and return the spec naming it relative to ``out_dir``. Specs
    without a file come back as they are; a file that cannot be found is logged and kept."""
    import shutil

    if (spec or "").strip().lower() == "world":
        from rwkv2rknn.runtime.tokenizer import find_world_vocab

        try:
            prefix, path = "world:", find_world_vocab()
        except Exception as e:  # noqa: BLE001 - the board then needs the rwkv package or a path
            log.warning("the World vocabulary is not copied into the artifact (%s)", e)
            return spec
    else:
        prefix, path = tokenizer_file(spec)
    if not path:
        return spec
    found = next((p for p in (os.path.expanduser(path), os.path.join(source, path)) if os.path.exists(p)), "")
    if not found:
        log.warning("tokenizer file '%s' not found: the artifact records the spec as given", path)
        return spec
    if os.path.isdir(found):  # a Hugging Face folder holding tokenizer.json
        found = os.path.join(found, "tokenizer.json")
    rel = f"{TOKENIZER_DIR}/{os.path.basename(found)}"
    os.makedirs(os.path.join(out_dir, TOKENIZER_DIR), exist_ok=True)
    shutil.copyfile(found, os.path.join(out_dir, rel))
    return prefix + rel
