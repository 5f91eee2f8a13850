"""Just enough of the ONNX file format, read and written at the protobuf wire level, for the
runtime to share weights between sessions and to join segments: the board installs numpy and
onnxruntime, not the ``onnx`` package.

Field numbers are those of onnx.proto (ModelProto, GraphProto, NodeProto, TensorProto,
ValueInfoProto, OperatorSetIdProto); every field this module does not touch is copied as it is.
"""

from __future__ import annotations

from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

# wire types
VARINT, I64, LEN, I32 = 0, 1, 2, 5

# ModelProto
M_IR_VERSION, M_OPSET, M_GRAPH = 1, 8, 7
# GraphProto
G_NODE, G_NAME, G_INIT, G_INPUT, G_OUTPUT, G_VALUE_INFO = 1, 2, 5, 11, 12, 13
# NodeProto
N_INPUT, N_OUTPUT, N_NAME, N_ATTRIBUTE = 1, 2, 3, 5
# AttributeProto: g (6) and graphs (11) are subgraphs
A_GRAPH, A_GRAPHS = 6, 11
# TensorProto
T_DIMS, T_TYPE, T_FLOAT_DATA, T_NAME, T_RAW, T_EXTERNAL, T_LOCATION = 1, 2, 4, 8, 9, 13, 14
T_DATA_FIELDS = (4, 5, 6, 7, 9, 10, 11, 13)  # float, int32, string, int64, raw, double, uint64, external
EXTERNAL = 1
# ValueInfoProto / OperatorSetIdProto / StringStringEntryProto
V_NAME = 1
OP_DOMAIN, OP_VERSION = 1, 2
KV_KEY, KV_VALUE = 1, 2

DTYPES = {
    1: np.float32,
    2: np.uint8,
    3: np.int8,
    4: np.uint16,
    5: np.int16,
    6: np.int32,
    7: np.int64,
    9: np.bool_,
    10: np.float16,
    11: np.float64,
    12: np.uint32,
    13: np.uint64,
}


class WireError(ValueError):
    """Bytes that are not the protobuf this module expects."""


def _varint(buf, i: int) -> Tuple[int, int]:
    shift = value = 0
    while True:
        if i >= len(buf):
            raise WireError("truncated varint")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7


def fields(buf) -> Iterator[Tuple[int, int, object, int, int]]:
    """(field number, wire type, value, start, end) of each field of a message: the value is an
    int (varint, fixed) or a memoryview (length-delimited); [start, end) spans the whole field."""
    view = memoryview(buf)
    i, n = 0, len(view)
    while i < n:
        start = i
        key, i = _varint(view, i)
        num, wt = key >> 3, key & 7
        if wt == VARINT:
            value, i = _varint(view, i)
        elif wt == LEN:
            size, i = _varint(view, i)
            if i + size > n:
                raise WireError("truncated field")
            value, i = view[i : i + size], i + size
        elif wt == I64:
            value, i = int.from_bytes(view[i : i + 8], "little"), i + 8
        elif wt == I32:
            value, i = int.from_bytes(view[i : i + 4], "little"), i + 4
        else:
            raise WireError(f"wire type {wt}")
        yield num, wt, value, start, i


def encode_varint(value: int) -> bytes:
    """A protobuf varint."""
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def enc_len(num: int, payload) -> bytes:
    return encode_varint(num << 3 | LEN) + encode_varint(len(payload)) + bytes(payload)


def enc_int(num: int, value: int) -> bytes:
    return encode_varint(num << 3 | VARINT) + encode_varint(value)


def first(buf, num: int, default=None):
    for n, _, value, _, _ in fields(buf):
        if n == num:
            return value
    return default


def strings(buf, num: int) -> List[str]:
    return [bytes(v).decode() for n, wt, v, _, _ in fields(buf) if n == num and wt == LEN]


class Tensor:
    """A TensorProto's name, type, dims, and its data where this module reads it."""

    def __init__(self, buf):
        self.buf = buf  # the message's bytes (a view: nothing is copied here)
        self.name, self.dtype, self.dims = "", 0, []
        self.raw: Optional[memoryview] = None
        self.floats: Optional[memoryview] = None
        self.external = False
        for num, wt, value, _, _ in fields(self.buf):
            if num == T_NAME:
                self.name = bytes(value).decode()
            elif num == T_TYPE:
                self.dtype = value
            elif num == T_DIMS:
                if wt == LEN:  # packed
                    j = 0
                    while j < len(value):
                        d, j = _varint(value, j)
                        self.dims.append(d)
                else:
                    self.dims.append(value)
            elif num == T_RAW:
                self.raw = value
            elif num == T_FLOAT_DATA and wt == LEN:
                self.floats = value
            elif num == T_LOCATION:
                self.external = value == EXTERNAL

    @property
    def size(self) -> int:
        return int(np.prod(self.dims)) if self.dims else 1

    def view(self) -> Optional[np.ndarray]:
        """Its data as an array over the message's bytes (not copied), or None where it is
        stored in a way not read here."""
        if self.external or self.dtype not in DTYPES:
            return None
        dtype = np.dtype(DTYPES[self.dtype]).newbyteorder("<")
        if self.raw is not None and len(self.raw) == self.size * dtype.itemsize:
            return np.frombuffer(self.raw, dtype).reshape(self.dims)
        if self.floats is not None and self.dtype == 1 and len(self.floats) == 4 * self.size:
            return np.frombuffer(self.floats, "<f4").reshape(self.dims)
        return None

    def array(self) -> Optional[np.ndarray]:
        """Its data as a new array (native byte order), or None (see ``view``)."""
        v = self.view()
        return None if v is None else v.astype(v.dtype.newbyteorder("="), copy=True)

    def data_span(self) -> Optional[Tuple[int, int]]:
        """[start, end) of its data within ``buf``, if it is raw or float_data."""
        for num, wt, value, start, end in fields(self.buf):
            if num in (T_RAW, T_FLOAT_DATA) and wt == LEN:
                return end - len(value), end
        return None

    def stub(self, location: str) -> bytes:
        """This tensor without its data: external data at ``location`` (filled by the session)."""
        keep = b"".join(
            bytes(self.buf[s:e])
            for num, _, _, s, e in fields(self.buf)
            if num not in T_DATA_FIELDS and num != T_LOCATION
        )
        entry = enc_len(KV_KEY, b"location") + enc_len(KV_VALUE, location.encode())
        return keep + enc_len(T_EXTERNAL, entry) + enc_int(T_LOCATION, EXTERNAL)


def replace_graph(model: bytes, graph: bytes) -> bytes:
    """The model with its graph field replaced."""
    out = [bytes(memoryview(model)[s:e]) for num, _, _, s, e in fields(model) if num != M_GRAPH]
    return b"".join(out) + enc_len(M_GRAPH, graph)


def graph_of(model: bytes):
    g = first(model, M_GRAPH)
    if g is None:
        raise WireError("no graph")
    return g


def opsets(model: bytes) -> Dict[str, int]:
    out = {}
    for num, wt, value, _, _ in fields(model):
        if num == M_OPSET:
            domain = first(value, OP_DOMAIN, b"")
            out[bytes(domain).decode()] = first(value, OP_VERSION, 0)
    return out


def has_subgraph(node) -> bool:
    for num, _, value, _, _ in fields(node):
        if num == N_ATTRIBUTE and any(n in (A_GRAPH, A_GRAPHS) for n, *_ in fields(value)):
            return True
    return False
