"""w16a16i calibrates on text and on seeded random ids: ranges that only random ids reach are
inside its fixed-point ranges, so `check --random` holds (the trained RWKV-7's failure), and
check gates w16a16i's KL on random ids as on text."""

import pytest

from rwkv2rknn.rknn import calibrate
from rwkv2rknn.tools.check import KL_TOLERANCE, run_check, sample_text


def test_random_ids_are_appended_seeded_in_the_vocabulary_and_the_held_out_stays_text(byte_model):
    cal, hold, where = calibrate.calibration_ids(byte_model, None, 96)
    cal2, hold2, where2 = calibrate.calibration_ids(byte_model, None, 96, random_ids=24)
    assert cal2[: len(cal)] == cal and hold2 == hold and where2 == where
    extra = cal2[len(cal) :]
    assert len(extra) == 24 and all(0 <= t < 256 for t in extra)
    assert extra == calibrate.calibration_ids(byte_model, None, 96, random_ids=24)[0][len(cal) :]
    assert calibrate.random_count("w16a16i", 256) == 64 and calibrate.random_count("w8a8", 256) == 0


@pytest.fixture(scope="module")
def unseen_spikes(tmp_path_factory):
    """A small random byte-level RWKV-4 whose token rows for bytes in neither the calibration
    text nor check's English sample carry one large channel: after the first LayerNorm they
    reach values the text never does (as the trained RWKV-7's layer-0 LoRA output does)."""
    from rwkv2rknn.models.checkpoint import random_checkpoint
    from rwkv2rknn.models.export import export

    sd = random_checkpoint(layers=2, width=64, vocab=256, seed=5)
    text, _ = calibrate.default_text("bytes")
    seen = set(text.encode()) | set(sample_text("en").encode())
    for i in set(range(256)) - seen:
        sd["emb.weight"][i, i % 64] += 3.0
    out = str(tmp_path_factory.mktemp("spikes") / "fp32")
    export(sd, out, fp32=True, tokenizer="bytes")
    return out


def _random_kl(model, out, monkeypatch, share):
    from rwkv2rknn.compiler.driver import compile_model
    from rwkv2rknn.compiler.ir import Options

    monkeypatch.setattr(calibrate, "RANDOM_SHARE", share)
    compile_model(model, str(out), Options(quant="w16a16i", calib_tokens=96, prefill_rows=()))
    rep, _ = run_check(str(out), 16, backend="rknn-sim", random_ids=True, prefill=False)
    return rep


@pytest.mark.slow
def test_w16a16i_calibrated_on_random_ids_too_holds_on_random_ids(unseen_spikes, tmp_path, monkeypatch):
    share = dict(calibrate.RANDOM_SHARE)
    assert share.get("w16a16i")
    text_only = _random_kl(unseen_spikes, tmp_path / "text", monkeypatch, {})
    both = _random_kl(unseen_spikes, tmp_path / "both", monkeypatch, share)
    # measured on 32 ids: KL mean 0.20 (same top 78%, check fails) against 0.001 (97%, passes)
    assert not text_only.passed and text_only.quality["kl"]["mean"] > 0.05
    assert both.quality["kl"]["mean"] < text_only.quality["kl"]["mean"] / 10
    # on random ids w16a16i's KL is gated (no "calibrated on text" warning): the text-only build
    # fails that gate itself. This model is built to leave the calibration's ranges (202 spiked
    # rows, 24 random calibration ids): with the random ids it holds the logit and state gates,
    # and its KL p99 is still near the gate, so only the other gates are asserted for it.
    for rep in (text_only, both):
        assert (rep.tolerance["max_kl_mean"], rep.tolerance["max_kl_p99"]) == KL_TOLERANCE["w16a16i"]
        assert not [w for w in rep.warnings if "calibrated on text" in w], rep.warnings
    assert any(f.startswith("KL mean") for f in text_only.failures), text_only.failures
    assert not [f for f in both.failures if "KL" not in f], (both.failures, both.quality["kl"])
