"""RKNN runners: ``rknn-sim`` (rknn-toolkit2's x86 simulator) and ``rknn-lite`` (the board).

Both share one code path (``_RknnRunner.infer``); they differ only in how the model is loaded:

- the simulator cannot run a loaded ``.rknn`` (``init_runtime`` returns -1), so ``rknn-sim``
  builds the segment's ONNX in this process (``build_in_process``), as the compiler did;
- on the board, ``rknn-lite`` (rknn-toolkit-lite2) loads the compiled ``.rknn`` and binds it to
  NPU cores with ``core_mask``.

Neither toolkit is imported until a runner is made, so the board never imports rknn-toolkit2 or
torch. The rknn-lite runner has NOT been run on a board by this project's tests (there is none
here); it is kept as thin as possible on top of the shared path.
"""

from __future__ import annotations

import contextlib
import io as _io
import logging
import os
from typing import Dict, List

import numpy as np

from rwkv2rknn.errors import MissingDependency, ToolkitError

log = logging.getLogger(__name__)

TOOLKIT_INSTALL = ("pip install --no-deps rknn-toolkit2==2.5.0 (its other dependencies are in "
                   "requirements.txt; or: make install)")
LITE_INSTALL = "pip install rknn-toolkit-lite2 on the RK3588 board (aarch64, with /usr/lib/librknnrt.so)"
CORE_MASKS = {"auto": 0, "0": 1, "1": 2, "2": 4, "0_1": 3, "0_1_2": 7}


def quiet_toolkit() -> None:
    os.environ.setdefault("TQDM_DISABLE", "1")
    logging.getLogger("rknnLogger").setLevel(logging.ERROR)


def import_toolkit():
    quiet_toolkit()
    try:
        with contextlib.redirect_stdout(_io.StringIO()):
            from rknn.api import RKNN
    except ImportError as e:
        raise MissingDependency("rknn-toolkit2 is not installed", TOOLKIT_INSTALL) from e
    logging.getLogger("rknnLogger").setLevel(logging.ERROR)
    return RKNN


def toolkit_version() -> str:
    try:
        from importlib.metadata import version
        return version("rknn-toolkit2")
    except Exception:  # noqa: BLE001 - not installed
        return ""


@contextlib.contextmanager
def quiet_fds(into: str = os.devnull):
    """Silence stdout and stderr at the file-descriptor level (the toolkit's C++ side prints),
    or send both into the file ``into`` (appended)."""
    import sys
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(into, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        with contextlib.redirect_stdout(_io.StringIO()):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved + [devnull]:
            os.close(fd)


@contextlib.contextmanager
def _maybe_quiet(verbose: bool, log_to: str = ""):
    if verbose:
        yield
        return
    with quiet_fds(log_to or os.devnull):
        yield


def build_in_process(onnx_path: str, target: str = "rk3588", rknn_out: str = "",
                     runtime: bool = False, verbose: bool = False, float_dtype: str = "",
                     dynamic_input=None, log_to: str = ""):
    """Build an ONNX model with rknn-toolkit2; optionally export the .rknn and/or start the
    simulator. Returns the RKNN object. Raises ToolkitError on a refused build. The toolkit's
    own output is dropped (``verbose``: shown; ``log_to``: appended to that file).
    (The toolkit may also kill the whole process: the compiler calls this in a child.)"""
    RKNN = import_toolkit()
    with _maybe_quiet(verbose, log_to):
        rk = RKNN(verbose=verbose)
        cfg = {"target_platform": target}
        if float_dtype:
            cfg["float_dtype"] = float_dtype
        if dynamic_input:
            cfg["dynamic_input"] = dynamic_input
        steps = [("config", lambda: rk.config(**cfg)),
                 ("load_onnx", lambda: rk.load_onnx(onnx_path)),
                 ("build", lambda: rk.build(do_quantization=False))]
        if rknn_out:
            steps.append(("export_rknn", lambda: rk.export_rknn(rknn_out)))
        if runtime:
            steps.append(("init_runtime", lambda: rk.init_runtime()))
        for step, call in steps:
            try:
                ret = call()
            except Exception as e:  # the toolkit reports some failures as exceptions
                rk.release()
                raise ToolkitError(f"rknn-toolkit2 {step} failed on {os.path.basename(onnx_path)} "
                                   f"({type(e).__name__}: {str(e).strip().splitlines()[-1][:120] if str(e).strip() else ''})",
                                   "the segment stays on the CPU; run with --verbose for the toolkit's log") from e
            if ret not in (0, None) and step != "config":
                rk.release()
                raise ToolkitError(f"rknn-toolkit2 {step} returned {ret} on {os.path.basename(onnx_path)}",
                                   "the segment stays on the CPU; run with --verbose for the toolkit's log")
    return rk


def dynamic_shapes(onnx_path: str, rows) -> list:
    """rknn-toolkit2 ``dynamic_input`` for a T-row segment: its input shapes with T = each of rows."""
    import onnx
    model = onnx.load(onnx_path, load_external_data=False)
    dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input]
    return [[[t if isinstance(d, str) else d for d in shape] for shape in dims] for t in rows]


