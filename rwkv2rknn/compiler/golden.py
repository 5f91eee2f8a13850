"""Golden vectors: for every NPU segment of a compiled artifact, a small input/output pair made
at compile time by onnxruntime in fp32 from real activations, so that the board can check its
own runtime (rwkv2rknn.runtime.selftest) before the user reads anything it computes.

The artifact (its manifest written, .rknn built) is run on onnxruntime over the first
``TOKENS`` tokens of real text (the calibration text given with --calib-text, else the default
calibration text of the model's tokenizer; a model without a tokenizer takes the seeded tokens
of the fp16 range trace). Each NPU segment keeps, in ``golden/NAME.npz``:

- ``token_in_I`` / ``token_out_J``: its inputs and outputs at the last of those tokens (the state
  has moved by then), for its per-token build;
- ``rows_in_I`` / ``rows_out_J``: the last ``ROWS`` tokens' rows [n, size] (a state input: its
  value before the first of them), for its T-row build; the self-test pads them to every row
  count the build was made for and compares the first ``n`` rows.

I and J index the segment's inputs and outputs in manifest order.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import List, Optional, Sequence

import numpy as np

from rwkv2rknn.artifact.plan import Manifest, sha256_file

log = logging.getLogger(__name__)

GOLDEN_DIR = "golden"
TOKENS = 8  # tokens traced; the token pair is the last step
ROWS = 4  # rows of the T-row pair (the last ROWS steps)


def text_ids(source: str, calib_text: Optional[str], vocab: int, fallback: Sequence[int]) -> List[int]:
    """The first TOKENS ids of the compile's calibration text read with the model's tokenizer;
    ``fallback`` (the range trace's tokens) where the model records no tokenizer or the text
    cannot be read with it."""
    from rwkv2rknn.rknn import calibrate
    from rwkv2rknn import fileio as io
    from rwkv2rknn.runtime.tokenizer import load_tokenizer

    spec = io.model_facts(source).get("tokenizer")
    if spec:
        try:
            text = calibrate.read_text(calib_text) if calib_text else calibrate.default_text(spec)[0]
            ids = [int(i) for i in load_tokenizer(spec).encode(text)[:TOKENS]]
            if len(ids) == TOKENS and (not vocab or max(ids) < vocab):
                return ids
        except Exception as e:  # noqa: BLE001 - golden vectors then come from the range tokens
            log.info("golden vectors from the range-trace tokens (text unreadable: %s)", e)
    ids = [int(t) for t in fallback][:TOKENS]
    while len(ids) < TOKENS:
        ids.append(ids[-1] if ids else 0)
    return ids


def trace(artifact: str, manifest: Manifest, ids: Sequence[int]):
    """Every NPU segment's inputs and fp32 outputs for each of ``ids``, as
    rwkv2rknn.rknn.calibrate.capture gives them, computed one segment at a time (each segment's
    session alone in memory, over all the tokens): a large model's compile stays within a
    segment's weights. None where a state slot is written by a later segment than the one
    reading it (then the whole model is run token by token)."""
    from rwkv2rknn.rknn.calibrate import Rows
    from rwkv2rknn.runtime.ort import OrtRunner

    width = int(manifest.model.get("width") or 0)
    slots = {s.input: s for s in manifest.state}
    envs = [{manifest.token_input: np.array([t], np.int32)} for t in ids]
    rows = {}
    for seg in manifest.segments:
        runner = OrtRunner(os.path.join(artifact, seg.token.onnx), seg.name, 1 if not seg.matmuls else 0)
        r = rows[seg.name] = Rows(seg.name, list(seg.inputs), list(seg.outputs), dict(seg.shapes))
        try:
            for t, env in enumerate(envs):
                feed = {}
                for k in seg.inputs:
                    slot = slots.get(k)
                    if slot is None:
                        value = env[k]
                    elif t == 0:
                        value = np.full(slot.dims(width), slot.init, np.float32)
                    elif slot.output in envs[t - 1]:
                        value = envs[t - 1][slot.output]
                    else:
                        return None
                    feed[k] = np.asarray(value).reshape(seg.shapes[k]) if k != manifest.token_input else value
                outs = runner.infer(feed)
                env.update(outs)
                if seg.backend == "npu":
                    r.feeds.append({k: np.array(v, np.float32) for k, v in feed.items()})
                    r.results.append(
                        {k: np.array(outs[k], np.float32).reshape(seg.shapes[k]) for k in seg.outputs}
                    )
        finally:
            runner.close()
    return {k: v for k, v in rows.items() if v.feeds}


def record(artifact: str, manifest: Manifest, ids: Sequence[int]) -> Manifest:
    """Write every NPU segment's golden vectors under ``artifact``/golden/ (its manifest is
    written); returns the manifest that records them."""
    segs = [s for s in manifest.segments if s.backend == "npu" and (s.token.rknn or s.seq.rknn)]
    if not segs:
        return manifest
    traced = trace(artifact, manifest, ids)
    if traced is None:
        from rwkv2rknn.rknn.calibrate import capture

        traced = capture(artifact, ids)
    os.makedirs(os.path.join(artifact, GOLDEN_DIR), exist_ok=True)
    slots = {s.input: s for s in manifest.state}
    width = int(manifest.model.get("width") or 0)
    done = {}
    for seg in segs:
        r = traced[seg.name]
        data = {}
        if seg.token.rknn:
            for i, k in enumerate(seg.inputs):
                data[f"token_in_{i}"] = r.feeds[-1][k]
            for j, k in enumerate(seg.outputs):
                data[f"token_out_{j}"] = r.results[-1][k]
        if seg.seq.rknn and seg.seq.rows:
            first = len(r.feeds) - min(ROWS, len(r.feeds))
            for i, k in enumerate(seg.inputs):
                if k in slots:  # the state before the chunk, in the slot's own shape
                    data[f"rows_in_{i}"] = r.feeds[first][k].reshape(slots[k].dims(width))
                else:
                    data[f"rows_in_{i}"] = np.stack([f[k].reshape(-1) for f in r.feeds[first:]])
            for j, k in enumerate(seg.outputs):
                data[f"rows_out_{j}"] = np.stack([x[k].reshape(-1) for x in r.results[first:]])
        rel = f"{GOLDEN_DIR}/{seg.name}.npz"
        path = os.path.join(artifact, rel)
        np.savez_compressed(path, **{k: np.ascontiguousarray(v, np.float32) for k, v in data.items()})
        done[seg.name] = (rel, sha256_file(path))
    segments = tuple(
        dataclasses.replace(s, golden=done[s.name][0], golden_sha256=done[s.name][1]) if s.name in done else s
        for s in manifest.segments
    )
    return dataclasses.replace(manifest, segments=segments)
