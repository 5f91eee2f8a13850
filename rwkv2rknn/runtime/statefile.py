"""State files: an RWKV state (and the token ids it has consumed) saved to disk.

Layout::

    RWKV2RKNN-STATE 1\\n          magic and version
    {header JSON}\\n              model identity, arrays (name, dtype, shape), sha256 of the payload
    payload                      the arrays' bytes, in the header's order

Written atomically (a temporary file in the same folder, fsync, rename), so a reader sees the
old file or the new one, never half of one. A file whose checksum, size or header does not
hold is refused as damaged; a file of another model is refused naming both.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, Tuple

import numpy as np

from rwkv2rknn.errors import BadInput

MAGIC = b"RWKV2RKNN-STATE 1\n"
_MAX_HEADER = 1 << 20


def write_atomic(path: str, data: bytes) -> None:
    """``data`` to ``path`` whole or not at all."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def dumps(identity: str, arrays: Dict[str, np.ndarray], meta: dict = None) -> bytes:
    parts, specs = [], []
    for name, a in arrays.items():
        a = np.ascontiguousarray(a)
        specs.append({"name": name, "dtype": a.dtype.str, "shape": list(a.shape)})
        parts.append(a.tobytes())
    payload = b"".join(parts)
    header = {
        "identity": identity,
        "arrays": specs,
        "bytes": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
        "meta": meta or {},
    }
    return MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n" + payload


def save(path: str, identity: str, arrays: Dict[str, np.ndarray], meta: dict = None) -> None:
    write_atomic(path, dumps(identity, arrays, meta))


def load(path: str, identity: str = None, describe: str = "") -> Tuple[Dict[str, np.ndarray], dict]:
    """(arrays, meta) of a state file; BadInput if it is missing, damaged, or (``identity``
    given) saved from another model."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError as e:
        raise BadInput(f"state file '{path}' does not exist", "check the path") from e
    except OSError as e:
        raise BadInput(f"cannot read state file '{path}' ({e.strerror})", "check the path") from e
    damaged = f"state file '{path}' is damaged"
    if not data.startswith(MAGIC):
        raise BadInput(
            f"'{path}' is not an rwkv2rknn state file", "give a file saved by /save or --state-dir"
        )
    end = data.find(b"\n", len(MAGIC), len(MAGIC) + _MAX_HEADER)
    try:
        header = json.loads(data[len(MAGIC) : end]) if end > 0 else None
        specs = header["arrays"]
        payload = data[end + 1 :]
        ok = len(payload) == int(header["bytes"]) and hashlib.sha256(payload).hexdigest() == header["sha256"]
    except (ValueError, KeyError, TypeError):
        raise BadInput(f"{damaged} (unreadable header)", "save the state again") from None
    if not ok:
        raise BadInput(f"{damaged} (checksum mismatch: truncated or changed)", "save the state again")
    if identity is not None and header.get("identity") != identity:
        raise BadInput(
            f"state file '{path}' was saved from another model "
            f"({header.get('meta', {}).get('model', 'unknown')})",
            f"load it with the model it was saved from{describe}",
        )
    arrays, at = {}, 0
    try:
        for s in specs:
            dt = np.dtype(s["dtype"])
            n = int(np.prod(s["shape"], dtype=np.int64)) * dt.itemsize
            arrays[s["name"]] = np.frombuffer(payload[at : at + n], dtype=dt).reshape(s["shape"]).copy()
            at += n
    except (ValueError, KeyError, TypeError):
        raise BadInput(f"{damaged} (arrays do not match the header)", "save the state again") from None
    return arrays, header.get("meta", {})
