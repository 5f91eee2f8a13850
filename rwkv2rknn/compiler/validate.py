"""Translation validation: a compile proves the model it cut is the model it read.

::

    segments written to the temporary folder (after builds: the manifest as the runtime reads it)
        -> the hybrid on onnxruntime (fp32)  --+
                                               +-- same seeded tokens: token by token, and the
        -> the source files on onnxruntime   --+   same tokens as one chunk through the T-row
                                                   variants; logits and state compared
        -> within rounding: the figures go into the report (plan.json, the manifest)
        -> beyond it: find the first pass that made the graph differ (``first_bad_pass``: the
           graph passes run again on the whole model, each rewriting pass's graph exported and
           stepped on the same tokens) and refuse, in one line; nothing is written

Tolerances (``tolerances``): an fp32 source must agree to fp32 rounding (logits and final state
within 1e-4 of their scale, the gate `check --backend ort` uses for fp32 files). An fp16 source
runs in its own fp16 graph on onnxruntime while the compiled segments run in fp32, so the two
differ by fp16's rounding, accumulated over layers and tokens: measured on random models of
every version and the bundled model (8 tokens, 3 seeds each) the largest logits error was 5.3e-3
of the logit scale and the largest state drift 4.2e-3, on a 430M-shaped RWKV-4 see
docs/validation.md; the gate is 0.03 for both, and far below what a wrong rewrite makes (the
legacy GroupNorm fold: 0.31 on the model it was found on). fp16 rounding may flip the top token
where the reference's top two are close, so an fp16 source is gated on the errors, not on top-1
agreement (an fp32 source on both, near-ties left out as `check` does).

Memory: both sides run one session at a time, segment by segment over all the tokens (the
prefill path's own row-by-row order, ``HybridModel._chunk``), and the per-layer source stage by
stage, so the validation holds about one segment's and one stage's weights, not the model twice
(a one-file source is one session: its file). See docs/validation.md for its cost.
"""

from __future__ import annotations

import logging
import os
import time
from typing import List, Optional, Tuple

import numpy as np

from rwkv2rknn.compiler.ir import Context, export
from rwkv2rknn.errors import CompileRefused

log = logging.getLogger(__name__)

NAME = "validate"
# seeded tokens, token by token and as one chunk through the T-row variants (6: the cost stays
# under a tenth of a 430M compile; the source runs them once per token, fp16 files slowly)
TOKENS = 6
FP32_TOL = 1e-4  # logits and final state, relative to their scale: fp32 rounding
FP16_TOL = 0.03  # an fp16 source against the fp32 compiled model (measured: at most 5.3e-3)
# the passes that rewrite the graph, in pipeline order (the others analyse it, or cut it)
REWRITING = ("canonicalize", "recognize", "keep_fp32", "embed_norm", "state", "rank_one", "normalize_matmul")


def tolerances(source_dtype: str):
    """fp32 sources to fp32 rounding, fp16 sources within FP16_TOL, whatever the NPU's
    precision: validation runs the cut model in fp32 before the CPU token table is narrowed
    (compiler/embedding.py: int8 under w8a8 on purpose, after this check)."""
    from rwkv2rknn.tools.check import Tolerances

    tol = FP32_TOL if source_dtype == "float32" else FP16_TOL
    # seeded random ids: the logits and the state are gated to rounding (no KL or top-token
    # gate: a top-token flip is a logit error, which max_rel covers)
    return Tolerances(
        max_kl_mean=None, max_kl_p99=None, max_rel=tol, max_state_drift=tol, max_segment_rel=tol
    )


