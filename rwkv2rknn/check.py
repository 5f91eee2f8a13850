"""`rwkv2rknn check`: the hybrid executor against pure ONNX Runtime on the same seeded tokens."""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

from rwkv2rknn.compare import Report, compare_logits
from rwkv2rknn.errors import BadInput


def default_tolerance(backend: str, source_dtype: str) -> float:
    return 1e-4 if backend == "ort" and source_dtype == "float32" else 0.05


def run_check(artifact: str, n_tokens: int = 32, seed: int = 0, backend: str = "auto",
              reference: Optional[str] = None, per_segment: bool = False, min_top1: float = 0.99,
              max_rel: Optional[float] = None):
    from rwkv2rknn.models import rwkv4
    from rwkv2rknn.runtime.hybrid import HybridModel, load_manifest, resolve_backend
    manifest = load_manifest(artifact)
    if not manifest.token_input or not manifest.logits_output:
        raise BadInput(f"'{artifact}' was compiled from a single ONNX graph, not a whole model",
                       "compile a whole model (a per-layer folder or one file with token, state "
                       "and logits) to check it")
    if manifest.model.get("source_state"):
        return _check_whole_file(artifact, manifest, n_tokens, seed, backend, reference,
                                 per_segment, min_top1, max_rel)
    from rwkv2rknn.runtime.reference import PerLayerModel
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
    h_state, r_state, got, want, traces = _steps(hybrid, ref, n_tokens, seed, per_segment)
    tol = max_rel if max_rel is not None else default_tolerance(chosen, str(manifest.model.get("source_dtype")))
    rows = list(rwkv4.STATE_ROWS)
    rep: Report = compare_logits(got, want, min_top1=min_top1, max_rel=tol,
                                 state_got=hybrid.state_as_layers(h_state, rows),
                                 state_ref=r_state.astype(np.float32))
    if per_segment:
        rep.per_segment = _per_segment(artifact, hybrid, traces)
    hybrid.close()
    return rep, chosen


def _steps(hybrid, ref, n_tokens: int, seed: int, per_segment: bool):
    """Both models on the same seeded tokens from their initial states: (hybrid state,
    reference state, hybrid logits [T, V], reference logits [T, V], per-step traces)."""
    tokens = [int(t) for t in np.random.default_rng(seed).integers(0, hybrid.vocab, n_tokens)]
    h_state, r_state = hybrid.init_state(), ref.init_state()
    got, want, traces = [], [], []
    for t in tokens:
        env = {} if per_segment else None
        got.append(hybrid.step(t, h_state, trace=env))
        want.append(ref.step(t, r_state))
        if per_segment:
            traces.append(env)
    return h_state, r_state, np.stack(got), np.stack(want), traces


def _check_whole_file(artifact, manifest, n_tokens, seed, backend, reference, per_segment,
                      min_top1, max_rel):
    """Against pure ONNX Runtime on the whole-model file the artifact was compiled from."""
    from rwkv2rknn.runtime.hybrid import HybridModel, resolve_backend
    from rwkv2rknn.runtime.reference import WholeFileModel
    chosen = resolve_backend(backend)
    ref = WholeFileModel(reference or str(manifest.model.get("source", "")), manifest.token_input,
                         manifest.logits_output, manifest.model["source_state"])
    hybrid = HybridModel(artifact, backend=chosen)
    if ref.vocab and ref.vocab != hybrid.vocab:
        raise BadInput("the reference file is not the model the artifact was compiled from",
                       "pass the right --reference FILE")
    h_state, r_state, got, want, traces = _steps(hybrid, ref, n_tokens, seed, per_segment)
    tol = max_rel if max_rel is not None else default_tolerance(chosen, str(manifest.model.get("source_dtype")))
    slots = {s.input: k for k, s in enumerate(hybrid.slots)}
    same = all(i in slots for i in r_state)  # state entries kept their names: compare them too
    rep: Report = compare_logits(
        got, want, min_top1=min_top1, max_rel=tol,
        state_got=np.stack([h_state[slots[i]] for i in r_state]) if same else None,
        state_ref=np.stack([np.asarray(v, np.float32).reshape(-1) for v in r_state.values()]) if same else None)
    if per_segment:
        rep.per_segment = _per_segment(artifact, hybrid, traces)
    hybrid.close()
    return rep, chosen


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
