"""Device profiles and placement by estimated cost."""

import json

import numpy as np
import pytest

from rwkv2rknn.compiler.driver import compile_model
from rwkv2rknn.errors import BadInput
from rwkv2rknn.compiler.ir import Options
from rwkv2rknn.artifact.profile import DeviceProfile, load_profile


def test_default_profile_reproduces_its_sources_through_its_formula():
    """Each published anchor, recomputed through the formula (not the constants compared
    with themselves), and every figure the docstring quotes is what the formula gives."""
    import rwkv2rknn.artifact.profile as mod

    p = DeviceProfile()
    # int8 GEMV M=1, K=N=2048 on one core: 0.39 ms (the source of npu_gbs)
    int8 = DeviceProfile(npu_weight_bytes=1)
    assert int8.npu_matmul_ms(2048, 2048, 1, cores=1) == pytest.approx(0.39, rel=0.01)
    # the same over 3 cores: 4 MiB at ~26.6 GB/s
    assert int8.npu_matmul_ms(2048, 2048, 1, cores=3) == pytest.approx(4 * 2**20 / 26.6e6, rel=1e-9)
    one_core = p.npu_matmul_ms(1024, 1024, 1, cores=1)  # fp16: 2 bytes a weight
    cpu_fp32 = p.cpu_matmul_ms(1024, 1024, 1)
    cpu_fp16 = DeviceProfile(cpu_weight_bytes=2).cpu_matmul_ms(1024, 1024, 1)
    assert one_core == pytest.approx(2 * 2**20 / 10.8e6) and cpu_fp32 == pytest.approx(4 * 2**20 / 25e6)
    for figure in (one_core, cpu_fp32, cpu_fp16):
        assert f"{figure:.2f} ms" in mod.__doc__
    # the "about 0.2 ms" (NPU, one core) and "about 0.1 ms" (CPU, fp16 weights) reports
    assert abs(one_core - 0.2) < 0.02 and abs(cpu_fp16 - 0.1) < 0.02
    # many rows: compute bound at ~0.9 TFLOPS a core
    assert p.npu_matmul_ms(1024, 4096, 512, cores=1) == pytest.approx(2 * 512 * 1024 * 4096 / 900e6)
    assert p.npu_matmul_ms(1024, 1024, 64) / 64 < p.npu_matmul_ms(1024, 1024, 1) / 4


def test_large_segments_use_every_npu_core():
    p = DeviceProfile()
    big = [(1, 1024, 1024)] * 7  # 14 MiB of fp16 weights
    small = [(1, 256, 256)]  # 128 KiB
    assert p.npu_cores_for(14 * 2**20) == 3 and p.npu_cores_for(2**17) == 1
    assert p.npu_segment_ms(big) == pytest.approx(0.033 + 7 * 2 * 2**20 / 26.6e6)
    assert p.npu_segment_ms(small) == pytest.approx(0.033 + 256 * 256 * 2 / 10.8e6)
    # a bandwidth above the DRAM's is capped at it
    assert DeviceProfile(npu_gbs_all=100).npu_matmul_ms(1024, 1024, 1, cores=3) == pytest.approx(
        2 * 2**20 / 34e6
    )


def test_measured_table_overrides_the_model():
    p = DeviceProfile(npu_gflops={1: 5.0, 128: 500.0})
    assert p.npu_matmul_ms(1000, 1000, 1) == pytest.approx(2e6 / 5e6)
    assert DeviceProfile.from_dict(p.to_dict()) == p


def test_profile_round_trip_and_errors(tmp_path):
    p = DeviceProfile(name="x", npu_call_ms=1.0)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(p.to_dict()))
    assert load_profile(str(path)) == p
    path.write_text("[1, 2]")
    with pytest.raises(BadInput, match="not a JSON object"):
        load_profile(str(path))
    path.write_text('{"cpu_gemv_gbs": -1}')
    with pytest.raises(BadInput, match="negative"):
        load_profile(str(path))


