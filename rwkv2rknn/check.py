"""`rwkv2rknn check`: the hybrid executor against pure ONNX Runtime on the same seeded tokens."""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

from rwkv2rknn.compare import Report, compare_logits
from rwkv2rknn.errors import BadInput


# (least top-1 agreement, largest logit error relative to the logit scale) per precision of
# the NPU segments when they run on an NPU backend; on ort every segment runs its fp32 ONNX.
TOLERANCE = {"fp16": (0.99, 0.05), "w16a16i": (0.99, 0.05), "w8a8": (0.85, 0.25)}


def artifact_precision(manifest) -> str:
    """The least precise build among the NPU segments: w8a8, w16a16i or fp16."""
    used = {p for s in manifest.segments if s.backend == "npu" for p in (s.precision, s.seq_precision)}
    return next((p for p in ("w8a8", "w16a16i") if p in used), "fp16")


def default_tolerance(backend: str, source_dtype: str, precision: str = "fp16") -> tuple:
    """(min top-1 agreement, max relative error) ``check`` holds an artifact to."""
    if backend == "ort":
        return 0.99, (1e-4 if source_dtype == "float32" else 0.05)
    return TOLERANCE.get(precision, TOLERANCE["fp16"])


def run_check(artifact: str, n_tokens: int = 32, seed: int = 0, backend: str = "auto",
              reference: Optional[str] = None, per_segment: bool = False,
              min_top1: Optional[float] = None, max_rel: Optional[float] = None,
              text: Optional[str] = None):
    """Teacher-force ``n_tokens`` seeded random ids (or the tokens of ``text``; by default the
    built-in English sample for an artifact with w8a8 segments: random ids leave the int8 ranges
    calibrated on text) through the artifact and pure onnxruntime and compare them."""
    from rwkv2rknn.models import rwkv4
    from rwkv2rknn.runtime.hybrid import HybridModel, load_manifest, resolve_backend
    from rwkv2rknn.runtime.reference import PerLayerModel

    manifest = load_manifest(artifact)
    if not manifest.token_input or not manifest.logits_output:
        raise BadInput(f"'{artifact}' was compiled from a single ONNX graph, not a whole model",
                       "compile the folder of per-layer files to check it")
    ref_dir = reference or str(manifest.model.get("source", ""))
    if not ref_dir or not os.path.isdir(ref_dir):
        raise BadInput(f"the per-layer files the artifact was compiled from are not at '{ref_dir}'",
                       "pass --reference FOLDER")
    chosen = resolve_backend(backend)
    hybrid = HybridModel(artifact, backend=chosen)
    ref = PerLayerModel(ref_dir)
    if ref.vocab != hybrid.vocab or ref.state_shape[0] != manifest.layers or \
            ref.state_shape[2] != hybrid.width:
        raise BadInput(f"reference '{ref_dir}' is not the model the artifact was compiled from",
                       "pass the right --reference FOLDER")
    tokens = _tokens(manifest, chosen, n_tokens, seed, text)
    h_state, r_state = hybrid.init_state(), ref.init_state()
    got, want = [], []
    traces = []
    for t in tokens:
        env = {} if per_segment else None
        got.append(hybrid.step(t, h_state, trace=env))
        want.append(ref.step(t, r_state))
        if per_segment:
            traces.append(env)
    precision = artifact_precision(manifest) if chosen != "ort" else "fp32 (ort)"
    top1, rel = default_tolerance(chosen, str(manifest.model.get("source_dtype")), precision)
    rows = list(rwkv4.STATE_ROWS)
    rep: Report = compare_logits(np.stack(got), np.stack(want),
                                 min_top1=top1 if min_top1 is None else min_top1,
                                 max_rel=rel if max_rel is None else max_rel,
                                 state_got=hybrid.state_as_layers(h_state, rows),
                                 state_ref=r_state.astype(np.float32))
    rep.tolerance["precision"] = precision
    if per_segment:
        rep.per_segment = _per_segment(artifact, hybrid, traces)
    hybrid.close()
    return rep, chosen


def _tokens(manifest, backend: str, n: int, seed: int, text: Optional[str]):
    from rwkv2rknn.calibrate import BUILTIN_TEXT
    from rwkv2rknn.tokenizer import load_tokenizer
    if text is None and (backend == "ort" or artifact_precision(manifest) != "w8a8"):
        return [int(t) for t in np.random.default_rng(seed).integers(0, manifest.vocab, n)]
    if not manifest.tokenizer:
        raise BadInput("the artifact records no tokenizer to read check's text with",
                       "compile a model exported with --tokenizer")
    ids = load_tokenizer(manifest.tokenizer).encode(BUILTIN_TEXT if text is None else text)[:n]
    if len(ids) < 2 or max(ids) >= manifest.vocab:
        raise BadInput("check's text gives fewer than 2 tokens the model knows",
                       "give a longer text in the model's own tokenizer")
    return ids


def _per_segment(artifact, hybrid, traces):
    """Each NPU segment fed the hybrid run's own inputs, against its ONNX on onnxruntime."""
    from rwkv2rknn.runtime.ort import OrtRunner
    out = []
    for seg, runner in zip(hybrid.manifest.segments, hybrid.runners):
        if seg.backend != "npu":
            continue
        ref = OrtRunner(os.path.join(artifact, seg.onnx), seg.name)
        worst = 0.0
        for env in traces:
            feed = {k: env[k] for k in seg.inputs}
            a, b = runner.infer(feed), ref.infer(feed)
            for k in seg.outputs:
                scale = max(float(np.max(np.abs(b[k]))), 1e-30)
                worst = max(worst, float(np.max(np.abs(np.asarray(a[k], np.float64).reshape(-1) -
                                                       np.asarray(b[k], np.float64).reshape(-1)))) / scale)
        out.append({"segment": seg.name, "backend": runner.backend, "max_rel": worst})
    return out
