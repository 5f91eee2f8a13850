"""`rwkv2rknn bench` on tiny random models of the slot versions (figures printed, not judged),
and the board's per-call costs where no board is (a clear line, not a crash)."""

import pytest

from rwkv2rknn.tools.bench import run_bench
from rwkv2rknn.tools.measure import call_costs
from rwkv2rknn.runtime import board


@pytest.mark.slow
@pytest.mark.parametrize("version", ["5", "6", "7"])
def test_bench_runs_every_runner_and_the_plan_estimate(version, tmp_path):
    lines = []
    res = run_bench(
        layers=2,
        width=128,
        vocab=300,
        tokens=4,
        workdir=str(tmp_path),
        with_rwkv=True,
        version=version,
        echo=lines.append,
    )
    assert res["model"] == f"RWKV-{version} 2 x 128, vocab 300 (random)"
    assert [r["runner"] for r in res["rows"]] == [
        "per-layer onnxruntime (public demo loop)",
        "hybrid executor, all segments on ort",
        "one fused onnxruntime session",
        "rwkv package, cpu fp32",
    ]
    assert all(r["ms_per_token"] > 0 for r in res["rows"])
    # CPU time per token of every runner (the package's from its child process) and the cores it had
    assert all(r["cpu_ms_per_token"] >= 0 and r["cores_while_running"] >= 0 for r in res["rows"])
    assert all(len(res["cpu_ms"][r["runner"]]) == 4 for r in res["rows"])
    assert "CPU ms" in next(line for line in lines if line.startswith("runner"))
    # timed side by side in rounds; the hybrid over the package is printed
    assert res["rounds"] == 4
    ratio = res["rows"][1]["ms_per_token"] / res["rows"][3]["ms_per_token"]
    assert res["hybrid_to_package"] == pytest.approx(ratio)
    assert any(line.startswith("hybrid executor / rwkv package: ") for line in lines)
    assert res["prefill"]["tokens_per_s"] > 0
    assert res["estimate"]["decode"]["total"] > res["estimate"]["prefill"]["total"] > 0
    assert sum(s["backend"] == "npu" for s in res["segments"]) == 4  # embed-L0, L0-L1, L1, head
    assert any(line.startswith("plan: estimated decode") for line in lines)
    # the process tree's peak, by phase; every phase ran
    assert {
        "checkpoint and export",
        "plan compile",
        "per-layer sessions",
        "hybrid executor",
        "fused session",
        "rwkv package",
        "interleaved rounds",
        "hybrid prefill",
    } <= set(res["peak_rss_by_phase_mb"])
    assert res["peak_rss_mb"] == max(res["peak_rss_by_phase_mb"].values()) > 100
    assert any(line.startswith("peak memory of the process tree:") for line in lines)
    # not a board: both per-call costs say why they are missing
    assert set(res["call_costs"]) == {"rknn-rt", "rknn-lite"}
    assert [line for line in lines if line.startswith("NPU per-call cost")] == [
        f"NPU per-call cost, {b}: not measured: this machine is not a Rockchip board"
        for b in ("rknn-rt", "rknn-lite")
    ]


def test_call_costs_name_what_the_board_lacks(tmp_path, monkeypatch):
    monkeypatch.setattr(board, "board_soc", lambda *a: "rk3588")
    monkeypatch.setattr(board, "rt_available", lambda: False)
    monkeypatch.setattr(board, "lite_available", lambda: False)
    got = call_costs(None, echo=lambda line: None)
    assert "librknnrt.so is not found" in got["rknn-rt"]
    assert "rknn-toolkit-lite2 is not installed" in got["rknn-lite"]
    monkeypatch.setattr(board, "rt_available", lambda: True)
    monkeypatch.setattr(board, "lite_available", lambda: True)
    got = call_costs(None, echo=lambda line: None)
    assert all("give --probes DIR" in v for v in got.values())
    lines = []
    got = call_costs(str(tmp_path), echo=lines.append)  # a folder without the probes
    assert all(v.startswith("not measured: probe ") and "call.rknn' is missing" in v for v in got.values())
    assert len(lines) == 2 and lines[0].startswith("  NPU per-call cost, rknn-rt: not measured")