@pytest.mark.slow
def test_cost_placement_keeps_small_matmuls_on_cpu(fp32_dir, tmp_path):
    """Width-48 layers: a call costs more than the MatMuls it would take off the CPU."""
    m = compile_model(fp32_dir, str(tmp_path / "a"), Options(plan_only=True, placement="cost"))
    assert all(s.backend == "cpu" for s in m.segments)
    # per MatMul (support) or per segment (partition): the profile said the NPU does not pay
    assert any(
        r.startswith("partition:")
        and "moved to the CPU" in r
        or r.startswith("support: 0 MatMuls for the NPU")
        for r in m.report
    )


@pytest.mark.slow
def test_cost_placement_uses_npu_when_it_wins(fp32_dir, tmp_path):
    """A profile with a free call and a slow CPU puts the MatMuls back on the NPU."""
    prof = tmp_path / "fast_npu.json"
    prof.write_text(
        json.dumps({"name": "fast-npu", "npu_call_ms": 0.0, "handoff_ms": 0.0, "cpu_gemv_gbs": 0.001})
    )
    m = compile_model(
        fp32_dir, str(tmp_path / "a"), Options(plan_only=True, placement="cost", profile=str(prof))
    )
    assert m.npu_flop_share() == 1.0
    assert "estimated decode" in m.table() and "fast-npu" in m.table()


@pytest.mark.slow
def test_plan_shows_an_estimate_labelled_as_such(fp32_plan_artifact):
    from rwkv2rknn.runtime.hybrid import load_manifest

    m = load_manifest(fp32_plan_artifact)
    est = m.estimate_ms()
    assert est["total"] > 0 and est["npu"] > 0
    assert "an estimate from device profile 'rk3588-published', not a measurement" in m.table()


@pytest.mark.slow
def test_profile_command_flow_on_the_simulator(tmp_path):
    """Build probes, time them (here on the simulator), and compile with the measured profile."""
    from click.testing import CliRunner
    from rwkv2rknn.cli import cli

    probes, out = tmp_path / "probes", tmp_path / "p.json"
    r = CliRunner().invoke(cli, ["profile", "--build-probes", str(probes)])
    assert r.exit_code == 0, r.output
    assert {"mm1.rknn", "mm16.rknn", "mm128.rknn", "call.rknn"} <= set(p.name for p in probes.iterdir())
    r = CliRunner().invoke(cli, ["profile", "--probes", str(probes), "--backend", "rknn-sim", "-o", str(out)])
    assert r.exit_code == 0, r.output
    prof = load_profile(str(out))
    assert prof.name.startswith("simulator-timings-not-a-board")  # never passed off as a board's
    assert prof.npu_call_ms > 0 and all(v > 0 for v in prof.npu_gflops.values())
    r = CliRunner().invoke(cli, ["profile", "--probes", str(probes), "--build-probes", str(probes)])
    assert r.exit_code == 2


@pytest.mark.slow
def test_prefill_estimate_shares_calls_across_rows(fp32_plan_artifact):
    """T-row calls serve T tokens: the prefill estimate per token is below the decode one."""
    from rwkv2rknn.runtime.hybrid import load_manifest

    m = load_manifest(fp32_plan_artifact)
    decode, prefill = m.estimate_ms("decode"), m.estimate_ms("prefill")
    assert 0 < prefill["total"] < decode["total"]
    assert prefill["handoffs"] == pytest.approx(decode["handoffs"] / m.prefill_rows)
    assert f"estimated prefill (T={m.prefill_rows})" in m.table()


