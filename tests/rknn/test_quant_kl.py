"""compile --quant w8a8 --quant-kl: segments kept fp16 by measured held-out KL, not by cosine."""

import json

import pytest
from click.testing import CliRunner

from rwkv2rknn.cli import cli
from rwkv2rknn.rknn import calibrate
from rwkv2rknn.runtime.hybrid import load_manifest
from rwkv2rknn.tools.evaluate import heldout_quality
from rwkv2rknn.tools.quant_kl import heldout_kl
from conftest import W8A8_OPTIONS


def _compile(byte_model, out, *more):
    args = ["compile", byte_model, "-o", str(out), "--quant", "w8a8"]
    args += ["--calib-tokens", str(W8A8_OPTIONS["calib_tokens"]), "--prefill-rows", "4,8", *more]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    return r.output, json.load(open(out / "plan.json"))


@pytest.mark.slow
def test_a_target_below_w8a8s_kl_keeps_segments_fp16_until_it_is_met(byte_model, w8a8_artifact, tmp_path):
    # the w8a8 compile's own held-out KL (its builds are the ones --quant-kl starts from)
    _, hold, where = calibrate.calibration_ids(byte_model, None, W8A8_OPTIONS["calib_tokens"])
    all_q = heldout_kl(heldout_quality(w8a8_artifact, hold, where))
    target = all_q / 2
    out, plan = _compile(byte_model, tmp_path / "kl", "--quant-kl", f"{target:.6g}")
    choice = plan["quant_kl"]
    assert choice["kl_all_quantised"] == pytest.approx(all_q, rel=1e-6)
    assert choice["reached"] and 1 <= len(choice["kept"]) and choice["kl"] <= target
    m = load_manifest(str(tmp_path / "kl"))
    npu = [s for s in m.segments if s.backend == "npu"]
    assert sorted(s.name for s in npu if s.token.precision == "fp16") == sorted(choice["kept"])
    assert all(s.precision_note.startswith("--quant-keep") for s in npu if s.token.precision == "fp16")
    assert all(s.token.quant == {} for s in npu if s.token.precision == "fp16")
    # every candidate was measured alone, and the first kept is the most KL saved per byte
    assert set(choice["alone"]) == {s.name for s in npu}
    ratio = {n: choice["alone"][n] / choice["extra_bytes"][n] for n in choice["alone"]}
    assert choice["kept"][0] == max(ratio, key=ratio.get)
    # the saved held-out figures are the chosen artifact's, and the printed lines say so
    assert heldout_kl(plan["heldout_quality"]) == pytest.approx(choice["kl"])
    assert choice["rknn_bytes"] > choice["rknn_bytes_all_quantised"]
    last = [ln for ln in out.splitlines() if ln.startswith("kept fp16: ")]
    assert last and ",".join(choice["kept"]) in last[0] and "at or below the target" in last[0]
    assert f"{choice['rknn_bytes']:,} bytes" in last[0]


@pytest.mark.slow
def test_a_loose_target_that_w8a8_meets_keeps_nothing(byte_model, w8a8_artifact, tmp_path):
    out, plan = _compile(byte_model, tmp_path / "loose", "--quant-kl", "0.5")
    choice = plan["quant_kl"]
    assert choice["kept"] == [] and choice["reached"] and choice["alone"] == {}
    assert choice["kl"] == choice["kl_all_quantised"] <= 0.5
    assert all(
        s.token.precision == "w8a8"
        for s in load_manifest(str(tmp_path / "loose")).segments
        if s.backend == "npu"
    )
    assert "kept fp16: none; held-out KL mean" in out and "compiling again" not in out


@pytest.mark.parametrize(
    "args, words",
    [
        (["--quant-kl", "0.002"], "--quant-kl is for quantised builds"),
        (["--quant", "w8a8", "--quant-kl", "0"], "--quant-kl"),
    ],
)
def test_quant_kl_refuses_what_it_cannot_do(byte_model, tmp_path, args, words):
    r = CliRunner().invoke(cli, ["compile", byte_model, "-o", str(tmp_path / "a")] + args)
    assert r.exit_code == 2 and words in r.output and not (tmp_path / "a").exists()
