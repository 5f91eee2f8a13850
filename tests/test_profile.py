"""Device profiles and placement by estimated cost."""

import json

import pytest

from rwkv2rknn.compiler import compile_model
from rwkv2rknn.errors import BadInput
from rwkv2rknn.ir import Options
from rwkv2rknn.profile import DeviceProfile, load_profile


def test_default_profile_matches_published_gemv_figures():
    p = DeviceProfile()
    # GEMV M=1, K=N=1024: about 0.2 ms on one NPU core (published)
    assert 0.15 <= p.npu_matmul_ms(1024, 1024, 1) <= 0.25
    # the NPU gets faster per row with more rows (its strong case is prefill)
    assert p.npu_matmul_ms(1024, 1024, 64) / 64 < p.npu_matmul_ms(1024, 1024, 1) / 4


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


def test_cost_placement_keeps_small_matmuls_on_cpu(fp32_dir, tmp_path):
    """Width-48 layers: a call costs more than the MatMuls it would take off the CPU."""
    m = compile_model(fp32_dir, str(tmp_path / "a"), Options(plan_only=True, placement="cost"))
    assert all(s.backend == "cpu" for s in m.segments)
    assert any(r.startswith("partition:") and "moved to the CPU" in r for r in m.report)


def test_cost_placement_uses_npu_when_it_wins(fp32_dir, tmp_path):
    """A profile with a free call and a slow CPU puts the MatMuls back on the NPU."""
    prof = tmp_path / "fast_npu.json"
    prof.write_text(json.dumps({"name": "fast-npu", "npu_call_ms": 0.0, "handoff_ms": 0.0,
                                "cpu_gemv_gbs": 0.001}))
    m = compile_model(fp32_dir, str(tmp_path / "a"),
                      Options(plan_only=True, placement="cost", profile=str(prof)))
    assert m.npu_flop_share() == 1.0
    assert "estimated decode" in m.table() and "fast-npu" in m.table()


def test_plan_shows_an_estimate_labelled_as_such(fp32_plan_artifact):
    from rwkv2rknn.runtime.hybrid import load_manifest
    m = load_manifest(fp32_plan_artifact)
    est = m.estimate_ms()
    assert est["total"] > 0 and est["npu"] > 0
    assert "an estimate from device profile 'rk3588-published', not a measurement" in m.table()


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


def test_prefill_estimate_shares_calls_across_rows(fp32_plan_artifact):
    """T-row calls serve T tokens: the prefill estimate per token is below the decode one."""
    from rwkv2rknn.runtime.hybrid import load_manifest
    m = load_manifest(fp32_plan_artifact)
    decode, prefill = m.estimate_ms("decode"), m.estimate_ms("prefill")
    assert 0 < prefill["total"] < decode["total"]
    assert prefill["handoffs"] == pytest.approx(decode["handoffs"] / m.prefill_rows)
    assert f"estimated prefill (T={m.prefill_rows})" in m.table()