def test_cpu_segments_count_their_non_matmul_ops():
    """A CPU segment's estimate counts the bytes and FLOPs of its elementwise ops and of the
    WKV state's products (not only its projections); views move nothing, a Gather reads the
    rows it picks, not its table."""
    import numpy as np
    import onnx_graphsurgeon as gs
    from rwkv2rknn.passes.partition import boundary_tensors, estimate_ms, op_work

    p = DeviceProfile()
    assert p.cpu_op_ms(4 * 2**20, 0) == pytest.approx(0.001 + 4 * 2**20 / 25e6)
    assert p.cpu_op_ms(0, 1e6, special=True) == pytest.approx(0.001 + 20e6 / 40e6)

    def var(name, shape):
        return gs.Variable(name, np.float32, shape)

    h, n, c = 4, 16, 64
    S, w, kk = var("S", [h, n, n]), var("w", [h, 1, n]), var("kk", [h, n, 1])
    Sw, Skk, x, r = var("Sw", [h, n, n]), var("Skk", [h, n, 1]), var("x", [1, c]), var("r", [1, c])
    flat, e, tok, row = var("flat", [c]), var("e", [c]), gs.Variable("tok", np.int64, [1]), var("row", [1, c])
    W = gs.Constant("W", np.zeros((c, c), np.float32))
    table = gs.Constant("table", np.zeros((1000, c), np.float32))
    shape = gs.Constant("shape", np.array([c], np.int64))
    nodes = [
        gs.Node("Mul", "decay", inputs=[S, w], outputs=[Sw]),
        gs.Node("MatMul", "S_kk", inputs=[Sw, kk], outputs=[Skk]),
        gs.Node("MatMul", "proj", inputs=[x, W], outputs=[r]),
        gs.Node("Reshape", "flat", inputs=[r, shape], outputs=[flat]),
        gs.Node("Exp", "exp", inputs=[flat], outputs=[e]),
        gs.Node("Gather", "emb", inputs=[table, tok], outputs=[row]),
    ]
    work = op_work(nodes)
    state = h * n * n
    assert work == [
        (4 * (2 * state + h * n), state, False),  # S * w
        (4 * (state + h * n + h * n), 2 * h * n * n, False),  # S @ kk
        (0, 0, False),  # reshape: a view
        (4 * 2 * c, c, True),  # exp: special
        (4 * 2 * c, c, False),
    ]  # one row of the table
    # in: S, w, kk, x, tok; out (read by no node here): Skk, e, row
    assert boundary_tensors(nodes) == 8
    want = p.executor_ms(8) + p.cpu_matmul_ms(c, c, 1) + sum(p.cpu_op_ms(*wk) for wk in work)
    assert estimate_ms("cpu", nodes, p) == pytest.approx(want)
    # on the NPU: the call, its MatMuls (the projection and the state's product), every other
    # op an NPU task of its own
    npu_want = (
        p.executor_ms(8)
        + p.npu_segment_ms([(h * n, 1, n), (1, c, c)])
        + sum(p.npu_op_ms(*wk) for i, wk in enumerate(work) if i != 1)
    )
    assert estimate_ms("npu", nodes, p) == pytest.approx(npu_want)
    assert p.npu_op_ms(0, 0) == p.npu_kernel_ms > 0
    assert estimate_ms("cpu", nodes, p) > p.cpu_matmul_ms(c, c, 1) + 5 * p.cpu_kernel_ms
    # a T-row call moves T times the bytes, and pays each kernel's fixed cost once
    assert op_work(nodes, rows=8)[0] == (8 * work[0][0], 8 * work[0][1], False)


