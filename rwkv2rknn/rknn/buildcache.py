"""The build cache: ``.rknn`` files by content hash, trusted only after their checksum matches.

::

    CACHE/rknn/<key>.rknn      the toolkit's output (written whole by a rename)
    CACHE/rknn/<key>.sha256    its SHA-256, recorded when the entry was made
    CACHE/rknn/<key>.json      a quantised entry's measured accuracy (rknn.build), written after it
    CACHE/rknn/<key>.lock      held (flock) while one process checks, builds or copies <key>

An entry is used only if it has a recorded checksum and its bytes still match it; the copy into
the artifact is hashed as it is written, so what the manifest records is what was checked. An
entry that fails (cut short, edited, no checksum) is removed and built again. Two compiles (or
two build workers) that need the same entry take turns on its lock: one builds, the other then
finds it whole.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import time
from typing import Callable, Iterator, Tuple

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def write_checksum(path: str, into: str) -> str:
    """Write the SHA-256 of ``path`` into the file ``into`` (atomically); return it."""
    digest = sha256_of(path)
    tmp = f"{into}.partial-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(digest + "\n")
    os.replace(tmp, into)
    return digest


class BuildCache:
    """Entries ``<key><suffix>`` in ``folder`` (the range-trace cache keeps ``.npz`` entries
    under the same rules)."""

    def __init__(self, folder: str, suffix: str = ".rknn"):
        self.folder = os.path.abspath(folder)
        self.suffix = suffix
        os.makedirs(self.folder, exist_ok=True)

    def entry(self, key: str) -> str:
        return os.path.join(self.folder, key + self.suffix)

    def sum_path(self, key: str) -> str:
        return os.path.join(self.folder, key + ".sha256")

    @contextlib.contextmanager
    def locked(self, key: str, give_up: Callable[[], bool] = lambda: False) -> Iterator[None]:
        """Hold ``key``'s lock, waiting while another process (or thread) holds it; raises
        InterruptedError if ``give_up()`` turns true while waiting."""
        fd = os.open(os.path.join(self.folder, key + ".lock"), os.O_RDWR | os.O_CREAT, 0o666)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if give_up():
                        raise InterruptedError(f"stopped waiting for {key}")
                    time.sleep(0.2)
            yield
        finally:
            os.close(fd)  # releases the lock

    def recorded(self, key: str) -> str:
        try:
            with open(self.sum_path(key)) as f:
                text = f.read().strip()
        except OSError:
            return ""
        return text if len(text) == 64 else ""

    def record(self, key: str) -> str:
        """Record the checksum of an entry made without one (call with the key's lock held)."""
        return write_checksum(self.entry(key), self.sum_path(key))

    def drop(self, key: str) -> None:
        for path in (self.entry(key), self.sum_path(key)):
            with contextlib.suppress(OSError):
                os.unlink(path)

    def copy_to(self, key: str, dest: str) -> Tuple[str, str]:
        """Copy a verified entry to ``dest``: (its checksum, ''). If there is no entry:
        ('', ''); if it fails its checksum: ('', what is wrong), the entry removed and ``dest``
        not written. Call with the key's lock held."""
        want = self.recorded(key)
        src = self.entry(key)
        if not os.path.isfile(src):
            return "", ""
        h = hashlib.sha256()
        tmp = f"{dest}.tmp{os.getpid()}"
        try:
            with open(src, "rb") as fi, open(tmp, "wb") as fo:
                for block in iter(lambda: fi.read(_CHUNK), b""):
                    h.update(block)
                    fo.write(block)
            if not want or h.hexdigest() != want:
                problem = "no recorded checksum" if not want else "failed its checksum"
                log.warning("cache entry %s: %s; removed, it is built again", src, problem)
                self.drop(key)
                return "", problem
            os.replace(tmp, dest)
            return want, ""
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
