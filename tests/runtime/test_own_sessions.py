"""--backend ort's load of a large artifact: one onnxruntime session per segment that owns and
prepacks its weights, a segment's T-row graph serving its token steps (one row) and its prompts alike; the
same numbers as the segments run one by one on sessions of their token graphs."""

import numpy as np
import pytest

from rwkv2rknn.artifact.plan import token_file_bytes
from rwkv2rknn.runtime.hybrid import HybridModel
from rwkv2rknn.runtime.rows import Columns, RowStep
from helpers.steps import assert_same_run, run_steps, spy_sessions, steps_then_prompt


@pytest.fixture(params=["4", "7"])
def plan_artifact(request, fp32_plan_artifact, slot_models):
    return fp32_plan_artifact if request.param == "4" else slot_models("7").plan_artifact


def _entry(opts, key):
    try:
        return opts.get_session_config_entry(key)
    except RuntimeError:  # not set
        return None


def test_one_session_a_segment_serves_token_steps_and_prompts(plan_artifact, tokens, monkeypatch):
    ref = HybridModel(plan_artifact, backend="ort", fuse=False, share_weights=False)
    made = spy_sessions(monkeypatch)
    model = HybridModel(plan_artifact, backend="ort", prepack=True)
    segs = model.manifest.segments
    # one session per segment, made at load, owning and prepacking its weights (no store)
    assert len(made) == len(segs) and all(m.prepack and not m.initializers for m in made)
    assert model._store is None and model._decode is None
    with_rows = [i for i, s in enumerate(segs) if s.seq.onnx]
    assert with_rows, "the fixture has T-row graphs"
    assert sorted(m.what for m in made) == sorted(s.name + ".seq" if s.seq.onnx else s.name for s in segs)
    assert model.execution().startswith(
        f"token steps: {len(segs)} segments, each one onnxruntime session that owns and prepacks "
        f"its weights ({len(with_rows)} on their T-row graph"
    )
    # sessions on the pool hand out small blocks; those on one thread have nothing to hand out
    for seg, runner in zip(segs, model.runners):
        runner = getattr(runner, "runner", runner)
        opts = getattr(runner, "runner", runner).session.get_session_options()
        pool = model.threads_for(seg) != 1
        assert opts.intra_op_num_threads == (0 if pool else 1)
        assert _entry(opts, "session.dynamic_block_base") == ("1" if pool else None)
    # token steps, then a prompt on the same sessions: no session more
    want, want_state = run_steps(ref, tokens[:10])
    got, state = steps_then_prompt(model, tokens[:10], 4)
    assert len(made) == len(segs)
    seq = model.prefill_runners()
    for i in with_rows:
        assert isinstance(model.runners[i], RowStep) and model.runners[i].runner is seq[i]
    assert_same_run(got, state, want, want_state, 2e-6)
    scale = float(np.abs(want).max())
    # a trace runs the same sessions segment by segment and keeps every tensor
    trace = {}
    traced = model.step(int(tokens[10]), state.copy(), trace=trace)
    np.testing.assert_allclose(traced, ref.step(int(tokens[10]), want_state), rtol=0, atol=2e-6 * scale)
    assert set(trace) >= {o for s in segs for o in s.outputs}
    model.close()
    ref.close()


def test_large_artifacts_load_own_sessions_small_ones_the_fused_step(fp32_plan_artifact, tokens, monkeypatch):
    from rwkv2rknn.runtime import hybrid

    small = HybridModel(fp32_plan_artifact, backend="ort")
    size = token_file_bytes(fp32_plan_artifact, small.manifest)
    assert 0 < size < hybrid.OWN_MIN_BYTES
    assert small._store is not None and small._decode is not None and not small._own
    monkeypatch.setattr(hybrid, "OWN_MIN_BYTES", size)
    large = HybridModel(fp32_plan_artifact, backend="ort")
    assert large._own and large._store is None and large._decode is None
    for m in (small, large):
        m.close()


def test_the_store_and_fused_steps_stay_a_choice(fp32_plan_artifact, tokens):
    store = HybridModel(fp32_plan_artifact, backend="ort", prepack=False)
    own = HybridModel(fp32_plan_artifact, backend="ort", prepack=True)
    assert store._store is not None and store._decode is not None and own._store is None
    np.testing.assert_allclose(
        run_steps(own, tokens[:6])[0], run_steps(store, tokens[:6])[0], rtol=0, atol=1e-5
    )
    # a caller that asks for segments on a shared store (the calibration, the back-test) keeps it
    apart = HybridModel(fp32_plan_artifact, backend="ort", fuse=False)
    assert apart._store is not None and not apart._own
    for m in (store, own, apart):
        m.close()


def test_a_columns_form_t_row_graph_serves_token_steps_too(fp16_artifact, tokens):
    """An artifact built for the NPU holds its T-row graphs in columns form: its onnxruntime
    session takes [C, T]; token steps give it one column."""
    own = HybridModel(fp16_artifact, backend="ort", prepack=True)
    ref = HybridModel(fp16_artifact, backend="ort", fuse=False, share_weights=False)
    seq = own.prefill_runners()
    columns = [i for i, r in enumerate(seq) if isinstance(r, Columns)]
    assert columns, "the fixture holds columns-form T-row graphs"
    for i in columns:
        assert own.runners[i].runner is seq[i]
    want, want_state = run_steps(ref, tokens[:8])
    assert_same_run(*steps_then_prompt(own, tokens[:8], 3), want, want_state, 1e-4)
    own.close()
    ref.close()


def test_the_bench_prefill_keeps_the_token_steps_sessions(fp32_plan_artifact, tokens):
    """bench closes the per-token sessions that prefill does not use; in own sessions the token
    steps' session is the T-row one, and stays."""
    from rwkv2rknn.tools.bench import _prefill

    model = HybridModel(fp32_plan_artifact, backend="ort", prepack=True)
    assert model.own_sessions
    res = _prefill(model, [1.0], 8, model.vocab, 0)
    assert res["tokens_per_s"] > 0
    state = model.init_state()
    assert np.isfinite(model.step(int(tokens[0]), state)).all()
    model.close()
