"""A small PNG reader for the browser test (8-bit RGB/RGBA/grey, not interlaced): zlib, struct
and numpy, so the test needs no imaging library."""

import struct
import zlib

import numpy as np

CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}  # colour type -> samples per pixel


def read_png(path: str) -> np.ndarray:
    """Pixels as uint8 [height, width, channels]."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path} is not a PNG")
    pos, idat, head = 8, [], None
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + n]
        if kind == b"IHDR":
            head = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        pos += 12 + n
    width, height, depth, ctype, _, _, interlace = head
    if depth != 8 or interlace or ctype not in CHANNELS:
        raise ValueError(f"{path}: only 8-bit, non-interlaced grey/RGB/RGBA PNGs are read here")
    bpp = CHANNELS[ctype]
    stride = width * bpp
    raw = np.frombuffer(zlib.decompress(b"".join(idat)), np.uint8).reshape(height, stride + 1)
    out = np.zeros((height, stride), np.uint8)
    prev = np.zeros(stride, np.int32)
    for y in range(height):
        filt, line = raw[y, 0], raw[y, 1:].astype(np.int32)
        if filt == 0:
            cur = line
        elif filt == 1:  # Sub: running sum along the row, per channel
            cur = np.cumsum(line.reshape(width, bpp), axis=0).reshape(-1) & 0xFF
        elif filt == 2:  # Up
            cur = (line + prev) & 0xFF
        else:  # Average (3) and Paeth (4) depend on the pixel to the left: one pixel at a time
            cur = _sequential(filt, line, prev, bpp)
        out[y] = cur
        prev = cur.astype(np.int32)
    return out.reshape(height, width, bpp)


def _sequential(filt, line, prev, bpp):
    cur = np.zeros_like(line)
    up = prev.tolist()
    vals = line.tolist()
    res = cur.tolist()
    for i in range(len(vals)):
        a = res[i - bpp] if i >= bpp else 0
        b = up[i]
        if filt == 3:
            res[i] = (vals[i] + (a + b) // 2) & 0xFF
            continue
        c = up[i - bpp] if i >= bpp else 0
        p = a + b - c
        pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
        pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
        res[i] = (vals[i] + pred) & 0xFF
    return np.array(res, np.int32)
