"""``rknn-sim``: a segment in rknn-toolkit2's x86 simulator, which cannot load a ``.rknn``: the
runner builds the segment's ONNX in this process, as the compiler did. It builds, so it lives on
the compile side; the runtime finds it by its entry point (group ``rwkv2rknn.runners``,
``runtime.base.plugin_runner``) and never imports this package."""

from __future__ import annotations

from rwkv2rknn.rknn.columns import in_columns
from rwkv2rknn.rknn.toolkit import build_in_process
from rwkv2rknn.runtime.rknn import _RknnRunner


class RknnSimRunner(_RknnRunner):
    """The x86 simulator: builds the segment's ONNX in-process (it cannot load a .rknn), as the
    file is written, at the compiled ``precision`` from the same calibration ``dataset`` and with
    the quantisation settings the artifact recorded (``quant``: ``plan.Build.quant``), as the
    compiler did. ``in_columns``: the file is a columns form (``rwkv2rknn.rknn.columns``): the
    caller turns rows into columns (``runtime.rows.Columns``)."""

    backend = "rknn-sim"

    def __init__(
        self,
        onnx_path: str,
        name: str,
        inputs,
        outputs,
        shapes,
        target: str = "rk3588",
        rows=(),
        precision: str = "fp16",
        dataset: str = "",
        quant=None,
    ):
        super().__init__(name, inputs, outputs, shapes, rows)
        self.in_columns = in_columns(onnx_path)
        self._rt = build_in_process(
            onnx_path,
            target=target,
            runtime=True,
            rows=rows,
            precision=precision,
            dataset=dataset,
            settings=quant,
        )
