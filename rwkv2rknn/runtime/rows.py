"""Rows: a token step run on a T-row build (``RowStep``), a T-row build made in columns
(``Columns``), padding rows, a segment run row by row over a chunk (``row_by_row``) or on its
last row (``last_row``: the head), and the check that an NPU segment's outputs are finite. Used by the hybrid executor."""

from __future__ import annotations

from typing import Dict

import numpy as np

from rwkv2rknn.errors import NumericalError


def check_finite(seg, runner, outs, phase: str = "") -> None:
    """An NPU segment's outputs are finite, or a NumericalError naming the segment."""
    for name, value in outs.items():
        if not np.isfinite(value).all():
            backend = getattr(runner, "backend", "?")
            hint = (
                "the model's own numbers overflow even in fp32; check the checkpoint"
                if backend == "ort"
                else "values left fp16's range on the NPU; compile again with more --range-tokens, "
                "or run with --backend ort to confirm"
            )
            raise NumericalError(
                f"segment {seg.name} ({backend}) produced NaN/inf in '{name}'"
                + (f" {phase}" if phase else ""),
                hint,
            )


class RowStep:
    """A token step on a T-row build: the token's row first, zero rows after it to make up
    ``rows``; row 0 of every output is the step's result (rows only read earlier rows)."""

    def __init__(self, runner, rows: int, row_inputs, shapes):
        self.runner, self.rows, self.row_inputs = runner, rows, set(row_inputs)
        self.shapes = shapes
        self.backend, self.inputs, self.outputs = runner.backend, runner.inputs, runner.outputs
        self.name = getattr(runner, "name", "")

    def infer(self, feed: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        args = {
            k: (pad(np.asarray(v, np.float32).reshape(1, -1), self.rows) if k in self.row_inputs else v)
            for k, v in feed.items()
        }
        outs = self.runner.infer(args)
        return {
            k: np.asarray(v, np.float32).reshape(self.rows, -1)[0].reshape(self.shapes[k])
            for k, v in outs.items()
        }

    def close(self) -> None:
        self.runner.close()


class Columns:
    """A T-row build made in columns (``seq_layout`` 'columns', see rwkv2rknn.rknn.columns): it takes
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
        outs = self.runner.infer(
            {
                k: np.ascontiguousarray(np.asarray(v, np.float32).T) if np.ndim(v) == 2 else v
                for k, v in feed.items()
            }
        )
        return {k: np.ascontiguousarray(np.asarray(v, np.float32).reshape(-1, t).T) for k, v in outs.items()}

    def close(self) -> None:
        self.runner.close()


# The metadata entry rwkv2rknn.rknn.columns writes into a T-row file it rewrote to columns.
LAYOUT_KEY = "rwkv2rknn.layout"


def columns_as_rows(runner):
    """An onnxruntime runner of a T-row file, wrapped in ``Columns`` if the file is a columns
    form (its metadata says so: the compile's columns step wrote it, and the NPU build is of
    it); a rows file (older artifacts, CPU segments, rows fallbacks) as it is."""
    meta = runner.session.get_modelmeta().custom_metadata_map
    return Columns(runner) if meta.get(LAYOUT_KEY) == "columns" else runner


def pad(rows: np.ndarray, t: int) -> np.ndarray:
    if rows.shape[0] == t:
        return rows
    out = np.zeros((t,) + rows.shape[1:], rows.dtype)
    out[: rows.shape[0]] = rows
    return out


def last_row(seg, runner, seq_runner, env, n: int) -> Dict[str, np.ndarray]:
    """A segment's outputs [1, size] for row ``n - 1`` of a chunk alone (``env``: name -> [n,
    size]): on its T-row runner (onnxruntime's takes one row; a fixed-row build is padded to its
    smallest row count) or, where it has none, its per-token runner."""
    t = 1
    if seq_runner is not None:
        t = min(getattr(seq_runner, "rows", ()) or (1,))
        outs = seq_runner.infer({k: pad(env[k][n - 1 : n], t) for k in seg.inputs})
    else:
        outs = runner.infer({k: env[k][n - 1].reshape(seg.shapes[k]) for k in seg.inputs})
    if seg.backend == "npu":
        check_finite(seg, seq_runner or runner, outs, "during prefill")
    return {k: np.asarray(v, np.float32).reshape(t, -1)[:1] for k, v in outs.items()}


def row_by_row(
    seg, runner, env, tokens, token_input: str, prev_of, first, newest=()
) -> Dict[str, np.ndarray]:
    """A segment without a T-row runner over a chunk, one row a call: its outputs [n, size].
    ``env``: what earlier segments made, name -> [n, size]; a state input ``k`` reads row t - 1
    of ``prev_of[k]`` (this segment's own output or an earlier one's) and ``first[k]`` (the
    state before the chunk) in row 0; ``token_input`` takes ``tokens[t]``. Outputs in ``newest``
    (state that only the next row reads) keep their last row only, [1, size]: a RWKV-7 layer's
    wkv state is 256 KiB a row at 430M, 8 MiB over a chunk of 32."""
    rows = {k: [] for k in seg.outputs}
    for t in range(len(tokens)):
        feed = {}
        for k in seg.inputs:
            if k == token_input:
                feed[k] = np.array([tokens[t]], np.int32)
            elif k in prev_of:
                src = prev_of[k]
                if t == 0:
                    feed[k] = first[k]
                else:
                    value = rows[src][-1] if src in rows else env[src][t - 1]  # row t - 1
                    feed[k] = np.asarray(value).reshape(seg.shapes[k])
            else:
                feed[k] = env[k][t].reshape(seg.shapes[k])
        outs = runner.infer(feed)
        if seg.backend == "npu":
            check_finite(seg, runner, outs)
        for name, value in outs.items():
            value = np.asarray(value, np.float32).reshape(-1)
            if name in newest:
                rows[name] = [value]
            else:
                rows[name].append(value)
    return {name: np.stack(values) for name, values in rows.items()}
