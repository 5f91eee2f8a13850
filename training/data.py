"""Training text for the default byte-level RWKV-4 model: Jane Austen's six novels.

Source: the Debian package ``r-cran-janeaustenr`` (CRAN's ``janeaustenr`` 1.0.0, MIT licence,
Julia Silge). It ships the plain text of the six novels as published by Project Gutenberg; the
novels themselves are in the public domain. The package stores them as an R "lazy-load" database
(``data/Rdata.rdb`` + ``Rdata.rdx``: zlib blocks of R's XDR serialisation of character vectors),
which this module reads in pure Python, without R.

Set-up (no R needed; the package is only unpacked, its R dependency is not installed)::

    cd /tmp && apt-get update && apt-get download r-cran-janeaustenr
    dpkg-deb -x r-cran-janeaustenr_*.deb /tmp/janeaustenr

or ``apt-get install r-cran-janeaustenr`` (pulls in R). ``python training/data.py --fetch`` does
the first recipe into ``~/.cache/rwkv2rknn/janeaustenr/`` (outside the repository). Then
``python training/data.py --out austen.txt`` writes the corpus: the novels in publication order,
lines joined with "\\n", each novel followed by a blank line; 4,025,035 bytes of UTF-8, ASCII
apart from one pound sign.
"""

from __future__ import annotations

import argparse
import glob
import os
import struct
import subprocess
import zlib
from typing import Dict, List, Optional, Tuple

PACKAGE = "r-cran-janeaustenr"
REL_DIR = "usr/lib/R/site-library/janeaustenr/data"
CACHE = os.path.join(os.path.expanduser("~"), ".cache", "rwkv2rknn", "janeaustenr")
# Publication order.
BOOKS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")
VAL_FRACTION = 0.05


# ---------------------------------------------------------------------------------------------
# A minimal reader of R's XDR serialisation (format 2/3), enough for the lazy-load index and for
# character vectors.


class _R:
    def __init__(self, buf: bytes):
        self.b, self.i, self.refs = buf, 0, []

    def int(self) -> int:
        v = struct.unpack_from(">i", self.b, self.i)[0]
        self.i += 4
        return v

    def header(self):
        fmt = self.b[self.i : self.i + 2]
        if fmt != b"X\n":
            raise ValueError(f"not an R XDR stream (starts {fmt!r})")
        self.i += 2
        version = self.int()
        self.int(), self.int()  # writer version, min reader version
        if version == 3:
            n = self.int()
            self.i += n  # native encoding name
        return self

    def obj(self):
        flags = self.int()
        t = flags & 0xFF
        has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if t == 254:  # NILVALUE_SXP
            return None
        if t == 255:  # REFSXP
            return self.refs[(flags >> 8) - 1]
        if t == 1:  # SYMSXP
            name = self.obj()
            self.refs.append(name)
            return name
        if t == 9:  # CHARSXP
            n = self.int()
            if n == -1:
                return None
            s = self.b[self.i : self.i + n]
            self.i += n
            return s.decode("utf-8", "replace")
        if t == 2:  # LISTSXP (pairlist) -> list of (tag, value)
            items = []
            while True:
                if has_attr:
                    self.obj()  # attributes of a pairlist cell: not needed
                tag = self.obj() if has_tag else None
                items.append((tag, self.obj()))
                flags = self.int()
                if flags & 0xFF == 254:
                    return items
                has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))
        n = self.int()
        if t in (10, 13):  # LGLSXP, INTSXP
            v = list(struct.unpack_from(f">{n}i", self.b, self.i))
            self.i += 4 * n
        elif t == 14:  # REALSXP
            v = list(struct.unpack_from(f">{n}d", self.b, self.i))
            self.i += 8 * n
        elif t in (16, 19):  # STRSXP, VECSXP
            v = [self.obj() for _ in range(n)]
        else:
            raise ValueError(f"unsupported R type {t}")
        if has_attr:
            attrs = dict(self.obj())
            if "names" in attrs:
                v = dict(zip(attrs["names"], v))
        return v


def _block(path: str, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        raw = f.read(length)
    return zlib.decompress(raw[4:])  # 4-byte big-endian uncompressed length, then zlib


def read_books(data_dir: str) -> Dict[str, List[str]]:
    """The six novels as lists of lines, read from janeaustenr's ``data/`` directory."""
    import gzip

    with gzip.open(os.path.join(data_dir, "Rdata.rdx"), "rb") as f:
        index = _R(f.read()).header().obj()
    rdb = os.path.join(data_dir, "Rdata.rdb")
    books = {}
    for name, (offset, length) in index["variables"].items():
        books[name] = _R(_block(rdb, int(offset), int(length))).header().obj()
    return books


# ---------------------------------------------------------------------------------------------


def find_data_dir(extra: Optional[str] = None) -> str:
    roots = [r for r in (extra, os.environ.get("JANEAUSTENR_DIR"), "/", "/tmp/janeaustenr", CACHE) if r]
    for root in roots:
        for cand in (root, os.path.join(root, REL_DIR)):
            if os.path.exists(os.path.join(cand, "Rdata.rdb")):
                return cand
    raise FileNotFoundError(
        "janeaustenr data not found: run `apt-get download r-cran-janeaustenr && dpkg-deb -x "
        "r-cran-janeaustenr_*.deb /tmp/janeaustenr` (or `python training/data.py --fetch`, or "
        "`apt-get install r-cran-janeaustenr`)"
    )


def fetch() -> str:
    """apt-get download the package and unpack it (without installing) into ``CACHE``."""
    os.makedirs(CACHE, exist_ok=True)
    subprocess.run(["apt-get", "download", PACKAGE], cwd=CACHE, check=True)
    deb = sorted(glob.glob(os.path.join(CACHE, PACKAGE + "_*.deb")))[-1]
    subprocess.run(["dpkg-deb", "-x", deb, CACHE], check=True)
    return find_data_dir(CACHE)


def corpus_text(data_dir: Optional[str] = None) -> str:
    books = read_books(find_data_dir(data_dir))
    parts = []
    for name in BOOKS:
        lines = [s if s is not None else "" for s in books[name]]
        parts.append("\n".join(lines).strip("\n") + "\n\n")
    return "".join(parts)


def load_bytes(path: Optional[str] = None) -> bytes:
    """The corpus as bytes: from a text file ``path`` if given, else from janeaustenr."""
    if path and os.path.isfile(path):
        with open(path, "rb") as f:
            return f.read()
    return corpus_text(path).encode("utf-8")


def split(data: bytes, val_fraction: float = VAL_FRACTION) -> Tuple[bytes, bytes]:
    """(train, validation): the validation part is the last ``val_fraction`` of the bytes (the
    end of *Persuasion*), so it is text the model never trained on."""
    cut = int(len(data) * (1 - val_fraction))
    return data[:cut], data[cut:]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fetch", action="store_true", help="apt-get download + unpack the package")
    ap.add_argument("--dir", help="janeaustenr install root or its data/ directory")
    ap.add_argument("--out", help="write the corpus here (UTF-8)")
    a = ap.parse_args()
    d = fetch() if a.fetch else find_data_dir(a.dir)
    text = corpus_text(d)
    raw = text.encode("utf-8")
    tr, va = split(raw)
    print(
        f"{d}: {len(raw)} bytes ({len(tr)} train, {len(va)} validation), {len(set(raw))} distinct byte values"
    )
    if a.out:
        with open(a.out, "wb") as f:
            f.write(raw)
        print("wrote", a.out)


if __name__ == "__main__":
    main()