def validate(
    ctx: Context, tmp: str, toolkit: str, plan_only: bool, model_path: str, passes, make_manifest
) -> dict:
    """Compare the artifact in ``tmp`` (segments written; its manifest is written here) with its
    source. Returns the figures (also noted in ``ctx.report``); raises CompileRefused, naming the
    first pass that made the graph differ, when they differ beyond rounding. With
    ``ctx.options.verify_passes`` every rewriting pass's graph is compared too. ``passes``: the
    compiler's pass package, and ``make_manifest``, the driver's, handed in (imports run one way:
    only the driver imports the passes, and nothing imports the driver back)."""
    from rwkv2rknn import fileio
    from rwkv2rknn.artifact.plan import MANIFEST

    import resource

    t0, peak0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cpu0 = time.process_time()
    manifest = make_manifest(ctx, tmp, toolkit, plan_only)
    dtype = str(manifest.model.get("source_dtype"))
    fileio.write_json(os.path.join(tmp, MANIFEST), manifest.to_dict())
    tol = tolerances(dtype)
    seed = ctx.options.seed
    if not ctx.token_input or not ctx.logits_output:  # one graph, not a whole model
        return _validate_graph(ctx, tmp, manifest, tol, t0)
    rep = compare_with_source(tmp, ctx, _tokens(ctx), tol)
    result = {
        "tokens": TOKENS,
        "seed": seed,
        "source_dtype": dtype,
        "tolerance": tol.max_rel,
        "max_rel": _round(rep.max_rel),
        "state_drift": _round(rep.state_drift),
        "top1": rep.top1_agreement,
        "passed": rep.passed,
        "prefill_max_rel": _round(rep.prefill["max_rel"]) if rep.prefill else None,
        "prefill_state_drift": _round(rep.prefill.get("state_drift")) if rep.prefill else None,
    }
    by_pass = None
    if not rep.passed or ctx.options.verify_passes:
        try:
            by_pass = pass_errors(model_path, ctx, tol.max_rel, passes)
        except Exception as e:  # noqa: BLE001 - the refusal stands without the pass's name
            if rep.passed:
                raise
            log.warning("could not re-run the passes to find the one that differs (%s)", e)
            by_pass = None
        result["passes"] = [{"pass": name, "max_rel": _round(err)} for name, err in by_pass or ()]
    result["seconds"] = round(time.perf_counter() - t0, 2)
    result["cpu_seconds"] = round(time.process_time() - cpu0, 2)
    # the compile process's peak resident memory before and after (kB on Linux): what the
    # validation adds to the compile's own peak
    peak1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result["peak_rss_mib"] = {"before": round(peak0 / 1024), "after": round(peak1 / 1024)}
    if not rep.passed:
        raise CompileRefused(
            refusal(rep, by_pass, tol.max_rel, ctx.source),
            "nothing was written; this is a compiler fault: report it with the "
            "model (`compile --verify-passes` shows every pass's error)",
        )
    ctx.note(NAME, summary(result))
    if by_pass:
        ctx.note(
            NAME,
            "per pass (logits max rel error on the same tokens): "
            + ", ".join(f"{name} {_fmt(err)}" for name, err in by_pass),
        )
    return result


