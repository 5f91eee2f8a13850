"""The ort backend's load: one copy of the weights shared by every session, token steps in one
fused graph on bound buffers; the same numbers as the segments run one by one on their own."""

import os
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from rwkv2rknn.runtime import onnxwire
from rwkv2rknn.runtime.hybrid import LOADED_THREADS, HybridModel
from rwkv2rknn.runtime.ortshare import (
    MIN_SHARED,
    AdaptiveStep,
    FusionError,
    WeightStore,
    fuse,
    runnable_others,
    session_from_stub,
    usable_cores,
)
from rwkv2rknn.tools.busy import BusyLoops
from helpers.steps import assert_same_run, run_steps, spy_sessions, steps_then_prompt


@pytest.fixture(params=["4", "7"])
def plan_artifact(request, fp32_plan_artifact, slot_models):
    return fp32_plan_artifact if request.param == "4" else slot_models("7").plan_artifact


@pytest.mark.slow
def test_fused_token_steps_equal_the_segments_one_by_one(plan_artifact, tokens):
    fused = HybridModel(plan_artifact, backend="ort", prepack=False)
    apart = HybridModel(plan_artifact, backend="ort", fuse=False)
    assert fused.execution().startswith(
        f"token steps: {len(fused.manifest.segments)} segments fused into 1 onnxruntime graph"
    )
    got, got_state = run_steps(fused, tokens[:12])
    want, want_state = run_steps(apart, tokens[:12])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got_state, want_state, rtol=0, atol=1e-6)
    # four fused sessions: three for a quiet machine (one thread, a pool, a pool of small blocks),
    # one for a busy one (more threads than cores, small blocks); those that ran gave these numbers
    cores = usable_cores()
    loaded = f"{LOADED_THREADS * cores} threads, small blocks"
    counts = fused._decode.count
    assert set(counts) == {"1 thread", "pool", "pool, small blocks", loaded}
    assert sum(counts.values()) == 12 and max(counts.values()) >= 2
    opts = {k: s.session.get_session_options() for k, s in fused._decode.steps.items()}
    assert opts["pool, small blocks"].get_session_config_entry("session.dynamic_block_base") == "1"
    assert opts[loaded].get_session_config_entry("session.dynamic_block_base") == "1"
    assert opts["1 thread"].intra_op_num_threads == 1 and opts["pool"].intra_op_num_threads == 0
    assert opts[loaded].intra_op_num_threads == LOADED_THREADS * cores > cores
    assert all(o.get_session_config_entry("session.intra_op.allow_spinning") == "0" for o in opts.values())
    # the segments' own sessions were never made for token steps
    assert not any(r.loaded for r in fused.runners)
    # a trace runs the segments one by one and agrees with the fused step
    trace = {}
    s1, s2 = fused.init_state(), fused.init_state()
    a = fused.step(tokens[0], s1, trace=trace)
    b = fused.step(tokens[0], s2)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    assert fused.manifest.logits_output in trace
    # prefill (T-row sessions on the shared weights) agrees with the per-segment model's
    np.testing.assert_allclose(
        fused.prefill(tokens[:20], fused.init_state()),
        apart.prefill(tokens[:20], apart.init_state()),
        rtol=0,
        atol=1e-6,
    )
    fused.close()
    apart.close()


def test_a_new_state_buffer_is_bound_again(fp32_plan_artifact, tokens):
    model = HybridModel(fp32_plan_artifact, backend="ort", prepack=False)
    ref = HybridModel(fp32_plan_artifact, backend="ort", fuse=False)
    for _ in range(2):  # two buffers, one after the other, then the first again
        s, r = model.init_state(), ref.init_state()
        for t in tokens[:3]:
            np.testing.assert_allclose(model.step(t, s), ref.step(t, r), rtol=0, atol=1e-6)
        np.testing.assert_allclose(s, r, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_shared_weights_equal_own_weights_and_are_held_once(plan_artifact, tokens):
    own = HybridModel(plan_artifact, backend="ort", fuse=False, share_weights=False)
    shared = HybridModel(plan_artifact, backend="ort", fuse=False)
    want, _ = run_steps(own, tokens[:6])
    got, _ = run_steps(shared, tokens[:6])
    # the same weights; sessions that prepack them sum in another order: 1e-6 of the logits' scale
    scale = float(np.abs(want).max())
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * scale)
    held = shared._store.nbytes
    # every large initializer of every per-token segment file, once
    big = {}
    for seg in shared.manifest.segments:
        for t in onnx.load(os.path.join(plan_artifact, seg.token.onnx)).graph.initializer:
            if int(np.prod(t.dims)) >= MIN_SHARED:
                big[t.name] = int(np.prod(t.dims)) * 4
    assert held == sum(big.values()) > 0
    # prefill loads the T-row sessions: same numbers, not one byte more held
    np.testing.assert_allclose(
        shared.prefill(tokens[:20], shared.init_state()),
        own.prefill(tokens[:20], own.init_state()),
        rtol=0,
        atol=1e-6 * scale,
    )
    assert shared._store.nbytes == held and shared._store.conflicts == 0
    assert any(r is not None for r in shared._seq)