def test_executor_cost_per_token_scales_with_segments_slots_and_state_bytes(fp32_plan_artifact):
    """The executor's own cost per token beyond its runs: a fixed cost, one per segment, one
    per state slot and the state's bytes at a copy rate; the plan counts them from its own
    segments and state (a profile of the older form, one exec_token_ms, is that figure)."""
    from dataclasses import replace

    from rwkv2rknn.runtime.hybrid import load_manifest

    import rwkv2rknn.artifact.profile as mod

    # the docstring's figures for the published profile: a 430M step (51 segments) with RWKV-4's
    # state (120 rows of 1024) and RWKV-7's (24 x (2 rows + 16 x 64 x 64)), the bundled model's
    d = DeviceProfile()
    for segments, slots, nbytes in (
        (51, 120, 4 * 120 * 1024),
        (51, 72, 4 * 24 * (2048 + 65536)),
        (11, 20, 4 * 20 * 256),
    ):
        assert f"{d.executor_token_ms(segments, slots, nbytes):.1f} ms" in mod.__doc__
    p = DeviceProfile(exec_token_ms=0.5, exec_segment_ms=0.02, exec_slot_ms=0.003, exec_state_gbs=2.0)
    assert p.executor_token_ms(0, 0, 0) == pytest.approx(0.5)
    assert p.executor_token_ms(10, 20, 4e6) == pytest.approx(0.5 + 0.2 + 0.06 + 2.0)
    m = load_manifest(fp32_plan_artifact)
    width = m.model["width"]
    state_bytes = sum(4 * int(np.prod(s.shape or (width,))) for s in m.state)
    assert m.state_bytes() == state_bytes > 0
    m = replace(m, profile=p.to_dict())
    want = 0.5 + 0.02 * len(m.segments) + 0.003 * len(m.state) + state_bytes / 2e9 * 1e3
    assert m.executor_token_ms() == pytest.approx(want)
    assert m.estimate_ms("decode")["executor"] == pytest.approx(want)
    assert m.estimate_ms("prefill")["executor"] == pytest.approx(want / m.prefill_rows)
    old = {
        k: v for k, v in p.to_dict().items() if k not in ("exec_segment_ms", "exec_slot_ms", "exec_state_gbs")
    }
    assert replace(m, profile=old).executor_token_ms() == pytest.approx(0.5)
    with pytest.raises(BadInput, match="zero or negative throughput"):
        DeviceProfile.from_dict({**p.to_dict(), "exec_state_gbs": 0})
    with pytest.raises(BadInput, match="negative cost"):
        DeviceProfile.from_dict({**p.to_dict(), "exec_segment_ms": -1})


def test_an_embedding_from_a_table_beyond_the_cache_pays_a_cold_row(fp32_plan_artifact):
    """A Gather of a table larger than ``cache_bytes`` costs ``table_row_ms`` per row picked
    beyond its bytes, in the embedding segment the compile wrote (its graph read back) and in
    the compile's own estimate of it (the written segment's stand-in keeps the table's shape)."""
    import os

    import onnx_graphsurgeon as gs
    from rwkv2rknn.compiler.driver import estimate_file
    from rwkv2rknn.compiler.stream import _stub
    from rwkv2rknn.passes.partition import estimate_ms, gathers, op_work
    from rwkv2rknn.runtime.hybrid import load_manifest

    m = load_manifest(fp32_plan_artifact)
    seg = m.segments[0]
    assert "embed" in seg.stages
    path = os.path.join(fp32_plan_artifact, seg.token.onnx)
    import onnx

    nodes = gs.import_onnx(onnx.shape_inference.infer_shapes(onnx.load(path))).nodes
    (table_bytes, rows), *rest = gathers(nodes)
    assert rest == [] and rows == 1 and table_bytes == 4 * m.vocab * m.model["width"]
    assert gathers(nodes, rows=8) == [(table_bytes, 8)]
    big = DeviceProfile(table_row_ms=0.25, cache_bytes=table_bytes - 1)  # the table beyond it
    fits = DeviceProfile(table_row_ms=0.25, cache_bytes=table_bytes)
    assert big.gather_ms(table_bytes, 3) == pytest.approx(0.75) and fits.gather_ms(table_bytes, 3) == 0
    for device in ("cpu", "npu"):
        assert estimate_file(path, device, big) - estimate_file(path, device, fits) == pytest.approx(0.25)
    stubs = [_stub(n, op_work) for n in nodes]
    assert gathers(stubs) == gathers(nodes)
    assert estimate_ms("cpu", stubs, big, io=2) == pytest.approx(estimate_ms("cpu", nodes, big, io=2))
