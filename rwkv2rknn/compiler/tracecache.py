"""The range-trace cache: one stage's trace results by what they depend on, trusted only after
their checksum matches.

::

    CACHE/trace/<key>.npz      one stage's ranges ({tensor: shape, dtype, largest |value|}) and
                               the values it hands on (the hidden state at each sample token, ...)
    CACHE/trace/<key>.sha256   its SHA-256, recorded when the entry was made
    CACHE/trace/<key>.lock     held while one process checks, traces or writes <key>

A stage's trace depends on its file, on what it is fed at each sample token (the token ids, or
the values the stage before made, which the key holds byte for byte, so a change anywhere
earlier reaches every later key), on the model's shape, and on the code that makes and runs
the traced graph (the package's sources and the onnxruntime, onnx, onnx-graphsurgeon and numpy
versions). The key is the SHA-256 of all of them. Entries follow the build cache's rules
(``rwkv2rknn.rknn.buildcache``): written whole by a rename, used only if their bytes match the
checksum recorded at writing, and an entry that fails is removed and traced again.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import io as _io
import json
import logging
import os
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np

from rwkv2rknn.rknn.buildcache import BuildCache, sha256_of
from rwkv2rknn.compiler.ir import TensorInfo

log = logging.getLogger(__name__)

FORMAT = b"rwkv2rknn trace 1"

Result = Tuple[Dict[str, TensorInfo], Dict[str, list]]


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """SHA-256 of the package's Python sources and of the libraries that run the trace."""
    import onnx
    import onnx_graphsurgeon
    import onnxruntime

    h = hashlib.sha256()
    for lib in (onnxruntime, onnx, onnx_graphsurgeon, np):
        h.update(f"{lib.__name__} {lib.__version__}\0".encode())
    # where the package's folders are (found, not imported: the passes run above this module)
    names = ["rwkv2rknn"] + [f"rwkv2rknn.{sub}" for sub in ("passes", "models")]
    folders = sorted({os.path.dirname(os.path.abspath(importlib.util.find_spec(m).origin)) for m in names})
    for folder in folders:
        for root, dirs, files in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for name in sorted(f for f in files if f.endswith(".py")):
                path = os.path.join(root, name)
                h.update(os.path.relpath(path, folder).encode() + b"\0")
                with open(path, "rb") as f:
                    h.update(f.read())
    return h.hexdigest()


def stage_key(
    stage: str,
    path: str,
    shape: dict,
    steps: Sequence[Dict[str, np.ndarray]],
    state_pairs,
    keep: Sequence[str],
) -> str:
    """The cache key of one stage's trace (see the module's docstring)."""
    h = hashlib.sha256(FORMAT + b"\0" + code_digest().encode())
    h.update(json.dumps([stage, shape, [list(p) for p in state_pairs], list(keep)], sort_keys=True).encode())
    for part in (path, path + ".data"):
        if part == path or os.path.isfile(part):
            h.update(b"\0file\0" + sha256_of(part).encode())
    for step in steps:
        for name in sorted(step):
            v = np.ascontiguousarray(step[name])
            h.update(f"\0{name}\0{v.dtype.str}\0{v.shape}\0".encode())
            h.update(v.tobytes())
    return h.hexdigest()


def _pack(result: Result) -> bytes:
    info, kept = result
    names = list(kept)
    meta = {"info": {k: [list(v.shape), v.dtype, v.absmax] for k, v in info.items()}, "keep": names}
    arrays = {f"k{i}": np.stack(kept[n]) if kept[n] else np.zeros((0,)) for i, n in enumerate(names)}
    buf = _io.BytesIO()
    np.savez(buf, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)
    return buf.getvalue()


def _unpack(blob: bytes) -> Result:
    with np.load(_io.BytesIO(blob), allow_pickle=False) as z:
        meta = json.loads(z["meta"].tobytes().decode())
        info = {
            k: TensorInfo(tuple(int(d) for d in s), str(t), float(m)) for k, (s, t, m) in meta["info"].items()
        }
        kept = {n: list(z[f"k{i}"]) for i, n in enumerate(meta["keep"])}
    return info, kept


class TraceCache:
    def __init__(self, folder: str):
        from rwkv2rknn.fileio import remove_stale

        self.cache = BuildCache(folder, suffix=".npz")
        remove_stale(self.cache.folder, ".partial-")  # what a killed compile left
        self.hits = self.misses = 0

    def _read(self, key: str) -> Optional[Result]:
        """The entry's results if it is whole and matches its recorded checksum; a bad entry
        is removed (None)."""
        path = self.cache.entry(key)
        if not os.path.isfile(path):
            return None
        want = self.cache.recorded(key)
        with open(path, "rb") as f:
            blob = f.read()
        if want and hashlib.sha256(blob).hexdigest() == want:
            try:
                return _unpack(blob)
            except Exception as e:  # noqa: BLE001 - checksum right, contents wrong: trace again
                problem = f"unreadable ({type(e).__name__})"
        else:
            problem = "no recorded checksum" if not want else "failed its checksum"
        log.warning("trace cache entry %s: %s; removed, the stage is traced again", path, problem)
        self.cache.drop(key)
        return None

    def _write(self, key: str, result: Result) -> None:
        path = self.cache.entry(key)
        tmp = f"{path}.partial-{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                f.write(_pack(result))
            os.replace(tmp, path)
            self.cache.record(key)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def get(self, key: str, trace: Callable[[], Result]) -> Result:
        """The stage's results from the cache, else ``trace()``'s, written into it."""
        with self.cache.locked(key):
            got = self._read(key)
            if got is not None:
                self.hits += 1
                return got
            self.misses += 1
            result = trace()
            try:
                self._write(key, result)
            except OSError as e:  # a full or read-only cache costs the next compile a trace
                log.warning("trace cache: could not write %s (%s)", self.cache.entry(key), e)
            return result


def open_cache(folder: str) -> Optional[TraceCache]:
    """The trace cache in ``folder``, or None (and a log line) if it cannot be made."""
    try:
        cache = TraceCache(folder)
        if os.access(cache.cache.folder, os.W_OK):
            return cache
        problem = "not writable"
    except OSError as e:
        problem = str(e)
    log.warning("trace cache %s unusable (%s); every stage is traced", folder, problem)
    return None