# ---------------------------------------------------------------------- the wire format


def _model(nodes, inputs, outputs, inits, opset=17):
    g = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _vi(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def test_a_runner_on_a_store_keeps_the_store_alive(slot_models):
    """onnxruntime reads a store's arrays where they are: a runner made on a store nobody else
    holds still reads them (freed, it read whatever the heap held next)."""
    import gc
    import weakref

    from rwkv2rknn.runtime.ort import OrtRunner

    art = slot_models("7").plan_artifact
    model = HybridModel(art, backend="ort", prepack=False)
    seg = next(s for s in model.manifest.segments if s.seq.onnx)
    path = os.path.join(art, seg.seq.onnx)
    store = WeightStore()
    ref = weakref.ref(store)
    runner = OrtRunner(path, "seq", 1, store)
    assert store.nbytes > 0
    del store
    gc.collect()
    assert ref() is not None
    rng = np.random.default_rng(0)
    feed = {
        k: rng.standard_normal([d if isinstance(d, int) else 2 for d in shape]).astype(np.float32)
        for k, shape in runner.input_shapes.items()
    }
    own = OrtRunner(path, "own", 1)
    for k, v in own.infer(feed).items():
        np.testing.assert_allclose(runner.infer(feed)[k], v, rtol=1e-5, atol=1e-5)
    runner.close()
    gc.collect()
    assert ref() is None
    model.close()


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int64])
def test_tensors_read_as_onnx_reads_them(dtype):
    arr = (np.arange(24).reshape(2, 3, 4) * 0.5).astype(dtype)
    t = numpy_helper.from_array(arr, "w")
    got = onnxwire.Tensor(t.SerializeToString())
    assert got.name == "w" and got.dims == [2, 3, 4]
    np.testing.assert_array_equal(got.array(), arr)
    # float_data (not raw) too
    t2 = helper.make_tensor("f", TensorProto.FLOAT, [3], [1.5, 2.5, -1.0])
    np.testing.assert_array_equal(
        onnxwire.Tensor(t2.SerializeToString()).array(), np.array([1.5, 2.5, -1.0], np.float32)
    )
    # a stub: no data, external at the placeholder, same name and shape
    stub = onnx.TensorProto()
    stub.ParseFromString(got.stub("x.bin"))
    assert (stub.name, list(stub.dims), stub.raw_data) == ("w", [2, 3, 4], b"")
    assert stub.data_location == TensorProto.EXTERNAL and stub.external_data[0].value == "x.bin"


