"""The server's state cache: RWKV states kept after requests, keyed by the token ids they have
consumed, least recently used first out, bounded in bytes.

A request whose prompt starts with the ids of a kept state starts from that state and prefills
only the rest. The key is the sha256 of the ids (int32, little-endian); an entry also keeps the
ids themselves, so a lookup compares them and never trusts the hash alone. With a folder, every
entry is also a state file there (``statefile``: atomic, checksummed), read back at start;
damaged files and files of another model are skipped with a log line.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from rwkv2rknn.errors import BadInput
from rwkv2rknn.runtime import statefile

log = logging.getLogger(__name__)

SUFFIX = ".state"


def prefix_key(ids: Sequence[int]) -> str:
    return hashlib.sha256(np.asarray(ids, dtype="<i4").tobytes()).hexdigest()


@dataclass
class Entry:
    tokens: np.ndarray  # int32
    arrays: dict  # the state's arrays by name (what Session.arrays() gives, without tokens)

    @property
    def nbytes(self) -> int:
        return int(self.tokens.nbytes + sum(a.nbytes for a in self.arrays.values()))


class StateCache:
    """LRU of states by token prefix, at most ``max_bytes``; ``folder`` keeps it on disk."""

    def __init__(self, max_bytes: int, identity: str, folder: Optional[str] = None, description: str = ""):
        self.max_bytes = int(max_bytes)
        self.identity, self.description = identity, description
        self.folder = folder
        self._lock = threading.Lock()
        self._entries: "OrderedDict[str, Entry]" = OrderedDict()
        self._lengths: dict = {}  # token count -> how many entries have it
        self.bytes = 0
        self.hits = self.misses = 0
        if folder:
            try:
                os.makedirs(folder, exist_ok=True)
            except OSError as e:
                log.warning("state cache: cannot make %s (%s)", folder, e.strerror)
            self._read_folder()

    def __len__(self) -> int:
        return len(self._entries)

    # ------------------------------------------------------------ lookup and insert

    def lookup(self, ids: Sequence[int], most: int) -> Tuple[int, Optional[dict]]:
        """(k, arrays): the longest kept state whose ids are ``ids[:k]`` with k <= ``most``;
        (0, None) if there is none. A state that has consumed all of ``ids`` counts only if it
        kept its last logits (the next token is drawn from them). The arrays are the cache's
        own: copy before changing."""
        ids = np.asarray(ids, dtype=np.int32)
        with self._lock:
            for n in sorted((n for n in self._lengths if 0 < n <= min(most, len(ids))), reverse=True):
                key = prefix_key(ids[:n])
                e = self._entries.get(key)
                if e is None or (n == len(ids) and "logits" not in e.arrays):
                    continue
                if np.array_equal(e.tokens, ids[:n]):
                    self._entries.move_to_end(key)
                    self.hits += 1
                    return n, e.arrays
            self.misses += 1
            return 0, None

    def put(self, ids: Sequence[int], arrays: dict) -> None:
        """Keep a state that has consumed ``ids`` (arrays copied)."""
        if self.max_bytes <= 0 or len(ids) == 0:
            return
        tokens = np.asarray(ids, dtype=np.int32).copy()
        entry = Entry(tokens, {k: np.array(v, copy=True) for k, v in arrays.items() if k != "tokens"})
        if entry.nbytes > self.max_bytes:
            return
        key = prefix_key(tokens)
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return
            self._add(key, entry)
            evicted = self._evict()
        for k in evicted:
            self._remove_file(k)
        if self.folder:
            self._write_file(key, entry)

    def _add(self, key: str, entry: Entry) -> None:
        self._entries[key] = entry
        self.bytes += entry.nbytes
        n = len(entry.tokens)
        self._lengths[n] = self._lengths.get(n, 0) + 1

    def _evict(self) -> List[str]:
        gone = []
        while self.bytes > self.max_bytes and self._entries:
            key, e = self._entries.popitem(last=False)
            self.bytes -= e.nbytes
            n = len(e.tokens)
            self._lengths[n] -= 1
            if not self._lengths[n]:
                del self._lengths[n]
            gone.append(key)
        return gone

    # ------------------------------------------------------------ the folder

    def _path(self, key: str) -> str:
        return os.path.join(self.folder, key + SUFFIX)

    def _write_file(self, key: str, entry: Entry) -> None:
        try:
            statefile.save(
                self._path(key),
                self.identity,
                {**entry.arrays, "tokens": entry.tokens},
                {"model": self.description, "tokens": len(entry.tokens)},
            )
        except OSError as e:
            log.warning("state cache: cannot write %s (%s)", self._path(key), e.strerror)

    def _remove_file(self, key: str) -> None:
        if self.folder:
            try:
                os.unlink(self._path(key))
            except FileNotFoundError:
                pass
            except OSError as e:
                log.warning("state cache: cannot remove %s (%s)", self._path(key), e.strerror)

    def _read_folder(self) -> None:
        """Read the folder's state files, newest first, as many as fit."""
        try:
            names = [n for n in os.listdir(self.folder) if n.endswith(SUFFIX)]
        except OSError as e:
            log.warning("state cache: cannot read %s (%s)", self.folder, e.strerror)
            return
        paths = sorted((os.path.join(self.folder, n) for n in names), key=_mtime, reverse=True)
        loaded = []
        for path in paths:
            try:
                arrays, _ = statefile.load(path, self.identity)
                tokens = arrays.pop("tokens").astype(np.int32).reshape(-1)
            except (BadInput, KeyError) as e:
                log.warning("state cache: skipped %s: %s", path, e)
                continue
            key = prefix_key(tokens)
            if os.path.basename(path) != key + SUFFIX:
                log.warning("state cache: skipped %s: its name is not the hash of its tokens", path)
                continue
            entry = Entry(tokens, arrays)
            if self.bytes + entry.nbytes > self.max_bytes:
                break
            loaded.append((key, entry))
            self.bytes += entry.nbytes
        self.bytes = 0
        for key, entry in reversed(loaded):  # oldest first: the newest ends most recently used
            self._add(key, entry)
        if loaded:
            log.info("state cache: %d states read from %s", len(loaded), self.folder)


def _mtime(path: str) -> float:
    try:
        return os.path.getmtime(path)
    except OSError:
        return 0.0
