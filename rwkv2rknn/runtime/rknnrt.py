"""``rknn-rt``: the board's NPU runner over librknnrt's C API, through ctypes.

One context per segment (``rknn_init`` from the .rknn bytes), bound to NPU cores with
``rknn_set_core_mask``; input and output buffers are made once with ``rknn_create_mem`` and bound
with ``rknn_set_io_mem``, so a call is: copy the inputs in, ``rknn_run``, copy the outputs out.
Inputs and outputs are float32 (the runtime converts to and from the model's fp16). A T-row
``.seq.rknn`` (built with ``dynamic_input``) gets one set of buffers per row count, made on first
use; switching row count calls ``rknn_set_input_shapes`` and binds that set again.

The structures and constants follow librknnrt's public header ``rknn_api.h`` (rknn-toolkit2 /
rknpu2, ``runtime/Linux/librknn_api/include``). Tests run this module against a stand-in library
built from C with the same signatures; it has not been run against the real librknnrt here.
"""

from __future__ import annotations

import ctypes
import logging
import os
from typing import Dict, List, Optional

import numpy as np

from rwkv2rknn.errors import BadInput, MissingDependency, ToolkitError
from rwkv2rknn.runtime import device

log = logging.getLogger(__name__)

# rknn_query_cmd
QUERY_IN_OUT_NUM, QUERY_INPUT_ATTR, QUERY_OUTPUT_ATTR = 0, 1, 2
QUERY_SDK_VERSION, QUERY_MEM_SIZE = 5, 6
QUERY_CURRENT_INPUT_ATTR, QUERY_CURRENT_OUTPUT_ATTR = 14, 15
TENSOR_FLOAT32 = 0  # rknn_tensor_type
TENSOR_NCHW = 0  # rknn_tensor_format
MAX_DIMS, MAX_NAME_LEN = 16, 256
ERRORS = {-1: "RKNN_ERR_FAIL", -2: "RKNN_ERR_TIMEOUT", -3: "RKNN_ERR_DEVICE_UNAVAILABLE",
          -4: "RKNN_ERR_MALLOC_FAIL", -5: "RKNN_ERR_PARAM_INVALID", -6: "RKNN_ERR_MODEL_INVALID",
          -7: "RKNN_ERR_CTX_INVALID", -8: "RKNN_ERR_INPUT_INVALID", -9: "RKNN_ERR_OUTPUT_INVALID",
          -10: "RKNN_ERR_DEVICE_UNMATCH", -11: "RKNN_ERR_INCOMPATILE_PRE_COMPILE_MODEL",
          -12: "RKNN_ERR_INCOMPATILE_OPTIMIZATION_LEVEL_VERSION",
          -13: "RKNN_ERR_TARGET_PLATFORM_UNMATCH"}

# rknn_context is uint32_t on 32-bit ARM, uint64_t elsewhere
Context = ctypes.c_uint32 if ctypes.sizeof(ctypes.c_void_p) == 4 else ctypes.c_uint64


class InOutNum(ctypes.Structure):
    _fields_ = [("n_input", ctypes.c_uint32), ("n_output", ctypes.c_uint32)]


class TensorAttr(ctypes.Structure):
    """rknn_tensor_attr (376 bytes on aarch64 and x86_64)."""
    _fields_ = [("index", ctypes.c_uint32), ("n_dims", ctypes.c_uint32),
                ("dims", ctypes.c_uint32 * MAX_DIMS), ("name", ctypes.c_char * MAX_NAME_LEN),
                ("n_elems", ctypes.c_uint32), ("size", ctypes.c_uint32),
                ("fmt", ctypes.c_int), ("type", ctypes.c_int), ("qnt_type", ctypes.c_int),
                ("fl", ctypes.c_int8), ("zp", ctypes.c_int32), ("scale", ctypes.c_float),
                ("w_stride", ctypes.c_uint32), ("size_with_stride", ctypes.c_uint32),
                ("pass_through", ctypes.c_uint8), ("h_stride", ctypes.c_uint32)]

    @property
    def shape(self) -> tuple:
        return tuple(int(d) for d in self.dims[:self.n_dims])


