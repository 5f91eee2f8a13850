"""The bundled default model: a small byte-level RWKV-4 trained on English text (see README.md).

``rwkv2rknn.compiler.bundled.ensure_compiled`` exports and compiles it on first use into the
user's cache folder (``cache_folder``: $XDG_CACHE_HOME/rwkv2rknn/default/<checkpoint hash>/), and
reuses that afterwards.
"""

from __future__ import annotations

import hashlib
import os
from rwkv2rknn.errors import BadInput

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKPOINT = os.path.join(HERE, "default", "rwkv4-bytes.pth")


def checkpoint_path() -> str:
    if not os.path.exists(CHECKPOINT):
        raise BadInput(
            f"the bundled model is missing ({CHECKPOINT})",
            "reinstall rwkv2rknn, or give an artifact: rwkv2rknn run ARTIFACT --prompt ...",
        )
    return CHECKPOINT


def cache_folder() -> str:
    from rwkv2rknn.fileio import cache_root

    with open(checkpoint_path(), "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    return os.path.join(cache_root(), "default", digest)