class _RknnRunner:
    backend = ""
    rows: tuple = ()  # T-row variant: the row counts it was built for

    def __init__(self, name: str, inputs: List[str], outputs: List[str], shapes: Dict[str, list],
                 rows=()):
        self.name, self.inputs, self.outputs = name, list(inputs), list(outputs)
        self.rows = tuple(rows)
        # a T-row build takes inputs of several shapes: pass them as they come
        self.shapes = {k: tuple(v) for k, v in shapes.items()} if shapes and not rows else {}
        self._rt = None

    def infer(self, feed: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        args = [np.ascontiguousarray(feed[k], dtype=np.float32) for k in self.inputs]
        if self.shapes:
            args = [a.reshape(self.shapes[k]) for a, k in zip(args, self.inputs)]
        with contextlib.redirect_stdout(_io.StringIO()):
            outs = self._rt.inference(inputs=args)
        if outs is None or len(outs) != len(self.outputs):
            raise ToolkitError(f"{self.backend} inference failed on segment {self.name}",
                               "run `rwkv2rknn check --backend ort` to test the plan without the NPU")
        return dict(zip(self.outputs, (np.asarray(o, np.float32) for o in outs)))

    def close(self) -> None:
        if self._rt is not None:
            self._rt.release()
            self._rt = None


class RknnSimRunner(_RknnRunner):
    """The x86 simulator: builds the segment's ONNX in-process (it cannot load a .rknn)."""

    backend = "rknn-sim"

    def __init__(self, onnx_path: str, name: str, inputs, outputs, shapes, target: str = "rk3588",
                 rows=()):
        super().__init__(name, inputs, outputs, shapes, rows)
        self._rt = build_in_process(onnx_path, target=target, runtime=True,
                                    dynamic_input=dynamic_shapes(onnx_path, rows) if rows else None)


class RknnLiteRunner(_RknnRunner):
    """The board: rknn-toolkit-lite2 loads the compiled .rknn onto the NPU cores."""

    backend = "rknn-lite"

    def __init__(self, rknn_path: str, name: str, inputs, outputs, shapes, core_mask: str = "auto",
                 rows=()):
        super().__init__(name, inputs, outputs, shapes, rows)
        try:
            from rknnlite.api import RKNNLite
        except ImportError as e:
            raise MissingDependency("rknn-toolkit-lite2 is not installed (it runs only on the board)",
                                    LITE_INSTALL) from e
        rt = RKNNLite()
        if rt.load_rknn(rknn_path) != 0:
            raise ToolkitError(f"cannot load {rknn_path}", "compile the model again for this board")
        mask = CORE_MASKS.get(str(core_mask), None)
        if mask is None:
            raise ToolkitError(f"unknown core mask '{core_mask}'", f"use one of {', '.join(CORE_MASKS)}")
        if rt.init_runtime(core_mask=mask) != 0:
            raise ToolkitError(f"the NPU runtime refused {os.path.basename(rknn_path)}",
                               "check that it was compiled for this board's target (--target)")
        self._rt = rt


# SoCs whose NPUs run the same .rknn files (what --target names).
_NPU_FAMILY = {"rk3588": "rk3588", "rk3588s": "rk3588", "rk3576": "rk3576", "rk3566": "rk356x",
               "rk3568": "rk356x", "rk3562": "rk3562"}


def board_soc(compatible: str = "/proc/device-tree/compatible") -> str:
    """The Rockchip SoC of this machine as a --target name ('rk3588', ...); '' if not known."""
    try:
        with open(compatible, "rb") as f:
            names = f.read().decode("ascii", "replace").split("\0")
    except OSError:
        return ""
    for n in names:
        soc = n.split(",", 1)[1] if n.startswith("rockchip,rk") else ""
        if soc in _NPU_FAMILY:
            return "rk3588" if soc == "rk3588s" else soc
    return ""


def same_npu(soc: str, target: str) -> bool:
    """A .rknn built for ``target`` runs on ``soc``."""
    return _NPU_FAMILY.get(soc, soc) == _NPU_FAMILY.get(target, target)


def _has(module: str) -> bool:
    """``module`` can be found (a broken or shadowed parent package counts as missing)."""
    import importlib.util
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def lite_available() -> bool:
    return _has("rknnlite.api")


def toolkit_available() -> bool:
    return _has("rknn.api") and _has("torch")


def toolkit_installed() -> bool:
    """rknn-toolkit2 is installed (its metadata) and importable here (not hidden or broken)."""
    return bool(toolkit_version()) and _has("rknn.api")


def require_toolkit() -> str:
    """rknn-toolkit2's version, or a MissingDependency that says how to install it."""
    if not toolkit_installed():
        raise MissingDependency("building .rknn files needs rknn-toolkit2",
                                f"{TOOLKIT_INSTALL}; or compile with --plan-only")
    return toolkit_version()
