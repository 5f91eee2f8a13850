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
        ["bench", "--backtest", fp32_plan_artifact, "--tokens", "3", "--json-out", str(out)],
        catch_exceptions=False,
    )
    assert r.exit_code == 0, r.output
    assert "load average at the start:" in r.output and "load average at the end:" in r.output
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
    assert prof["exec_call_ms"] > 0 and prof["exec_token_ms"] > 0 and prof["cpu_kernel_ms"] > 0


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
