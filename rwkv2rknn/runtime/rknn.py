"""RKNN runners: ``rknn-lite`` (the board's fallback; ``rknn-rt`` in rknnrt.py calls librknnrt's
C API directly) and the code path it shares with ``rknn-sim`` (rknn-toolkit2's x86 simulator,
``rwkv2rknn.rknn.sim``: it builds, so it lives on the compile side).

Both share one code path (``_RknnRunner.infer``); they differ only in how the model is loaded:

- the simulator cannot run a loaded ``.rknn`` (``init_runtime`` returns -1), so ``rknn-sim``
  builds the segment's ONNX in its process (``rwkv2rknn.rknn.toolkit.build_in_process``), as the
  compiler did;
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

from rwkv2rknn.errors import MissingDependency, ToolkitError, UsageError

log = logging.getLogger(__name__)

LITE_INSTALL = "pip install rknn-toolkit-lite2 on the RK3588 board (aarch64, with /usr/lib/librknnrt.so)"
CORE_MASKS = {"auto": 0, "0": 1, "1": 2, "2": 4, "0_1": 3, "0_1_2": 7}


class _RknnRunner:
    backend = ""
    rows: tuple = ()  # T-row variant: the row counts it was built for

    def __init__(self, name: str, inputs: List[str], outputs: List[str], shapes: Dict[str, list], rows=()):
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
            raise ToolkitError(
                f"{self.backend} inference failed on segment {self.name}",
                "run `rwkv2rknn check --backend ort` to test the plan without the NPU",
            )
        return dict(zip(self.outputs, (np.asarray(o, np.float32) for o in outs)))

    def close(self) -> None:
        if self._rt is not None:
            self._rt.release()
            self._rt = None


class BoardRunner(_RknnRunner):
    """A compiled .rknn on the board's runtime, as both board runners (``rknn-rt``, ``rknn-lite``)
    take it: its file, the segment's inputs, outputs and their shapes, the NPU cores
    (``core_mask``), a T-row build's row counts (``rows``), the rknn-toolkit2 version that built
    it (``toolkit``, for the diagnosis of a refused file) and whether it takes its rows as columns
    [C, T] (``columns``; runtime.rows.Columns turns them). ``backend_args`` go to the runner's
    ``_open``, which loads the file."""

    def __init__(
        self,
        rknn_path: str,
        name: str,
        inputs,
        outputs,
        shapes=None,
        core_mask: str = "auto",
        rows=(),
        toolkit: str = "",
        columns: bool = False,
        **backend_args,
    ):
        super().__init__(name, inputs, outputs, shapes, rows)
        self._open(rknn_path, core_mask, toolkit, columns, **backend_args)

    def _open(self, rknn_path: str, core_mask: str, toolkit: str, columns: bool) -> None:
        raise NotImplementedError


class RknnLiteRunner(BoardRunner):
    """The board's fallback: rknn-toolkit-lite2 loads the compiled .rknn onto the NPU cores
    (``rknn-rt``, the C API through ctypes, is the default where librknnrt.so loads)."""

    backend = "rknn-lite"

    def _open(self, rknn_path: str, core_mask: str, toolkit: str, columns: bool) -> None:
        mask = CORE_MASKS.get(str(core_mask), None)
        if mask is None:
            raise UsageError(f"unknown core mask '{core_mask}'", f"use one of {', '.join(CORE_MASKS)}")
        try:
            from rknnlite.api import RKNNLite
        except ImportError as e:
            raise MissingDependency(
                "rknn-toolkit-lite2 is not installed (it runs only on the board)", LITE_INSTALL
            ) from e
        from rwkv2rknn.runtime import device

        lines: List[str] = []
        rt = None
        try:
            # RKNNLite logs and prints its own traceback when the runtime refuses a file: caught
            # here and read for the cause, so the user sees one line
            with device.native_output(lines):
                rt = RKNNLite()
                loaded = rt.load_rknn(rknn_path)
                inited = rt.init_runtime(core_mask=mask) if loaded == 0 else None
            for line in lines:
                log.debug("rknn-lite: %s", line)
            said = device.runtime_errors(lines)
            quote = f" (runtime: {said[0][:160]})" if said else ""
            if loaded != 0:
                raise ToolkitError(
                    f"cannot load {rknn_path}{quote}",
                    "the file is damaged or not an .rknn: compile (or pack) the artifact again",
                )
            if inited != 0:
                cause, fix = device.diagnose_init(
                    inited if isinstance(inited, int) else -1, said, device.librknnrt_path(), toolkit
                )
                raise ToolkitError(
                    f"the NPU runtime refused {os.path.basename(rknn_path)} (segment {self.name}): {cause}{quote}",
                    fix,
                )
        except BaseException:
            if rt is not None:
                rt.release()
            raise
        self._rt = rt
