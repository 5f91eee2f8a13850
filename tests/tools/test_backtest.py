"""`rwkv2rknn bench --backtest ARTIFACT`: the estimator against this machine, on a tiny model
(the table's form and that its ratios are finite and positive; never its figures)."""

import json
import math

import pytest
from click.testing import CliRunner

from rwkv2rknn.cli import cli
from rwkv2rknn.tools.backtest import KINDS, measure_host


@pytest.mark.slow
def test_backtest_prints_predicted_over_measured_per_kind_and_token(fp32_plan_artifact, tmp_path):
    out = tmp_path / "bt.json"
    r = CliRunner().invoke(
        cli,
        ["bench", "--backtest", fp32_plan_artifact, "--tokens", "3", "--rounds", "1", "--json-out", str(out)],
        catch_exceptions=False,
    )
    assert r.exit_code == 0, r.output
    assert "load average at the start:" in r.output and "load average at the end:" in r.output
    assert "3 tokens in 1 rounds" in r.output  # --rounds reaches the back-test
    res = json.loads(out.read_text())
    kinds = [row["kind"] for row in res["table"]]
    # the random test model: embedding, NPU-planned layer segments, CPU segments, the head
    assert kinds == list(KINDS) + ["executor (per token)", "token"]
    for row in res["table"]:
        assert math.isfinite(row["ratio"]) and row["ratio"] > 0, row
        assert row["predicted_ms"] > 0 and row["measured_ms"] > 0
        # each kind is a line of the printed table: its name, then four figures
        line = next(ln for ln in r.output.splitlines() if ln.startswith(row["kind"] + " "))
        figures = line[len(row["kind"]) :].split()
        assert len(figures) == 4 and float(figures[-1]) > 0
    token = res["table"][-1]
    per_kind = res["table"][:-1]
    # the token's prediction is the sum of the kinds' (every segment in exactly one kind)
    assert token["predicted_ms"] == pytest.approx(sum(row["predicted_ms"] for row in per_kind), rel=1e-12)
    assert token["segments"] == len(res["segments"]) == sum(row["segments"] for row in per_kind)
    # the profile it predicted with: this machine's, every executor cost measured
    prof = res["profile"]
    assert prof["name"] == "this-machine-onnxruntime-1-thread"
    assert prof["exec_call_ms"] > 0 and prof["exec_segment_ms"] > 0 and prof["cpu_kernel_ms"] > 0
    assert prof["exec_token_ms"] == 0.0  # not told from the per-segment cost
    # the executor's row is the profile's cost per segment, slot and state byte of this step
    from rwkv2rknn.artifact.profile import DeviceProfile
    from rwkv2rknn.runtime.hybrid import load_manifest

    m = load_manifest(fp32_plan_artifact)
    own = next(row for row in res["table"] if row["kind"] == "executor (per token)")
    want = DeviceProfile.from_dict(prof).executor_token_ms(len(m.segments), len(m.state), m.state_bytes())
    assert own["predicted_ms"] == pytest.approx(want, rel=1e-9)


def test_backtest_of_a_folder_that_is_no_artifact_is_a_one_line_error(tmp_path):
    r = CliRunner().invoke(cli, ["bench", "--backtest", str(tmp_path)])
    assert r.exit_code != 0
    assert "has no manifest.json" in r.output and "Traceback" not in r.output


def test_host_profile_fields_are_positive():
    p = measure_host(evict_bytes=1 << 20, echo=lambda line: None, repeats=5)
    assert min(p.cpu_gemv_gbs, p.cpu_gflops, p.cpu_kernel_ms, p.exec_call_ms) > 0
    assert p.exec_io_ms >= 0
    # the NPU's fields are the CPU's: segments planned for the NPU run on onnxruntime here
    assert (p.npu_gbs, p.npu_core_gflops, p.npu_kernel_ms, p.npu_cores) == (
        p.cpu_gemv_gbs,
        p.cpu_gflops,
        p.cpu_kernel_ms,
        1,
    )
    # the executor's copy back of the state, a table's cold row, the last-level cache
    assert p.exec_slot_ms >= 0 and p.exec_state_gbs > 0 and p.table_row_ms >= 0 and p.cache_bytes > 0
    # the GEMV bandwidth by a MatMul's bytes, up to a 430M head's 256 MiB
    assert sorted(p.gemv_gbs) == [256 << 10, 4 << 20, 16 << 20, 64 << 20, 256 << 20]
    assert min(p.gemv_gbs.values()) > 0