def _validate_graph(ctx: Context, tmp: str, manifest, tol, t0: float) -> dict:
    """A single ONNX graph that is not a whole model (no token and logits): the segments run
    one after another on seeded random inputs against the file on the same inputs, every
    output of the file compared by name (relative to its scale)."""
    from rwkv2rknn.runtime.ort import ORT_TYPES, OrtRunner, make_session

    sess, _ = make_session(ctx.source, 1, ctx.source, prepack=False)
    rng = np.random.default_rng(ctx.options.seed)
    made = {o for s in manifest.segments for o in s.outputs}
    feed, env = {}, {}
    for i in sess.get_inputs():
        shape = [d if isinstance(d, int) else 1 for d in i.shape]
        dtype = ORT_TYPES.get(i.type, np.float32)
        value = (
            rng.integers(0, 2, shape) if np.issubdtype(dtype, np.integer) else rng.standard_normal(shape)
        ).astype(dtype)
        feed[i.name] = value
    want = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))
    del sess
    for seg in manifest.segments:
        runner = OrtRunner(os.path.join(tmp, seg.token.onnx), seg.name)
        try:
            ins = {}
            for k in seg.inputs:
                src = env.get(k, feed.get(k))
                if src is None or k in made and k not in env:
                    raise CompileRefused(
                        f"compile refused: segment {seg.name} reads '{k}', which "
                        f"neither the file nor an earlier segment gives",
                        "nothing was written; this is a compiler fault: report it with the model",
                    )
                ins[k] = (
                    np.asarray(src)
                    .astype(runner.input_types.get(k, np.float32))
                    .reshape([d if isinstance(d, int) else 1 for d in runner.input_shapes[k]])
                )
            env.update(runner.infer(ins))
        finally:
            runner.close()
    worst, failures = 0.0, []
    for name, ref in want.items():
        if name not in env:
            continue
        ref = np.asarray(ref, np.float32).reshape(-1)
        got = np.asarray(env[name], np.float32).reshape(-1)
        err = (
            float("inf")
            if got.shape != ref.shape
            else float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30))
        )
        worst = max(worst, err)
        if not err <= tol.max_rel:
            failures.append(f"output '{name}': max rel error {err:.3g} > {tol.max_rel:g}")
    result = {
        "tokens": 0,
        "seed": ctx.options.seed,
        "source_dtype": str(manifest.model.get("source_dtype")),
        "tolerance": tol.max_rel,
        "max_rel": _round(worst),
        "state_drift": None,
        "top1": None,
        "passed": not failures,
        "prefill_max_rel": None,
        "prefill_state_drift": None,
        "outputs": sum(n in env for n in want),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if failures:
        raise CompileRefused(
            f"compile refused: the compiled graph is not the source graph "
            f"({'; '.join(failures[:2])}) on seeded random inputs",
            "nothing was written; this is a compiler fault: report it with the model",
        )
    ctx.note(
        NAME,
        f"the cut graph equals the source on onnxruntime: {result['outputs']} "
        f"output(s) on seeded random inputs, max rel error {_fmt(worst)} (tolerance "
        f"{tol.max_rel:g}; {result['seconds']:.1f} s)",
    )
    return result


class _Pool:
    """At most one live session among the lazy runners that share it."""

    def __init__(self):
        self.live = None

    def use(self, lazy) -> None:
        if self.live is not lazy:
            if self.live is not None:
                self.live.close()
            lazy.runner = lazy.make()
            self.live = lazy


class _Lazy:
    """A segment's onnxruntime runner whose session is made on its first call and closed when
    another runner of the same pool is called."""

    rows = ()  # onnxruntime takes any row count
    backend = "ort"

    def __init__(self, make, pool: _Pool, name: str):
        self.make, self.pool, self.name, self.runner = make, pool, name, None

    def infer(self, feed):
        if self.runner is None:
            self.pool.use(self)
        return self.runner.infer(feed)

    def close(self) -> None:
        if self.runner is not None:
            self.runner.close()
            self.runner = None


def _lazy_hybrid(artifact: str):
    """The artifact's HybridModel on onnxruntime with lazy runners (one session alive)."""
    from rwkv2rknn.runtime.hybrid import HybridModel
    from rwkv2rknn.runtime.ort import OrtRunner
    from rwkv2rknn.runtime.rows import Columns

    pool = _Pool()

    class Lazy(HybridModel):
        def _runner(self, seg):
            path = os.path.join(artifact, seg.token.onnx)
            return _Lazy(lambda: OrtRunner(path, seg.name, prepack=False), pool, seg.name)

        def _seq_runner(self, seg):
            if not seg.seq.onnx:
                return None
            path = os.path.join(artifact, seg.seq.onnx)
            lazy = _Lazy(lambda: OrtRunner(path, seg.name + ".seq", prepack=False), pool, seg.name + ".seq")
            if seg.seq.layout != "columns":
                return lazy
            lazy.inputs, lazy.outputs = list(seg.inputs), list(seg.outputs)
            return Columns(lazy)  # the columns step's file, as the NPU build takes it

    return Lazy(artifact, backend="ort", verify=False, fuse=False)  # one session at a time


def _segment_order_holds(hybrid) -> bool:
    """True if every segment reads its state from itself or an earlier segment: then the
    segments can run one after another over all the tokens (as prefill runs them row by row)."""
    made, slot_of = set(), {s.input: s for s in hybrid.slots}
    for seg in hybrid.manifest.segments:
        if any(k in slot_of and slot_of[k].output not in made | set(seg.outputs) for k in seg.inputs):
            return False
        made.update(seg.outputs)
    return True


def compare_with_source(artifact: str, ctx: Context, tokens: List[int], tol):
    """check's comparison (tools/check.py) of the artifact on onnxruntime with its source, run
    segment by segment and stage by stage: the logits token by token and the same tokens as one
    chunk through the T-row variants, and the state after them."""
    from rwkv2rknn.tools import check

    hybrid = _lazy_hybrid(artifact)
    try:
        if not _segment_order_holds(hybrid):  # token by token, every session alive
            hybrid.close()
            log.info("a segment reads state a later segment makes: validating token by token")
            rep, _ = check.run_check(
                artifact,
                n_tokens=len(tokens),
                seed=ctx.options.seed,
                backend="ort",
                prefill=True,
                random_ids=True,
                tolerances=tol,
            )
            return rep
        want, ref_state = _source_run(ctx, tokens, hybrid)
        state = hybrid.init_state()
        got = hybrid._chunk(tokens, state, [None] * len(hybrid.runners))  # token by token
        feed = check.Tokens(ids=list(tokens), source="seeded random ids")
        rep = check._compare(got, want, *_state_pair(hybrid, state, ref_state), tol, feed)
        seq = hybrid.prefill_runners()
        if seq is not None and len(tokens) > 1:
            state = hybrid.init_state()
            got = hybrid._chunk(tokens, state, seq)  # one chunk: the T-row variants
            rep.prefill = check._compare(
                got, want, *_state_pair(hybrid, state, ref_state), tol, feed
            ).to_dict()
            rep.failures += [f"prefill: {f}" for f in rep.prefill["failures"]]
        rep.passed = not rep.failures
        return rep
    finally:
        hybrid.close()


def _state_pair(hybrid, state, ref_state):
    """(the hybrid's state, the source's) as two flat arrays in one order."""
    from rwkv2rknn.models import rwkv4

    if isinstance(ref_state, np.ndarray):  # RWKV-4's rows: [layers, rows, C]
        got = hybrid.state_as_layers(state, list(rwkv4.STATE_ROWS))
        return got.reshape(-1), ref_state.astype(np.float32).reshape(-1)
    if callable(ref_state):  # a one-file source: check's own pairing
        return ref_state(state)
    got = hybrid.state_by_slot(state)
    if set(got) != set(ref_state):
        log.warning("the compiled state slots are not the source's by name: only the logits are compared")
        return None, None
    keys = sorted(ref_state)
    return (
        np.concatenate([got[k].reshape(-1) for k in keys]),
        np.concatenate([ref_state[k].reshape(-1).astype(np.float32) for k in keys]),
    )


def _source_run(ctx: Context, tokens, hybrid):
    """(logits [T, V], the state after the tokens) of the source on onnxruntime: a per-layer
    folder stage by stage (one session alive), a one-file model token by token."""
    from rwkv2rknn.runtime.reference import V_FIRST, WholeFileModel, stage_files
    from rwkv2rknn.runtime.ort import OrtRunner
    from rwkv2rknn.tools import check

    if not os.path.isdir(ctx.source):
        ref = WholeFileModel(
            ctx.source, ctx.token_input, ctx.logits_output, ctx.facts.get("source_state", ())
        )
        try:
            r_state = ref.init_state()
            want = np.stack([ref.step(int(t), r_state) for t in tokens])
        finally:
            ref.runner.close()
        views = check._state_views(hybrid, ref)
        return want, lambda h_state: views(h_state, r_state)
    embed_p, block_ps, head_p = stage_files(ctx.source)

    def run_stage(path, each):
        runner = OrtRunner(path, os.path.basename(path), prepack=False)
        try:
            return each(runner)
        finally:
            runner.close()

    xs = run_stage(embed_p, lambda r: [r.infer({"token": np.array([t], np.int32)})["output"] for t in tokens])
    carried = [{} for _ in tokens]
    rows, slots = [], {}
    for i, path in enumerate(block_ps):

        def block(b, i=i):
            rows_layout = b.inputs == ["input", "state_in"]
            names = ["state_in"] if rows_layout else [n for n in b.inputs if n not in ("input", V_FIRST)]
            st = {
                n: np.zeros(_state_dims(hybrid, i, n, b.input_shapes[n], rows_layout), b.input_types[n])
                for n in names
            }
            for t in range(len(tokens)):
                feed = {"input": xs[t], **carried[t], **st}
                out = b.infer({k: feed[k] for k in b.inputs})
                xs[t] = out["output"]
                if V_FIRST in out:
                    carried[t][V_FIRST] = out[V_FIRST]
                st = {n: out["state_out" if rows_layout else n + "_out"] for n in names}
            if rows_layout:
                rows.append(st["state_in"])
            else:
                slots.update(((i, n), v) for n, v in st.items())

        run_stage(path, block)
    want = run_stage(
        head_p,
        lambda r: np.stack([np.asarray(r.infer({"x": x})["output"], np.float32).reshape(-1) for x in xs]),
    )
    return want, (np.stack(rows) if rows else slots)


def _state_dims(hybrid, layer: int, name: str, dims, rows_layout: bool) -> list:
    """A source state input's shape: its file's, or where the file leaves a size symbolic, the
    compiled slot's (RWKV-4's [rows, C]: the rows the state pass unpacked)."""
    if all(isinstance(d, int) for d in dims):
        return list(dims)
    if rows_layout:
        return [sum(s.layer == layer for s in hybrid.slots), hybrid.width]
    slot = next(s for s in hybrid.slots if s.layer == layer and s.row == name)
    return list(slot.dims(hybrid.width))


def summary(r: dict) -> str:
    s = (
        f"the cut model equals the source on onnxruntime: {r['tokens']} seeded tokens, logits max "
        f"rel error {_fmt(r['max_rel'])}, state drift {_fmt(r['state_drift'])}"
    )
    if r.get("prefill_max_rel") is not None:
        s += (
            f"; as one chunk through the T-row variants {_fmt(r['prefill_max_rel'])}, state "
            f"{_fmt(r['prefill_state_drift'])}"
        )
    peak = r.get("peak_rss_mib") or {}
    return s + (
        f" (tolerance {r['tolerance']:g}, {r['source_dtype']} source; {r['seconds']:.1f} s, "
        f"{r['cpu_seconds']:.1f} s CPU; process peak {peak.get('before')} -> "
        f"{peak.get('after')} MiB)"
    )


def refusal(rep, passes: Optional[List[Tuple[str, float]]], tol: float, source: str) -> str:
    """The one line that says what differs and which pass first made it differ (``passes``
    None: the passes could not be re-run)."""
    what = "; ".join(rep.failures[:2])
    bad = next(((i, name, err) for i, (name, err) in enumerate(passes or ()) if not err <= tol), None)
    if passes is None:
        where = "the passes could not be re-run on the whole graph to name the one that differs"
    elif bad is not None:
        i, name, err = bad
        before = f"{_fmt(passes[i - 1][1])} after {passes[i - 1][0]}" if i else "the source"
        where = (
            f"pass {name} first made the graph differ (logits max rel error {_fmt(err)} after it, {before})"
        )
    elif (
        rep.prefill
        and rep.prefill.get("failures")
        and not [f for f in rep.failures if not f.startswith("prefill")]
    ):
        where = "the graph passes agree with the source; the T-row variants (pass sequence) differ"
    else:
        where = (
            "the graph passes agree with the source; the cut segments (passes partition, cut or build) differ"
        )
    return f"compile refused: the compiled model is not the source model ({what}); {where}"


def pass_errors(model_path: str, final: Context, tol: float, passes) -> List[Tuple[str, float]]:
    """[(pass, logits max rel error against the source)] for the graph after load and after each
    rewriting pass, the whole model loaded as one graph (the streaming compile's stage graphs
    are these passes on one stage each). A graph whose token, logits or state the passes have not
    named yet (a single file before recognize) is left out. ``passes``: the pass package."""
    load = passes.load
    tokens = _tokens(final)
    want = _reference_logits(final, tokens)
    ctx = load.run(model_path, final.options)
    out = []
    err = _graph_error(ctx, final, tokens, want)
    if err is not None:
        out.append((load.NAME, err))
    for p in passes.GRAPH_PIPELINE:
        if p.NAME not in REWRITING:
            break
        p.run(ctx)
        err = _graph_error(ctx, final, tokens, want)
        if err is not None:
            out.append((p.NAME, err))
            if not err <= tol and not final.options.verify_passes:
                break  # the first one is what the message needs
    return out


def _tokens(ctx: Context) -> List[int]:
    """The seeded tokens run_check draws for an artifact on onnxruntime."""
    vocab = int(ctx.shape.get("vocab") or 0)
    return [int(t) for t in np.random.default_rng(ctx.options.seed).integers(0, vocab, TOKENS)]


def _reference_logits(ctx: Context, tokens) -> np.ndarray:
    from rwkv2rknn.runtime.reference import PerLayerModel, WholeFileModel

    if os.path.isdir(ctx.source):
        ref = PerLayerModel(ctx.source)
    else:
        ref = WholeFileModel(
            ctx.source, ctx.token_input, ctx.logits_output, ctx.facts.get("source_state", ())
        )
    return ref.logits(tokens)


def _graph_error(ctx: Context, final: Context, tokens, want) -> Optional[float]:
    """The largest logits error (relative to each step's scale) of ``ctx.graph`` stepped on
    ``tokens`` on onnxruntime in its own dtypes, or None if it cannot be stepped yet."""
    from rwkv2rknn.runtime.ort import make_session

    model = export(ctx.graph)
    ins = {i.name: i for i in model.graph.input}
    outs = [o.name for o in model.graph.output]
    token = next((n for n in (ctx.token_input, final.token_input) if n in ins), None)
    logits = next((n for n in (ctx.logits_output, final.logits_output) if n in outs), None)
    if token is None or logits is None:
        return None
    pairs = [(s.input, s.output, float(s.init)) for s in ctx.state]
    pairs += [(i, o, 0.0) for i, o in ctx.whole_state.values()]
    if not pairs:
        pairs = [(str(i), str(o), float(v)) for i, o, v in final.facts.get("source_state", ())]
    pairs = [p for p in pairs if p[0] in ins and p[1] in outs]
    try:
        sess, _ = make_session(model.SerializeToString(), 1, "the graph after a pass", prepack=False)
    except Exception as e:  # noqa: BLE001 - a graph onnxruntime cannot load differs from the source
        log.info("the graph cannot be loaded (%s)", e)
        return float("inf")
    types = {i.name: i.type for i in sess.get_inputs()}
    shapes = {i.name: [d if isinstance(d, int) else 1 for d in i.shape] for i in sess.get_inputs()}
    from rwkv2rknn.runtime.ort import ORT_TYPES

    feed = {n: np.zeros(shapes[n], ORT_TYPES.get(types[n], np.float32)) for n in ins if n != token}
    for i, _, v in pairs:
        feed[i] = np.full(shapes[i], v, ORT_TYPES.get(types[i], np.float32))
    worst = 0.0
    for t, ref in zip(tokens, want):
        feed[token] = np.full(shapes[token], t, ORT_TYPES.get(types[token], np.int64))
        got = dict(zip(outs, sess.run(outs, feed)))
        for i, o, _ in pairs:
            feed[i] = got[o].reshape(shapes[i]).astype(feed[i].dtype)
        y = np.asarray(got[logits], np.float32).reshape(-1)
        if y.shape != ref.shape or not np.isfinite(y).all():
            return float("inf")
        worst = max(worst, float(np.abs(y - ref).max() / max(np.abs(ref).max(), 1e-30)))
    return worst


def _round(x):
    return None if x is None else float(f"{float(x):.3g}")


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.2g}"
