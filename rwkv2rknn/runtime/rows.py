"""Rows: a token step run on a T-row build (``RowStep``), a T-row build made in columns
(``Columns``), padding rows, and the check that an NPU segment's outputs are finite. Used by the
hybrid executor."""

from __future__ import annotations

from typing import Dict

import numpy as np

from rwkv2rknn.errors import NumericalError


def check_finite(seg, runner, outs, phase: str = "") -> None:
    """An NPU segment's outputs are finite, or a NumericalError naming the segment."""
    for name, value in outs.items():
        if not np.isfinite(value).all():
            backend = getattr(runner, "backend", "?")
            hint = ("the model's own numbers overflow even in fp32; check the checkpoint"
                    if backend == "ort" else
                    "values left fp16's range on the NPU; compile again with more --range-tokens, "
                    "or run with --backend ort to confirm")
            raise NumericalError(f"segment {seg.name} ({backend}) produced NaN/inf in '{name}'"
                                 + (f" {phase}" if phase else ""), hint)


class RowStep:
    """A token step on a T-row build: the token's row first, zero rows after it to make up
    ``rows``; row 0 of every output is the step's result (rows only read earlier rows)."""

    def __init__(self, runner, rows: int, row_inputs, shapes):
        self.runner, self.rows, self.row_inputs = runner, rows, set(row_inputs)
        self.shapes = shapes
        self.backend, self.inputs, self.outputs = runner.backend, runner.inputs, runner.outputs
        self.name = getattr(runner, "name", "")

    def infer(self, feed: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        args = {k: (pad(np.asarray(v, np.float32).reshape(1, -1), self.rows)
                    if k in self.row_inputs else v) for k, v in feed.items()}
        outs = self.runner.infer(args)
        return {k: np.asarray(v, np.float32).reshape(self.rows, -1)[0].reshape(self.shapes[k])
                for k, v in outs.items()}

    def close(self) -> None:
        self.runner.close()


class Columns:
    """A T-row build made in columns (``seq_layout`` 'columns', see rwkv2rknn.columns): it takes
    every row input [T, C] as [C, T] and gives every output as [N, T] (or [1, N, 1, T] in NCHW
    order, the same bytes); this turns them on the CPU, so that callers see rows. Vectors ([C]
    state rows) pass as they are; a state row [1, C] (the one-file layouts') goes in as the
    column [C, 1]. Such builds always run at least 2 rows (``build.DECODE_ROWS``), so an input
    of one row beside longer ones is a state row."""

    def __init__(self, runner):
        self.runner = runner
        self.backend, self.inputs, self.outputs = runner.backend, runner.inputs, runner.outputs
        self.rows = getattr(runner, "rows", ())
        self.name = getattr(runner, "name", "")

    def infer(self, feed: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        sizes = {np.shape(v)[0] for v in feed.values() if np.ndim(v) == 2}
        t = max(sizes, default=0)
        if not t or sizes - {1, t}:
            raise ValueError(f"segment {self.name}: row inputs of {sorted(sizes)} rows at once")
        outs = self.runner.infer({k: np.ascontiguousarray(np.asarray(v, np.float32).T)
                                  if np.ndim(v) == 2 else v for k, v in feed.items()})
        return {k: np.ascontiguousarray(np.asarray(v, np.float32).reshape(-1, t).T)
                for k, v in outs.items()}

    def close(self) -> None:
        self.runner.close()


def pad(rows: np.ndarray, t: int) -> np.ndarray:
    if rows.shape[0] == t:
        return rows
    out = np.zeros((t,) + rows.shape[1:], rows.dtype)
    out[:rows.shape[0]] = rows
    return out