def test_fuse_runs_graphs_in_sequence_on_shared_weights(tmp_path):
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((64, 128)).astype(np.float32)
    w2 = rng.standard_normal((128, 64)).astype(np.float32)
    b = np.full((64,), 0.5, np.float32)  # small: stays in the graph
    m1 = _model(
        [helper.make_node("MatMul", ["x", "w1"], ["h"])],
        [_vi("x", [1, 64])],
        [_vi("h", [1, 128])],
        [numpy_helper.from_array(w1, "w1")],
    )
    m2 = _model(
        [
            helper.make_node("MatMul", ["h", "w2"], ["y0"]),
            helper.make_node("Add", ["y0", "b"], ["y"]),
            helper.make_node("Add", ["x", "b"], ["z"]),
        ],
        [_vi("h", [1, 128]), _vi("x", [1, 64])],
        [_vi("y", [1, 64]), _vi("z", [1, 64])],
        [numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(b, "b")],
        opset=13,
    )
    paths = []
    for i, m in enumerate((m1, m2)):
        paths.append(str(tmp_path / f"m{i}.onnx"))
        onnx.save(m, paths[-1])
    store = WeightStore()
    stubs, names = zip(*(store.strip(p) for p in paths))
    assert sorted(store.arrays) == ["w1", "w2"] and len(stubs[0]) < 1000
    fused = fuse(stubs, {"y", "z"})
    check = onnx.load_from_string(fused)
    assert [i.name for i in check.graph.input] == ["x"]
    assert [o.name for o in check.graph.output] == ["y", "z"]
    assert check.opset_import[0].version == 17
    sess, _ = session_from_stub(fused, names[0] + names[1], store, "fused", 1)
    x = rng.standard_normal((1, 64)).astype(np.float32)
    y, z = sess.run(["y", "z"], {"x": x})
    np.testing.assert_allclose(y, x @ w1 @ w2 + b, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(z, x + b, rtol=0, atol=0)
    # a tensor made twice cannot be fused
    with pytest.raises(FusionError, match="made twice"):
        fuse([stubs[0], stubs[0]], {"h"})


class Fixed:
    """A token step that counts its calls and takes ``ms`` (AdaptiveStep's choices, without
    onnxruntime); ``slow``: a set of call numbers that take ``slow_ms`` instead."""

    def __init__(self, ms: float = 0.0, slow=(), slow_ms: float = 0.0):
        self.calls, self.ms, self.slow, self.slow_ms = 0, ms, set(slow), slow_ms

    def step(self, token, flat):
        self.calls += 1
        ms = self.slow_ms if self.calls in self.slow else self.ms
        if ms:
            time.sleep(ms / 1000)
        return np.zeros(3, np.float32)


def test_adaptive_step_tries_each_then_keeps_measuring():
    a, b = Fixed(), Fixed()
    chooser = AdaptiveStep({"1 thread": a, "pool": b}, warmup=2, explore=4)
    for t in range(40):
        chooser.step(t, np.zeros(1, np.float32))
    assert a.calls + b.calls == 40 and min(a.calls, b.calls) >= 2 + 40 // 4 // 2 - 1
    assert chooser.chosen in ("1 thread", "pool") and "steps" in chooser.describe()


def _watching(readings, one, pool, loaded, **kw) -> AdaptiveStep:
    """Ways '1 thread' and 'pool', the loaded '4 threads', on 2 cores, the runnable tasks outside
    read from ``readings`` before every step."""
    return AdaptiveStep(
        {"1 thread": one, "pool": pool},
        loaded={"4 threads": loaded},
        cores=2,
        probe=lambda: next(readings),
        probe_every=0,
        **kw,
    )


def test_adaptive_step_runs_the_loaded_ways_while_the_cores_are_taken():
    # runnable tasks besides the stepping thread, as read before each step: quiet, then 4 busy
    # loops on 2 cores, then quiet again
    readings = iter([0] * 10 + [4] * 20 + [0] * 20)
    # the loaded way is the fastest while the cores are taken (its time there), the quiet ones
    # take longer
    quiet, pool, busy = Fixed(3), Fixed(3), Fixed()
    chooser = _watching(readings, quiet, pool, busy)
    modes = []
    for t in range(50):
        chooser.step(t, np.zeros(1, np.float32))
        modes.append(chooser.busy)
    assert modes[:10] == [False] * 10 and busy.calls >= 12
    # the moving average crosses the core count within a few steps, then stays till the load goes
    assert modes.index(True) in range(10, 14) and all(modes[14:30])
    assert not any(modes[36:]) and chooser.switches == 2 and chooser.chosen in ("1 thread", "pool")
    assert quiet.calls + pool.calls + busy.calls == 50 and "quiet machine, 2 switches" in chooser.describe()


def test_under_load_the_quiet_ways_compete_on_their_loaded_times():
    """While the cores are taken, a quiet way that measures faster there than the loaded way
    runs the steps; its quiet time does not count for the loaded state, nor the other way."""
    readings = iter([0] * 8 + [4] * 40)
    one, pool, loaded = Fixed(1), Fixed(0), Fixed(4)
    chooser = _watching(readings, one, pool, loaded, explore=8)
    for t in range(48):
        chooser.step(t, np.zeros(1, np.float32))
    assert chooser.busy and chooser.chosen == "pool"
    assert loaded.calls >= 2 and pool.calls > one.calls + loaded.calls
    assert chooser.median_ms("4 threads", busy=False) is None
    assert chooser.median_ms("pool", busy=True) < chooser.median_ms("4 threads", busy=True)
    assert "ms median busy" in chooser.describe()


def test_one_slow_step_does_not_move_the_choice():
    """A way with one step 50x its usual time (another job's burst) stays the choice: the
    choice goes by the median of the last steps."""
    fast, other = Fixed(1, slow={12}, slow_ms=50), Fixed(3)
    chooser = AdaptiveStep({"pool": fast, "1 thread": other}, explore=100)
    for t in range(14):
        chooser.step(t, np.zeros(1, np.float32))
    assert fast.calls >= 12 and chooser.chosen == "pool"


@pytest.mark.slow
def test_token_steps_switch_to_the_loaded_pool_when_busy_loops_start(fp32_plan_artifact, tokens):
    """Real busy processes beside a real model: once they run, the token steps count them among
    the runnable tasks and time the pool of more threads than cores among their ways; the numbers
    stay the same."""
    cores = usable_cores()
    if cores < 2:
        pytest.skip("one core: token steps run on one thread whatever the load")
    model = HybridModel(fp32_plan_artifact, backend="ort", prepack=False)
    apart = HybridModel(fp32_plan_artifact, backend="ort", fuse=False)
    s, r = model.init_state(), apart.init_state()
    for t in tokens[:3]:
        model.step(t, s), apart.step(t, r)
    decode = model._decode
    loaded = f"{LOADED_THREADS * cores} threads, small blocks"
    before = decode.count[loaded]
    with BusyLoops(2 * cores):
        for t in tokens[3:15]:
            time.sleep(decode.probe_every)  # the load is read at most this often
            np.testing.assert_allclose(model.step(t, s), apart.step(t, r), rtol=0, atol=1e-6)
        assert runnable_others() >= 2 * cores  # the loops, seen from outside them
        assert decode.busy and decode.count[loaded] > before and decode.median_ms(loaded) is not None
        assert "busy machine" in model.execution()
    model.close()
    apart.close()


@pytest.mark.slow
def test_an_fp16_token_table_before_fp32_layernorms_fuses(fp16_artifact, tokens):
    """A built compile of fp16 files keeps its CPU token table in fp16, widened by a Cast right
    in front of the first LayerNorm (the bundled model is such an artifact): onnxruntime's
    level-1 LayerNorm fusion took the Cast's fp16 input into a LayerNormalization with fp32
    weights and refused the joined graph; without that one fusion it fuses, with the same numbers."""
    m = HybridModel(fp16_artifact, backend="ort", prepack=False)
    embed = next(s for s in m.manifest.segments if s.backend == "cpu" and "embed" in s.stages)
    g = onnx.load(os.path.join(fp16_artifact, embed.token.onnx)).graph
    assert any(t.data_type == TensorProto.FLOAT16 for t in g.initializer)  # the table: fp16
    assert "Cast" in [n.op_type for n in g.node]
    assert m.execution().startswith(f"token steps: {len(m.manifest.segments)} segments fused into 1")
    apart = HybridModel(fp16_artifact, backend="ort", fuse=False)
    got, got_state = run_steps(m, tokens[:6])
    want, want_state = run_steps(apart, tokens[:6])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    np.testing.assert_allclose(got_state, want_state, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------- one copy of the weights


def test_weights_are_copied_and_compared_block_by_block(tmp_path, monkeypatch):
    from rwkv2rknn.runtime import ortshare

    monkeypatch.setattr(ortshare, "BLOCK_BYTES", 1000)  # blocks that do not divide the tensors
    rng = np.random.default_rng(3)
    w = rng.standard_normal((64, 129)).astype(np.float32)
    h = rng.standard_normal((96, 80)).astype(np.float16)
    changed = w.copy()
    changed[-1, -1] += 1  # in the last block only
    paths = {}
    for name, (a, b) in {"first": (w, h), "same": (w, h), "changed": (changed, h)}.items():
        m = _model(
            [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Identity", ["h"], ["z"])],
            [_vi("x", [1, 64])],
            [_vi("y", [1, 129]), helper.make_tensor_value_info("z", TensorProto.FLOAT16, [96, 80])],
            [numpy_helper.from_array(a, "w"), numpy_helper.from_array(b, "h")],
        )
        paths[name] = str(tmp_path / f"{name}.onnx")
        onnx.save(m, paths[name])
    copies = []
    real_copy = ortshare._Blocks.copy
    monkeypatch.setattr(ortshare._Blocks, "copy", lambda self: copies.append(1) or real_copy(self))
    store = WeightStore()
    store.strip(paths["first"])
    np.testing.assert_array_equal(store.arrays["w"], w)
    np.testing.assert_array_equal(store.arrays["h"], h)
    assert store.arrays["h"].dtype == np.float16 and len(copies) == 2
    held = dict(store.arrays)
    _, used = store.strip(paths["same"])  # the same weights: compared, not copied again
    assert sorted(used) == ["h", "w"] and store.conflicts == 0 and len(copies) == 2
    assert all(store.arrays[k] is held[k] for k in held)
    stub, used = store.strip(paths["changed"])  # one element differs: that weight stays in its graph
    assert used == ["h"] and store.conflicts == 1 and len(copies) == 2
    assert len(stub) > changed.nbytes
    np.testing.assert_array_equal(store.arrays["w"], w)


def test_sessions_share_one_value_per_weight_and_t_rows_load_for_a_prompt(plan_artifact, tokens, monkeypatch):
    from rwkv2rknn.runtime import ortshare

    copies = []
    real_copy = ortshare._Blocks.copy
    monkeypatch.setattr(ortshare._Blocks, "copy", lambda self: copies.append(1) or real_copy(self))
    own = HybridModel(plan_artifact, backend="ort", fuse=False, share_weights=False)
    own.prepare_prefill()
    made = spy_sessions(monkeypatch)  # the sessions of `model` only
    model = HybridModel(plan_artifact, backend="ort", prepack=False)
    store = model._store
    # token steps (and a one-token prefill) make no T-row session
    want, want_state = run_steps(own, tokens[:4])
    got, got_state = steps_then_prompt(model, tokens[:4], 3)
    assert_same_run(got, got_state, want, want_state, 1e-6)
    scale = float(np.abs(want).max())
    assert not model._seq_loaded and not any(m.what.endswith(".seq") for m in made)
    # a prompt: T-row sessions (and the row-by-row segments' own), on the same values
    np.testing.assert_allclose(
        model.prefill(tokens[:20], model.init_state()),
        own.prefill(tokens[:20], own.init_state()),
        rtol=0,
        atol=1e-6 * scale,
    )
    # and the same as one token at a time, in chunks, the state included; the row-by-row
    # segments kept only the last row of the state no later segment reads
    from rwkv2rknn.runtime import hybrid

    kept = []
    real_rows = hybrid.row_by_row

    def rows_spy(*args):
        out = real_rows(*args)
        kept.extend((len(args[3]), v.shape[0]) for v in out.values())
        return out

    monkeypatch.setattr(hybrid, "row_by_row", rows_spy)
    s1, s2 = own.init_state(), model.init_state()
    one = np.stack([own.step(t, s1) for t in tokens[:20]])
    many = model.prefill(tokens[:20], s2, chunk=8)
    np.testing.assert_allclose(many, one, rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_allclose(s2, s1, rtol=1e-5, atol=1e-5)
    assert (8, 1) in kept and (8, 8) in kept
    seq = [m for m in made if m.what.endswith(".seq")]
    assert seq and len(seq) == sum(r is not None for r in model._seq)
    decode = [m.initializers for m in made if m.what == "decode"]
    # one fused session per thread setting the token step chooses between, all on the store
    assert len(decode) == len(model._decode.steps) >= 1
    assert all(d.keys() == store.values.keys() for d in decode)
    for m in made:
        if m.what in ("decode",) or m.what.endswith(".seq") or not m.initializers:
            continue
        assert not m.arena, f"{m.what}: a segment run alone (row by row) keeps no arena"
    for m in made:
        for name, value in m.initializers.items():
            assert value is store.values[name] and value is decode[0][name], (m.what, name)
    assert sum(len(m.initializers) for m in seq) > 0
    # each weight was copied out of its file once, whatever number of sessions reads it
    assert len(copies) == len(store.arrays) and store.conflicts == 0
    model.close()
    own.close()


def test_a_one_token_prompt_loads_no_t_row_sessions(fp32_plan_artifact):
    from rwkv2rknn.runtime.generate import generate_text

    model = HybridModel(fp32_plan_artifact, backend="ort", prepack=False)
    generate_text(model, "bytes", "A", 2, temperature=0)  # one byte: one token, no prefill
    assert not model._seq_loaded
    generate_text(model, "bytes", "AB", 2, temperature=0)
    assert model._seq_loaded and any(r is not None for r in model._seq)
