"""``rknn-rt``: the board's NPU runner over librknnrt's C API, through ctypes.

One context per segment (``rknn_init`` from the .rknn bytes), bound to NPU cores with
``rknn_set_core_mask``. Inputs and outputs are float32 (the runtime converts to and from the
model's fp16). Two io paths (``io``):

- ``copy`` (the default, Rockchip's documented path): ``rknn_inputs_set`` with FLOAT32 and
  ``pass_through=0``, ``rknn_run``, ``rknn_outputs_get`` with ``want_float`` into buffers made
  once (``is_prealloc``), ``rknn_outputs_release``;
- ``zero-copy``: buffers made once with ``rknn_create_mem`` and bound with ``rknn_set_io_mem``
  as FLOAT32, so a call is: write the inputs, ``rknn_run``, read the outputs. No Rockchip sample
  binds FLOAT32 this way (theirs use UINT8 NHWC), so the self-test (rwkv2rknn.runtime.selftest)
  decides per segment whether it may be used.

A T-row ``.seq.rknn`` (built with ``dynamic_input``) gets one set of buffers per row count, made
on first use; switching row count calls ``rknn_set_input_shapes`` (and, zero-copy, binds that set
again).

``rknn_init`` is run with the runtime's own output caught: a refusal is one line naming the cause
(no NPU driver, a runtime too old for the files, a file for another SoC) with the runtime's
``E RKNN:`` line, and a context it made before refusing is destroyed.

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
from rwkv2rknn.runtime.rknn import CORE_MASKS, BoardRunner

log = logging.getLogger(__name__)

# rknn_query_cmd
QUERY_IN_OUT_NUM, QUERY_INPUT_ATTR, QUERY_OUTPUT_ATTR = 0, 1, 2
QUERY_SDK_VERSION, QUERY_MEM_SIZE = 5, 6
QUERY_CURRENT_INPUT_ATTR, QUERY_CURRENT_OUTPUT_ATTR = 14, 15
TENSOR_FLOAT32 = 0  # rknn_tensor_type
TENSOR_NCHW = 0  # rknn_tensor_format
IO_PATHS = ("copy", "zero-copy")
MAX_DIMS, MAX_NAME_LEN = 16, 256
ERRORS = {
    -1: "RKNN_ERR_FAIL",
    -2: "RKNN_ERR_TIMEOUT",
    -3: "RKNN_ERR_DEVICE_UNAVAILABLE",
    -4: "RKNN_ERR_MALLOC_FAIL",
    -5: "RKNN_ERR_PARAM_INVALID",
    -6: "RKNN_ERR_MODEL_INVALID",
    -7: "RKNN_ERR_CTX_INVALID",
    -8: "RKNN_ERR_INPUT_INVALID",
    -9: "RKNN_ERR_OUTPUT_INVALID",
    -10: "RKNN_ERR_DEVICE_UNMATCH",
    -11: "RKNN_ERR_INCOMPATILE_PRE_COMPILE_MODEL",
    -12: "RKNN_ERR_INCOMPATILE_OPTIMIZATION_LEVEL_VERSION",
    -13: "RKNN_ERR_TARGET_PLATFORM_UNMATCH",
}

# rknn_context is uint32_t on 32-bit ARM, uint64_t elsewhere
Context = ctypes.c_uint32 if ctypes.sizeof(ctypes.c_void_p) == 4 else ctypes.c_uint64


class InOutNum(ctypes.Structure):
    _fields_ = [("n_input", ctypes.c_uint32), ("n_output", ctypes.c_uint32)]


class TensorAttr(ctypes.Structure):
    """rknn_tensor_attr (376 bytes on aarch64 and x86_64)."""

    _fields_ = [
        ("index", ctypes.c_uint32),
        ("n_dims", ctypes.c_uint32),
        ("dims", ctypes.c_uint32 * MAX_DIMS),
        ("name", ctypes.c_char * MAX_NAME_LEN),
        ("n_elems", ctypes.c_uint32),
        ("size", ctypes.c_uint32),
        ("fmt", ctypes.c_int),
        ("type", ctypes.c_int),
        ("qnt_type", ctypes.c_int),
        ("fl", ctypes.c_int8),
        ("zp", ctypes.c_int32),
        ("scale", ctypes.c_float),
        ("w_stride", ctypes.c_uint32),
        ("size_with_stride", ctypes.c_uint32),
        ("pass_through", ctypes.c_uint8),
        ("h_stride", ctypes.c_uint32),
    ]

    @property
    def shape(self) -> tuple:
        return tuple(int(d) for d in self.dims[: self.n_dims])


class TensorMem(ctypes.Structure):
    """rknn_tensor_mem (40 bytes on 64-bit)."""

    _fields_ = [
        ("virt_addr", ctypes.c_void_p),
        ("phys_addr", ctypes.c_uint64),
        ("fd", ctypes.c_int32),
        ("offset", ctypes.c_int32),
        ("size", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("priv_data", ctypes.c_void_p),
    ]


class Input(ctypes.Structure):
    """rknn_input (32 bytes on 64-bit)."""

    _fields_ = [
        ("index", ctypes.c_uint32),
        ("buf", ctypes.c_void_p),
        ("size", ctypes.c_uint32),
        ("pass_through", ctypes.c_uint8),
        ("type", ctypes.c_int),
        ("fmt", ctypes.c_int),
    ]


class Output(ctypes.Structure):
    """rknn_output (24 bytes on 64-bit)."""

    _fields_ = [
        ("want_float", ctypes.c_uint8),
        ("is_prealloc", ctypes.c_uint8),
        ("index", ctypes.c_uint32),
        ("buf", ctypes.c_void_p),
        ("size", ctypes.c_uint32),
    ]


class SdkVersion(ctypes.Structure):
    _fields_ = [("api_version", ctypes.c_char * 256), ("drv_version", ctypes.c_char * 256)]


_SIGNATURES = {  # name: (restype, argtypes)
    "rknn_init": (
        ctypes.c_int,
        [ctypes.POINTER(Context), ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_void_p],
    ),
    "rknn_destroy": (ctypes.c_int, [Context]),
    "rknn_query": (ctypes.c_int, [Context, ctypes.c_int, ctypes.c_void_p, ctypes.c_uint32]),
    "rknn_set_core_mask": (ctypes.c_int, [Context, ctypes.c_int]),
    "rknn_create_mem": (ctypes.POINTER(TensorMem), [Context, ctypes.c_uint32]),
    "rknn_destroy_mem": (ctypes.c_int, [Context, ctypes.POINTER(TensorMem)]),
    "rknn_set_io_mem": (ctypes.c_int, [Context, ctypes.POINTER(TensorMem), ctypes.POINTER(TensorAttr)]),
    "rknn_set_input_shapes": (ctypes.c_int, [Context, ctypes.c_uint32, ctypes.POINTER(TensorAttr)]),
    "rknn_run": (ctypes.c_int, [Context, ctypes.c_void_p]),
    "rknn_inputs_set": (ctypes.c_int, [Context, ctypes.c_uint32, ctypes.POINTER(Input)]),
    "rknn_outputs_get": (ctypes.c_int, [Context, ctypes.c_uint32, ctypes.POINTER(Output), ctypes.c_void_p]),
    "rknn_outputs_release": (ctypes.c_int, [Context, ctypes.c_uint32, ctypes.POINTER(Output)]),
}
_LIBS: Dict[str, ctypes.CDLL] = {}


def load_library(path: Optional[str] = None) -> ctypes.CDLL:
    """librknnrt (``path``, else ``$RWKV2RKNN_LIBRKNNRT``, else the usual places), typed."""
    if path and not os.path.isfile(path):
        env = os.environ.get(device.LIBRKNNRT_ENV, "")
        raise MissingDependency(
            device.librknnrt_missing() if path == env else f"{path} does not exist", device.LIBRKNNRT_INSTALL
        )
    missing = device.librknnrt_missing() if not path else ""
    path = path or device.librknnrt_path()
    if missing:
        raise MissingDependency(missing, device.LIBRKNNRT_INSTALL)
    if path not in _LIBS:
        try:
            lib = ctypes.CDLL(path)
            for name, (res, args) in _SIGNATURES.items():
                fn = getattr(lib, name)
                fn.restype, fn.argtypes = res, args
        except (OSError, AttributeError) as e:
            raise MissingDependency(
                f"cannot load {path} as librknnrt ({str(e)[:120]}): an aarch64 librknnrt.so is needed",
                device.LIBRKNNRT_INSTALL,
            ) from e
        _LIBS[path] = lib
    return _LIBS[path]


def runtime_versions(rknn_path: str, lib: Optional[str] = None) -> tuple:
    """(librknnrt API version, NPU driver version) as the runtime reports them for one .rknn
    (``rknn_query`` needs a context: ``doctor`` uses the artifact's smallest file)."""
    lib_path = lib or device.librknnrt_path()
    runtime = load_library(lib_path)
    ctx = Context(0)
    with open(rknn_path, "rb") as f:
        data = f.read()
    lines: List[str] = []
    with device.native_output(lines):
        ret = runtime.rknn_init(ctypes.byref(ctx), data, len(data), 0, None)
    try:
        if ret != 0:
            said = device.runtime_errors(lines)
            cause, fix = device.diagnose_init(ret, said, lib_path, "")
            raise ToolkitError(
                f"librknnrt rknn_init returned {ret} on {os.path.basename(rknn_path)}: "
                f"{cause}" + (f" (librknnrt: {said[0][:160]})" if said else ""),
                fix,
            )
        v = SdkVersion()
        ret = runtime.rknn_query(ctx, QUERY_SDK_VERSION, ctypes.byref(v), ctypes.sizeof(v))
        if ret != 0:
            raise ToolkitError(
                f"librknnrt rknn_query(SDK_VERSION) returned {ret}",
                "install a librknnrt.so that matches the toolkit",
            )
        return v.api_version.decode(errors="replace"), v.drv_version.decode(errors="replace")
    finally:
        if ctx.value:
            runtime.rknn_destroy(ctx)


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


class _Copies:
    """The copy path's structures for one set of shapes: rknn_input entries (their buffers set
    per call) and rknn_output entries pointing at float32 arrays made once."""

    def __init__(self, in_attrs, out_attrs):
        self.sizes = [int(a.n_elems) for a in in_attrs]
        self.inputs = (Input * len(in_attrs))()
        for i, a in enumerate(in_attrs):
            self.inputs[i].index, self.inputs[i].pass_through = a.index, 0
            self.inputs[i].type = TENSOR_FLOAT32
            self.inputs[i].fmt = TENSOR_NCHW if a.n_dims == 4 else a.fmt
        self.outs = [np.zeros(a.shape or (a.n_elems,), np.float32) for a in out_attrs]
        self.outputs = (Output * len(out_attrs))()
        for j, (a, arr) in enumerate(zip(out_attrs, self.outs)):
            o = self.outputs[j]
            o.want_float, o.is_prealloc, o.index = 1, 1, a.index
            o.buf, o.size = arr.ctypes.data, arr.nbytes


class RknnRtRunner(BoardRunner):
    """One NPU segment on librknnrt (the board), its arguments ``BoardRunner``'s and: ``lib``, the
    library to load (default: the system's librknnrt.so), ``io``, the io path (copy or
    zero-copy), ``target``, the SoC the artifact was built for."""

    backend = "rknn-rt"

    def _open(
        self,
        rknn_path: str,
        core_mask: str,
        toolkit: str,
        columns: bool,
        lib: Optional[str] = None,
        io: str = "copy",
        target: str = "",
    ) -> None:
        if io not in IO_PATHS:
            raise BadInput(f"unknown rknn io path '{io}'", f"use one of {', '.join(IO_PATHS)}")
        self.io = io
        self._row_axis = -1 if columns else 0
        self._toolkit, self._lib_path = toolkit, lib or device.librknnrt_path()
        self._lib = load_library(self._lib_path)
        self._ctx, self._live = Context(0), False
        self._mems: List[ctypes.POINTER(TensorMem)] = []
        self._bindings: Dict[tuple, _Binding] = {}
        self._copies: Dict[tuple, _Copies] = {}
        self._current: Optional[tuple] = None
        self._target = target
        mask = CORE_MASKS.get(str(core_mask))
        if mask is None:
            raise BadInput(f"unknown core mask '{core_mask}'", f"use one of {', '.join(CORE_MASKS)}")
        try:
            with open(rknn_path, "rb") as f:
                data = f.read()
            self._init(data, os.path.basename(rknn_path))
            del data  # the runtime holds its own copy of the weights
            if mask:
                self._call("rknn_set_core_mask", self._ctx, mask)
            num = InOutNum()
            self._call("rknn_query", self._ctx, QUERY_IN_OUT_NUM, ctypes.byref(num), ctypes.sizeof(num))
            if (num.n_input, num.n_output) != (len(self.inputs), len(self.outputs)):
                raise BadInput(
                    f"{os.path.basename(rknn_path)} has {num.n_input} inputs and "
                    f"{num.n_output} outputs, the manifest says {len(self.inputs)} and "
                    f"{len(self.outputs)}",
                    "compile the model again",
                )
            self._in_attrs = [self._attr(QUERY_INPUT_ATTR, i) for i in range(num.n_input)]
            self._out_attrs = [self._attr(QUERY_OUTPUT_ATTR, i) for i in range(num.n_output)]
            self._in_order = _order(self.inputs, self._in_attrs)
            self._out_order = _order(self.outputs, self._out_attrs)
            if not self.rows:
                self._current = ()
                if io == "copy":
                    self._copies[()] = _Copies(self._in_attrs, self._out_attrs)
                else:
                    self._bindings[()] = self._bind(self._in_attrs, self._out_attrs)
        except BaseException:
            self.close()
            raise

    # ---------------------------------------------------------------- calls

    def _init(self, data: bytes, what: str) -> None:
        """rknn_init with the runtime's output caught; a refusal names its cause."""
        lines: List[str] = []
        with device.native_output(lines):
            ret = self._lib.rknn_init(ctypes.byref(self._ctx), data, len(data), 0, None)
        for line in lines:
            log.debug("librknnrt: %s", line)
        if ret == 0:
            self._live = True
            return
        if self._ctx.value:  # a context the runtime made before refusing the file
            self._lib.rknn_destroy(self._ctx)
            self._ctx.value = 0
        said = device.runtime_errors(lines)
        cause, fix = device.diagnose_init(ret, said, self._lib_path, self._toolkit, self._target)
        quote = f" (librknnrt: {said[0][:160]})" if said else ""
        raise ToolkitError(
            f"librknnrt rknn_init returned {ret} ({ERRORS.get(ret, 'unknown error')}) "
            f"on {what}, segment {self.name}: {cause}{quote}",
            fix,
        )

    def _call(self, fn: str, *args) -> None:
        ret = getattr(self._lib, fn)(*args)
        if ret != 0:
            what = (
                f"librknnrt {fn} returned {ret} ({ERRORS.get(ret, 'unknown error')}) on segment {self.name}"
            )
            raise ToolkitError(
                what,
                device.runtime_hint(self._lib_path, self._toolkit)
                if fn == "rknn_init"
                else "run `rwkv2rknn doctor ARTIFACT` on the board, or --backend rknn-lite",
            )

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
                    raise ToolkitError(
                        f"librknnrt rknn_create_mem({attr.size}) failed on segment {self.name}",
                        "free memory on the board (`rwkv2rknn doctor`)",
                    )
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
            return (self._copies if self.io == "copy" else self._bindings)[key]
        attrs = (TensorAttr * len(args))()
        for i, (attr, a) in enumerate(zip(self._in_attrs, args)):
            ctypes.memmove(ctypes.byref(attrs[i]), ctypes.byref(attr), ctypes.sizeof(attr))
            attrs[i].n_dims = a.ndim
            for d, n in enumerate(a.shape):
                attrs[i].dims[d] = n
            attrs[i].n_elems = a.size
        self._current = None
        self._call("rknn_set_input_shapes", self._ctx, len(args), attrs)
        if self.io == "copy":
            if key not in self._copies:
                ins = [self._attr(QUERY_CURRENT_INPUT_ATTR, i) for i in range(len(args))]
                outs = [self._attr(QUERY_CURRENT_OUTPUT_ATTR, i) for i in range(len(self._out_attrs))]
                self._copies[key] = _Copies(ins, outs)
            self._current = key
            return self._copies[key]
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
                raise BadInput(
                    f"segment {self.name} was built for {list(self.rows)} rows, got {sorted(got)}",
                    "feed chunks of a row count it was built for",
                )
            b = self._use(tuple(a.shape for a in args), args)
        else:
            b = self._copies[()] if self.io == "copy" else self._bindings[()]
        if self.io == "copy":
            return self._infer_copy(b, args)
        for view, a, j in zip(b.ins, args, self._in_order):
            if a.size != view.size:
                raise BadInput(
                    f"segment {self.name}: input '{self.inputs[j]}' has {a.size} values, "
                    f"the .rknn takes {view.size}",
                    "compile the model again",
                )
            view[...] = a.reshape(view.shape)
        self._call("rknn_run", self._ctx, None)
        out = {}
        for view, j in zip(b.outs, self._out_order):
            k = self.outputs[j]
            want = self.shapes.get(k)
            out[k] = view.reshape(want).copy() if want and np.prod(want) == view.size else view.copy()
        return {k: out[k] for k in self.outputs}

    def _infer_copy(self, c: _Copies, args) -> Dict[str, np.ndarray]:
        keep = []
        for i, (a, n, j) in enumerate(zip(args, c.sizes, self._in_order)):
            if a.size != n:
                raise BadInput(
                    f"segment {self.name}: input '{self.inputs[j]}' has {a.size} values, the .rknn takes {n}",
                    "compile the model again",
                )
            a = np.ascontiguousarray(a, np.float32)
            keep.append(a)  # alive until the runtime has copied it
            c.inputs[i].buf, c.inputs[i].size = a.ctypes.data, a.nbytes
        self._call("rknn_inputs_set", self._ctx, len(keep), c.inputs)
        self._call("rknn_run", self._ctx, None)
        self._call("rknn_outputs_get", self._ctx, len(c.outs), c.outputs, None)
        try:
            out = {}
            for arr, j in zip(c.outs, self._out_order):
                k = self.outputs[j]
                want = self.shapes.get(k)
                out[k] = arr.reshape(want).copy() if want and np.prod(want) == arr.size else arr.copy()
        finally:
            self._lib.rknn_outputs_release(self._ctx, len(c.outs), c.outputs)
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
        self._copies = {}


def _order(names: List[str], attrs: List[TensorAttr]) -> List[int]:
    """For each tensor of the .rknn (in its order), the index of the manifest name it is; by
    name when the .rknn kept every name, else by position (the ONNX order)."""
    got = [a.name.decode(errors="replace") for a in attrs]
    if sorted(got) == sorted(names):
        return [names.index(n) for n in got]
    return list(range(len(names)))
