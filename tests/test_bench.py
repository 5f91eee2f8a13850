"""`rwkv2rknn bench` on tiny random models of the slot versions (figures printed, not judged)."""

import pytest

from rwkv2rknn.bench import run_bench


@pytest.mark.parametrize("version", ["5", "7"])
def test_bench_runs_every_runner_and_the_plan_estimate(version, tmp_path):
    lines = []
    res = run_bench(layers=2, width=128, vocab=300, tokens=4, workdir=str(tmp_path),
                    with_rwkv=False, version=version, echo=lines.append)
    assert res["model"] == f"RWKV-{version} 2 x 128, vocab 300 (random)"
    assert [r["runner"] for r in res["rows"]] == [
        "per-layer onnxruntime (public demo loop)", "hybrid executor, all segments on ort",
        "one fused onnxruntime session"]
    assert all(r["ms_per_token"] > 0 for r in res["rows"])
    assert res["prefill"]["tokens_per_s"] > 0
    assert res["estimate"]["decode"]["total"] > res["estimate"]["prefill"]["total"] > 0
    assert sum(s["backend"] == "npu" for s in res["segments"]) == 3  # embed-L0, L0-L1, L1-head
    assert any(line.startswith("plan: estimated decode") for line in lines)