@pytest.mark.slow
def test_bench_command_passes_the_probes_on(tmp_path):
    from click.testing import CliRunner
    from rwkv2rknn.cli import cli

    out = tmp_path / "b.json"
    r = CliRunner().invoke(
        cli,
        [
            "bench",
            "--version",
            "7",
            "--layers",
            "2",
            "--width",
            "64",
            "--vocab",
            "100",
            "--tokens",
            "3",
            "--no-rwkv",
            "--probes",
            str(tmp_path),
            "--json-out",
            str(out),
            "--busy",
            "2",
            "--rounds",
            "2",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "NPU per-call cost, rknn-lite: not measured: this machine is not a Rockchip board" in r.output
    assert "peak memory of the process tree" in r.output and out.exists()
    # --busy 2: two loops ran beside the timed phases and are gone; the load average is printed
    import json
    import os

    saved = json.loads(out.read_text())
    assert saved["rounds"] == 2 and "interleaved in 2 rounds" not in r.output  # no package: no ratio
    pids = saved["busy_pids"]
    assert len(pids) == 2 and not any(os.path.exists(f"/proc/{p}") for p in pids)
    assert "2 busy loops beside the timed phases" in r.output
    assert "load average: " in r.output and " at the end of the timed phases" in r.output


@pytest.mark.slow
def test_rwkv_package_failure_is_one_line(tmp_path):
    from rwkv2rknn.errors import ToolkitError
    from rwkv2rknn.tools.rwkv_package import package_run

    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ToolkitError) as e:
        package_run(str(bad), [1, 2], "7")
    assert "the rwkv package failed on 'broken.pth'" in str(e.value) and "\n" not in str(e.value)


def test_interleave_gives_every_runner_the_same_tokens_in_turning_rounds():
    from rwkv2rknn.tools.bench import interleave

    calls = []

    def runner(name):
        def run(tokens):
            calls.append((name, list(tokens)))
            return [float(t) for t in tokens]

        return run

    ids = list(range(100, 112))  # 2 warm-up tokens, 10 timed
    got = interleave({"a": runner("a"), "b": runner("b"), "c": runner("c")}, ids, rounds=3)
    # the warm-up first, untimed; then each runner every timed token once, in order
    assert calls[:3] == [("a", [100, 101]), ("b", [100, 101]), ("c", [100, 101])]
    assert all(got[k] == [float(t) for t in ids[2:]] for k in "abc")
    rounds = [calls[3 + 3 * r : 6 + 3 * r] for r in range(3)]
    assert [[name for name, _ in r] for r in rounds] == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    assert [r[0][1] for r in rounds] == [[102, 103, 104], [105, 106, 107], [108, 109, 110, 111]]
    # more rounds than tokens: one token a round
    calls.clear()
    got = interleave({"a": runner("a")}, ids[:5], rounds=9)
    assert got["a"] == [102.0, 103.0, 104.0] and len(calls) == 4


@pytest.mark.slow
def test_the_package_child_goes_on_from_its_kept_state(small_pth):
    """The bench's rounds: requests with keep=True continue one sequence (the same logits as one
    request of all the tokens); without keep every request starts from the zero state."""
    import numpy as np

    from rwkv2rknn.tools.rwkv_package import PackageProcess

    ids = [5, 17, 3, 60, 42, 7]
    proc = PackageProcess("4", threads=1)
    try:
        whole = proc.run([(small_pth, ids)])[0][0]
        parts = [proc.run([(small_pth, ids[i : i + 2])], keep=True)[0] for i in range(0, 6, 2)]
        again = proc.run([(small_pth, ids[:2])])[0][0]
    finally:
        proc.close()
    assert all(len(ms) == 2 and min(ms) > 0 for _, ms in parts)
    np.testing.assert_allclose(np.concatenate([p[0] for p in parts]), whole, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(again, whole[:2], rtol=1e-5, atol=1e-5)