def test_a_probe_on_a_weight_store_outlives_its_maker():
    """The probe's session reads the store's arrays: the runner keeps the store (a store let go
    while its session lived crashed the back-test)."""
    import gc

    import numpy as np

    from rwkv2rknn.tools.backtest import _gemv_chain, _store_runner

    model, _ = _gemv_chain(256, 256, 2)
    runner = _store_runner(model)
    gc.collect()
    assert runner.store.nbytes == 2 * 256 * 256 * 4  # the weights are the store's
    x = np.ones((1, 256), np.float32)
    want = x @ runner.store.arrays["w0"] @ runner.store.arrays["w1"]
    np.testing.assert_allclose(runner.infer({"x": x})["y"], want, rtol=1e-4, atol=1e-6)


def test_the_replayed_steps_times_become_the_executors_cost_per_segment():
    """The replay's time outside its runs, less the state's copy back as the probes cost it,
    is the cost per segment; with the copy back it gives back the replay's time (the rounds'
    probes: their medians)."""
    from dataclasses import replace

    from rwkv2rknn.artifact.profile import DeviceProfile
    from rwkv2rknn.tools.backtest import _median_profile

    base = DeviceProfile(gemv_gbs={1 << 20: 10.0})
    rounds = [
        replace(base, exec_slot_ms=slot, exec_state_gbs=gbs, table_row_ms=row, exec_call_ms=call)
        for slot, gbs, row, call in (
            (0.002, 4.0, 0.03, 0.05),
            (0.004, 8.0, 0.05, 0.09),
            (0.003, 5.0, 0.04, 0.07),
        )
    ]
    prof = _median_profile(rounds, ends=1.0, betweens=0.5, segments=5, slots=10, state_bytes=2_000_000)
    assert (prof.exec_slot_ms, prof.exec_state_gbs, prof.table_row_ms, prof.exec_call_ms) == (
        0.003,
        5.0,
        0.04,
        0.07,
    )
    copy = 10 * 0.003 + 2_000_000 / 5e9 * 1e3
    assert prof.exec_token_ms == 0.0
    assert prof.exec_segment_ms == pytest.approx((1.5 - copy) / 5)
    assert prof.executor_token_ms(5, 10, 2_000_000) == pytest.approx(1.5)
    # a copy back dearer than the replay's time: no negative cost
    assert _median_profile(rounds, 0.01, 0.0, 5, 10, 2_000_000).exec_segment_ms == 0.0


def test_board_estimate_counts_the_executor_per_segment_slot_and_byte(fp32_plan_artifact):
    """The plan on the published profile: its segments' estimates, the hand-offs and the
    executor's cost per token from the plan's segments and state; the low and high cases
    bracket the expected one."""
    from rwkv2rknn.artifact.profile import DeviceProfile
    from rwkv2rknn.runtime.hybrid import load_manifest
    from rwkv2rknn.tools.backtest import board_estimate, predict

    m = load_manifest(fp32_plan_artifact)
    p = DeviceProfile()
    est = board_estimate(fp32_plan_artifact, m)
    own = p.executor_token_ms(len(m.segments), len(m.state), m.state_bytes())
    assert own > p.exec_token_ms + p.exec_segment_ms * len(m.segments)
    want = sum(predict(fp32_plan_artifact, m, p)) + m.boundaries() * p.handoff_ms + own
    assert est["expected"] == pytest.approx(want)
    assert est["low"] < est["expected"] < est["high"]
