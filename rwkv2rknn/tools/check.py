"""`rwkv2rknn check`: the hybrid executor against pure ONNX Runtime on the same seeded tokens
(on the per-layer files the artifact was compiled from, or on its whole-model file).

Four gates, each with a stated tolerance (``Tolerances``), each able to fail the check:

- decode: token by token, the logits (top-1 agreement over the decisive tokens, max relative
  error over all) and the state at the end (drift relative to the state's scale) against the
  reference;
- prefill: the same tokens fed in chunks through the T-row variants, the path `run` takes for
  every prompt: logits and final state against the same reference;
- per segment (``--per-segment``): every NPU segment's runner fed the hybrid run's own inputs,
  against that segment's ONNX on onnxruntime; and every T-row variant, fed the same rows at once,
  against the per-token ONNX row by row (a T-row variant must compute what the token step does).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

from rwkv2rknn.tools.compare import Report, compare_logits, rel_error
from rwkv2rknn.errors import BadInput

log = logging.getLogger(__name__)
CHECK_JSON = "check.json"  # the last check's report, saved into the artifact


@dataclass(frozen=True)
class Tolerances:
    min_top1: float = 0.99
    max_rel: float = 0.05  # logits: max |got - ref| / max |ref| per step
    max_state_drift: float = 0.05  # state after the last token: max |got - ref| / max |ref|
    max_segment_rel: float = 0.02  # one NPU segment (or T-row variant) against its ONNX
    # a token whose reference top-1/top-2 gap is at most this x its logit scale is a near-tie,
    # left out of the top-1 gate (compare_logits); 2 x max_rel: a gap logits within it can close
    tie_margin: float = 0.1

    @classmethod
    def default(cls, backend: str, source_dtype: str, min_top1: Optional[float] = None,
                max_rel: Optional[float] = None, precision: str = "fp16") -> "Tolerances":
        """fp32 files on onnxruntime must agree to rounding; anything through fp16 (the files or
        the NPU) within fp16's error, accumulated over the tokens; w8a8 NPU segments within what
        the bundled model measured on text (top-1 91-92%, logits 0.08-0.10, state 0.11-0.23,
        one segment 0.17 on held-out rows), with a margin. Top-1 leaves out near-ties (a gap of
        at most 2 x max_rel of the logit scale) except for w8a8, whose 85% counts every token of
        text, as measured."""
        exact = backend == "ort" and source_dtype == "float32"
        int8 = backend != "ort" and precision == "w8a8"
        top1, rel = (0.85, 0.25) if int8 else (0.99, 1e-4 if exact else 0.05)
        rel = rel if max_rel is None else max_rel
        return cls(min_top1=top1 if min_top1 is None else min_top1, max_rel=rel,
                   tie_margin=0.0 if int8 else 2 * rel,
                   max_state_drift=0.5 if int8 else (1e-4 if exact else 0.05),
                   max_segment_rel=1e-5 if backend == "ort" else (0.3 if int8 else 0.02))


def artifact_precision(manifest) -> str:
    """The least precise build among the NPU segments: w8a8, w16a16i or fp16."""
    used = {p for s in manifest.segments if s.backend == "npu" for p in (s.precision, s.seq_precision)}
    return next((p for p in ("w8a8", "w16a16i") if p in used), "fp16")


def run_check(artifact: str, n_tokens: int = 32, seed: int = 0, backend: str = "auto",
              reference: Optional[str] = None, per_segment: bool = False,
              min_top1: Optional[float] = None, max_rel: Optional[float] = None, prefill: bool = True,
              text: Optional[str] = None, tolerances: Optional[Tolerances] = None):
    """Teacher-force ``n_tokens`` seeded random ids (or the tokens of ``text``; by default the
    built-in English sample for an artifact with w8a8 segments: random ids leave the int8 ranges
    calibrated on text) through the artifact and pure onnxruntime and compare them.
    ``tolerances`` replaces the backend's default ones (the compiler's own validation)."""
    from rwkv2rknn.runtime.hybrid import HybridModel, load_manifest, resolve_backend

    manifest = load_manifest(artifact)
    if not manifest.token_input or not manifest.logits_output:
        raise BadInput(f"'{artifact}' was compiled from a single ONNX graph, not a whole model",
                       "compile a whole model (a per-layer folder or one file with token, state "
                       "and logits) to check it")
    if per_segment and manifest.packed:
        raise BadInput(f"'{artifact}' is packed: --per-segment compares NPU segments with their "
                       f"ONNX, which packing leaves out", "run it on the artifact it was packed from")
    chosen = resolve_backend(backend)
    if manifest.model.get("source_state"):  # compiled from a whole-model file
        from rwkv2rknn.runtime.reference import WholeFileModel
        ref = WholeFileModel(reference or str(manifest.model.get("source", "")), manifest.token_input,
                             manifest.logits_output, manifest.model["source_state"])
        hybrid = HybridModel(artifact, backend=chosen)
        if ref.vocab and ref.vocab != hybrid.vocab:
            raise BadInput("the reference file is not the model the artifact was compiled from",
                           "pass the right --reference FILE")
    else:
        ref, hybrid = _per_layer_reference(artifact, manifest, reference, chosen)
    states = _state_views(hybrid, ref)
    precision = artifact_precision(manifest) if chosen != "ort" else "fp32 (ort)"
    tol = tolerances or Tolerances.default(chosen, str(manifest.model.get("source_dtype")), min_top1,
                                           max_rel, precision)
    tokens = _tokens(manifest, chosen, n_tokens, seed, text)
    try:
        h_state, r_state = hybrid.init_state(), ref.init_state()
        got, want, traces = [], [], []
        for t in tokens:
            env = {} if per_segment else None
            got.append(hybrid.step(t, h_state, trace=env))
            want.append(ref.step(t, r_state))
            traces.append(env)
        want = np.stack(want)
        rep = _compare(np.stack(got), want, *states(h_state, r_state), tol)
        rep.tolerance["precision"] = precision
        if prefill and len(tokens) > 1 and hybrid.prepare_prefill():
            p_state = hybrid.init_state()
            rep.prefill = _compare(hybrid.prefill(tokens, p_state), want, *states(p_state, r_state),
                                   tol).to_dict()
            rep.failures += [f"prefill: {f}" for f in rep.prefill["failures"]]
        if per_segment:
            rep.per_segment = _per_segment(artifact, hybrid, traces, manifest.state)
            rep.tolerance["max_segment_rel"] = tol.max_segment_rel
            rep.failures += [f"segment {s['segment']}{' (T rows)' if s['rows'] else ''}: max rel error "
                             f"{s['max_rel']:.3g} > {tol.max_segment_rel:g}"
                             for s in rep.per_segment if not s["max_rel"] <= tol.max_segment_rel]
        rep.passed = not rep.failures
    finally:
        hybrid.close()
    return rep, chosen


def _per_layer_reference(artifact, manifest, reference, backend):
    """(pure onnxruntime over the per-layer files the artifact was compiled from, the hybrid)."""
    from rwkv2rknn.runtime.hybrid import HybridModel
    from rwkv2rknn.runtime.reference import PerLayerModel
    ref_dir = reference or str(manifest.model.get("source", ""))
    if not ref_dir or not os.path.isdir(ref_dir):
        raise BadInput(f"the per-layer files the artifact was compiled from are not at '{ref_dir}'",
                       "pass --reference FOLDER")
    hybrid = HybridModel(artifact, backend=backend)
    ref = PerLayerModel(ref_dir)
    if ref.vocab != hybrid.vocab or ref.layers != manifest.layers or ref.width != hybrid.width:
        raise BadInput(f"reference '{ref_dir}' is not the model the artifact was compiled from",
                       "pass the right --reference FOLDER")
    return ref, hybrid


def _state_views(hybrid, ref):
    """A function (hybrid state, reference state) -> (the two as comparable arrays), or
    (None, None) where the reference's state entries have no counterpart by name (then only
    the logits are compared)."""
    from rwkv2rknn.models import rwkv4
    from rwkv2rknn.runtime.reference import PerLayerModel
    if isinstance(ref, PerLayerModel):
        return lambda h, r: _states(hybrid, h, ref, r)
    slots = {s.input: k for k, s in enumerate(hybrid.slots)}
    # an entry kept its name, or a [rows, C] entry was unpacked into rows named NAME.ROW
    parts = {i: [slots[i]] if i in slots else [slots.get(f"{i}.{row}") for row in rwkv4.STATE_ROWS]
             for i, _, _ in ref.pairs}
    if any(None in ks for ks in parts.values()):
        return lambda h, r: (None, None)
    return lambda h, r: (np.concatenate([hybrid.slot_views(h)[k].reshape(-1)
                                         for ks in parts.values() for k in ks]),
                         np.concatenate([np.asarray(r[i], np.float32).reshape(-1) for i in parts]))


def _tokens(manifest, backend: str, n: int, seed: int, text: Optional[str]):
    from rwkv2rknn.rknn.calibrate import BUILTIN_TEXT
    from rwkv2rknn.runtime.tokenizer import load_tokenizer
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


def save_report(artifact: str, rep: Report, backend: str, n_tokens: int, seed: int) -> Optional[str]:
    """Write the report to ARTIFACT/check.json (atomically) for `rwkv2rknn report`; the path, or
    None (logged) where the artifact cannot be written, which does not fail the check."""
    from rwkv2rknn.fileio import write_json
    from rwkv2rknn.artifact.plan import MANIFEST, sha256_file
    path = os.path.join(artifact, CHECK_JSON)
    data = {"backend": backend, "tokens": n_tokens, "seed": seed,
            "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "manifest_sha256": sha256_file(os.path.join(artifact, MANIFEST)), **rep.to_dict()}
    try:
        write_json(path, data)
    except OSError as e:
        log.warning("could not save the check report to %s (%s)", path, e.strerror or e)
        return None
    return path


def _states(hybrid, h_state, ref, r_state):
    """(hybrid state, reference state) in one order: the reference's rows [layers, rows, C]
    (RWKV-4), or its named slots (RWKV-5.2/6/7) one after another."""
    from rwkv2rknn.models import rwkv4
    if ref.rows_layout:
        return hybrid.state_as_layers(h_state, list(rwkv4.STATE_ROWS)), r_state.astype(np.float32)
    got, want = hybrid.state_by_slot(h_state), ref.state_by_slot(r_state)
    if set(got) != set(want):
        raise BadInput("the artifact's state slots are not the reference's",
                       "pass the right --reference FOLDER")
    keys = sorted(want)
    return (np.concatenate([got[k].reshape(-1) for k in keys]),
            np.concatenate([want[k].reshape(-1).astype(np.float32) for k in keys]))


def _compare(got, want, state_got, state_ref, tol: Tolerances) -> Report:
    return compare_logits(got, want, min_top1=tol.min_top1, max_rel=tol.max_rel,
                          state_got=state_got, state_ref=state_ref,
                          max_state_drift=tol.max_state_drift, tie_margin=tol.tie_margin)


def _per_segment(artifact, hybrid, traces, slots):
    """Each NPU segment fed the hybrid run's own inputs, against its ONNX on onnxruntime; each
    T-row variant fed those inputs as rows, against the per-token ONNX row by row."""
    from rwkv2rknn.runtime.ort import OrtRunner
    slot_inputs = {s.input for s in slots}
    seq = hybrid.prefill_runners() or [None] * len(hybrid.runners)
    out = []
    for seg, runner, seq_runner in zip(hybrid.manifest.segments, hybrid.runners, seq):
        if seg.backend != "npu":
            continue
        ref = OrtRunner(os.path.join(artifact, seg.onnx), seg.name)
        feeds = [{k: env[k] for k in seg.inputs} for env in traces]
        want = [ref.infer(f) for f in feeds]
        worst = max((rel_error(runner.infer(f)[k], w[k]) for f, w in zip(feeds, want)
                     for k in seg.outputs), default=0.0)
        out.append({"segment": seg.name, "backend": runner.backend, "rows": 0, "max_rel": worst})
        if seq_runner is not None:
            n = min(len(feeds), max(getattr(seq_runner, "rows", ()) or (len(feeds),)))
            t = min((r for r in getattr(seq_runner, "rows", ()) if r >= n), default=n)
            feed = {k: (feeds[0][k] if k in slot_inputs else _rows(feeds[:n], k, t)) for k in seg.inputs}
            got = seq_runner.infer(feed)
            worst = max((rel_error(np.asarray(got[k], np.float32).reshape(t, -1)[i], want[i][k])
                         for i in range(n) for k in seg.outputs), default=0.0)
            out.append({"segment": seg.name, "backend": seq_runner.backend, "rows": t, "max_rel": worst})
        ref.close()
    return out


def _rows(feeds, name: str, t: int) -> np.ndarray:
    """Input ``name`` of consecutive token steps as rows, zero rows after them up to ``t``."""
    rows = np.stack([np.asarray(f[name], np.float32).reshape(-1) for f in feeds])
    return np.concatenate([rows, np.zeros((t - len(rows), rows.shape[1]), np.float32)])