class TensorMem(ctypes.Structure):
    """rknn_tensor_mem (40 bytes on 64-bit)."""
    _fields_ = [("virt_addr", ctypes.c_void_p), ("phys_addr", ctypes.c_uint64),
                ("fd", ctypes.c_int32), ("offset", ctypes.c_int32), ("size", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("priv_data", ctypes.c_void_p)]


class SdkVersion(ctypes.Structure):
    _fields_ = [("api_version", ctypes.c_char * 256), ("drv_version", ctypes.c_char * 256)]


_SIGNATURES = {  # name: (restype, argtypes)
    "rknn_init": (ctypes.c_int, [ctypes.POINTER(Context), ctypes.c_void_p, ctypes.c_uint32,
                                 ctypes.c_uint32, ctypes.c_void_p]),
    "rknn_destroy": (ctypes.c_int, [Context]),
    "rknn_query": (ctypes.c_int, [Context, ctypes.c_int, ctypes.c_void_p, ctypes.c_uint32]),
    "rknn_set_core_mask": (ctypes.c_int, [Context, ctypes.c_int]),
    "rknn_create_mem": (ctypes.POINTER(TensorMem), [Context, ctypes.c_uint32]),
    "rknn_destroy_mem": (ctypes.c_int, [Context, ctypes.POINTER(TensorMem)]),
    "rknn_set_io_mem": (ctypes.c_int, [Context, ctypes.POINTER(TensorMem),
                                       ctypes.POINTER(TensorAttr)]),
    "rknn_set_input_shapes": (ctypes.c_int, [Context, ctypes.c_uint32, ctypes.POINTER(TensorAttr)]),
    "rknn_run": (ctypes.c_int, [Context, ctypes.c_void_p]),
}
_LIBS: Dict[str, ctypes.CDLL] = {}


def load_library(path: Optional[str] = None) -> ctypes.CDLL:
    """librknnrt (``path``, else ``$RWKV2RKNN_LIBRKNNRT``, else the usual places), typed."""
    path = path or device.librknnrt_path()
    if not path:
        raise MissingDependency("librknnrt.so was not found", device.LIBRKNNRT_INSTALL)
    if path not in _LIBS:
        try:
            lib = ctypes.CDLL(path)
            for name, (res, args) in _SIGNATURES.items():
                fn = getattr(lib, name)
                fn.restype, fn.argtypes = res, args
        except (OSError, AttributeError) as e:
            raise MissingDependency(f"cannot load {path} as librknnrt ({str(e)[:120]})",
                                    device.LIBRKNNRT_INSTALL) from e
        _LIBS[path] = lib
    return _LIBS[path]


def available() -> bool:
    """librknnrt.so is present and loads on this machine."""
    try:
        load_library()
        return True
    except MissingDependency:
        return False


class _Binding:
    """One set of bound buffers: float32 views over the memory the runtime reads and writes."""

    def __init__(self, ins, outs, attrs, mems):
        self.ins, self.outs, self.attrs, self.mems = ins, outs, attrs, mems


class RknnRtRunner:
    """One NPU segment on librknnrt (the board). ``rows``: a T-row build's row counts;
    ``columns``: it takes them as columns [C, T] (turned by runtime.rows.Columns)."""

    backend = "rknn-rt"

    def __init__(self, rknn_path: str, name: str, inputs, outputs, shapes=None,
                 core_mask: str = "auto", rows=(), toolkit: str = "", lib: Optional[str] = None,
                 columns: bool = False):
        from rwkv2rknn.runtime.rknn import CORE_MASKS
        self.name, self.inputs, self.outputs = name, list(inputs), list(outputs)
        self.rows, self._row_axis = tuple(rows), -1 if columns else 0
        self.shapes = {k: tuple(v) for k, v in (shapes or {}).items()} if not rows else {}
        self._toolkit, self._lib_path = toolkit, lib or device.librknnrt_path()
        self._lib = load_library(self._lib_path)
        self._ctx, self._live = Context(0), False
        self._mems: List[ctypes.POINTER(TensorMem)] = []
        self._bindings: Dict[tuple, _Binding] = {}
        self._current: Optional[tuple] = None
        mask = CORE_MASKS.get(str(core_mask))
        if mask is None:
            raise BadInput(f"unknown core mask '{core_mask}'", f"use one of {', '.join(CORE_MASKS)}")
        try:
            with open(rknn_path, "rb") as f:
                data = f.read()
            self._call("rknn_init", ctypes.byref(self._ctx), data, len(data), 0, None)
            self._live = True
            del data  # the runtime holds its own copy of the weights
            if mask:
                self._call("rknn_set_core_mask", self._ctx, mask)
            num = InOutNum()
            self._call("rknn_query", self._ctx, QUERY_IN_OUT_NUM, ctypes.byref(num), ctypes.sizeof(num))
            if (num.n_input, num.n_output) != (len(self.inputs), len(self.outputs)):
                raise BadInput(f"{os.path.basename(rknn_path)} has {num.n_input} inputs and "
                               f"{num.n_output} outputs, the manifest says {len(self.inputs)} and "
                               f"{len(self.outputs)}", "compile the model again")
            self._in_attrs = [self._attr(QUERY_INPUT_ATTR, i) for i in range(num.n_input)]
            self._out_attrs = [self._attr(QUERY_OUTPUT_ATTR, i) for i in range(num.n_output)]
            self._in_order = _order(self.inputs, self._in_attrs)
            self._out_order = _order(self.outputs, self._out_attrs)
            if not self.rows:
                self._current = ()
                self._bindings[()] = self._bind(self._in_attrs, self._out_attrs)
        except BaseException:
            self.close()
            raise

    # ---------------------------------------------------------------- calls

    def _call(self, fn: str, *args) -> None:
        ret = getattr(self._lib, fn)(*args)
        if ret != 0:
            what = f"librknnrt {fn} returned {ret} ({ERRORS.get(ret, 'unknown error')}) on segment {self.name}"
            raise ToolkitError(what, device.runtime_hint(self._lib_path, self._toolkit)
                               if fn == "rknn_init" else
                               "run `rwkv2rknn doctor ARTIFACT` on the board, or --backend rknn-lite")

    def _attr(self, cmd: int, index: int) -> TensorAttr:
        attr = TensorAttr(index=index)
        self._call("rknn_query", self._ctx, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
        return attr

    def _bind(self, in_attrs, out_attrs) -> _Binding:
        """Make float32 buffers for these attributes and bind them to the context."""
        views, mems = [], []
        for attrs in (in_attrs, out_attrs):
            side = []
            for attr in attrs:
                attr.type, attr.pass_through = TENSOR_FLOAT32, 0
                if attrs is out_attrs and attr.n_dims == 4:
                    attr.fmt = TENSOR_NCHW  # a columns build's [1, N, 1, T]: the bytes of [N, T]
                attr.size = attr.n_elems * 4
                mem = self._lib.rknn_create_mem(self._ctx, attr.size)
                if not mem:
                    raise ToolkitError(f"librknnrt rknn_create_mem({attr.size}) failed on segment "
                                       f"{self.name}", "free memory on the board (`rwkv2rknn doctor`)")
                self._mems.append(mem)
                mems.append(mem)
                self._call("rknn_set_io_mem", self._ctx, mem, ctypes.byref(attr))
                buf = (ctypes.c_float * attr.n_elems).from_address(mem.contents.virt_addr)
                side.append(np.ctypeslib.as_array(buf).reshape(attr.shape or (attr.n_elems,)))
            views.append(side)
        return _Binding(views[0], views[1], list(in_attrs) + list(out_attrs), mems)

    def _use(self, key: tuple, args) -> _Binding:
        """The binding for these input shapes (T-row builds), made once, bound when it changes."""
        if key == self._current:
            return self._bindings[key]
        attrs = (TensorAttr * len(args))()
        for i, (attr, a) in enumerate(zip(self._in_attrs, args)):
            ctypes.memmove(ctypes.byref(attrs[i]), ctypes.byref(attr), ctypes.sizeof(attr))
            attrs[i].n_dims = a.ndim
            for d, n in enumerate(a.shape):
                attrs[i].dims[d] = n
            attrs[i].n_elems = a.size
        self._current = None
        self._call("rknn_set_input_shapes", self._ctx, len(args), attrs)
        if key in self._bindings:
            b = self._bindings[key]
            for attr, mem in zip(b.attrs, b.mems):
                self._call("rknn_set_io_mem", self._ctx, mem, ctypes.byref(attr))
        else:
            ins = [self._attr(QUERY_CURRENT_INPUT_ATTR, i) for i in range(len(args))]
            outs = [self._attr(QUERY_CURRENT_OUTPUT_ATTR, i) for i in range(len(self._out_attrs))]
            b = self._bindings[key] = self._bind(ins, outs)
        self._current = key
        return b

    # ---------------------------------------------------------------- contract

    def infer(self, feed: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        args = [np.asarray(feed[self.inputs[j]], np.float32) for j in self._in_order]
        if self.rows:
            got = {a.shape[self._row_axis] for a in args if a.ndim >= 2}
            if len(got) > 1:  # a state row [1, C] (as a column: [C, 1]) beside the rows
                got.discard(1)
            if not got <= set(self.rows):
                raise BadInput(f"segment {self.name} was built for {list(self.rows)} rows, got "
                               f"{sorted(got)}", "feed chunks of a row count it was built for")
            b = self._use(tuple(a.shape for a in args), args)
        else:
            b = self._bindings[()]
        for view, a, j in zip(b.ins, args, self._in_order):
            if a.size != view.size:
                raise BadInput(f"segment {self.name}: input '{self.inputs[j]}' has {a.size} values, "
                               f"the .rknn takes {view.size}", "compile the model again")
            view[...] = a.reshape(view.shape)
        self._call("rknn_run", self._ctx, None)
        out = {}
        for view, j in zip(b.outs, self._out_order):
            k = self.outputs[j]
            want = self.shapes.get(k)
            out[k] = view.reshape(want).copy() if want and np.prod(want) == view.size else view.copy()
        return {k: out[k] for k in self.outputs}

    def sdk_version(self) -> tuple:
        """(librknnrt API version, NPU driver version) as the runtime reports them."""
        v = SdkVersion()
        self._call("rknn_query", self._ctx, QUERY_SDK_VERSION, ctypes.byref(v), ctypes.sizeof(v))
        return v.api_version.decode(errors="replace"), v.drv_version.decode(errors="replace")

    def close(self) -> None:
        if self._live:
            for mem in self._mems:
                self._lib.rknn_destroy_mem(self._ctx, mem)
            self._lib.rknn_destroy(self._ctx)
        self._mems, self._bindings, self._live, self._current = [], {}, False, None


def _order(names: List[str], attrs: List[TensorAttr]) -> List[int]:
    """For each tensor of the .rknn (in its order), the index of the manifest name it is; by
    name when the .rknn kept every name, else by position (the ONNX order)."""
    got = [a.name.decode(errors="replace") for a in attrs]
    if sorted(got) == sorted(names):
        return [names.index(n) for n in got]
    return list(range(len(names)))
