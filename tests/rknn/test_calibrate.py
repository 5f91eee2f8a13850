"""Calibration from real text: reading the text, capturing segment inputs, datasets, accuracy."""

import os

import numpy as np
import pytest

from rwkv2rknn.rknn import calibrate as C
from rwkv2rknn.errors import BadInput
from rwkv2rknn.runtime.tokenizer import ByteTokenizer


@pytest.mark.parametrize(
    "data,words",
    [
        (b"", "empty"),
        (b"  \n\t ", "empty"),
        (b"caf\xe9 au lait, " * 10, "not UTF-8"),
    ],
)
def test_bad_calibration_text_is_a_one_line_error(tmp_path, data, words):
    p = tmp_path / "calib.txt"
    p.write_bytes(data)
    with pytest.raises(BadInput) as e:
        C.read_text(str(p))
    assert words in str(e.value) and "--calib-text" in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_calibration_text(tmp_path):
    with pytest.raises(BadInput, match="cannot read calibration text"):
        C.read_text(str(tmp_path / "nope.txt"))


def test_tiny_text_is_refused_and_short_text_split_four_to_one():
    with pytest.raises(BadInput, match="only 5 token"):
        C.split_tokens(ByteTokenizer().encode("tiny."), 256, "'x'")
    cal, hold = C.split_tokens(list(range(100)), 256, "'x'")
    assert (len(cal), len(hold)) == (80, 20) and cal + hold == list(range(100))
    cal, hold = C.split_tokens(list(range(1000)), 256, "'x'")
    assert (len(cal), len(hold)) == (256, 64) and hold[0] == 256


def test_default_text_for_bytes_is_disjoint_from_the_scored_part():
    text, where = C.default_text("bytes")
    with open(C.bundled_heldout(), "rb") as f:
        scored = f.read()[: C.HELDOUT_SCORED].decode("utf-8", "ignore")
    assert len(text) > 1000 and text[:200] not in scored and "after byte" in where
    text, where = C.default_text("world")
    assert text == C.BUILTIN_TEXT and len(text.split()) > 300


@pytest.fixture(scope="module")
def captured(fp32_plan_artifact):
    ids = [i % 97 for i in ByteTokenizer().encode(C.BUILTIN_TEXT)[:40]]  # the small model's vocabulary
    return C.capture(fp32_plan_artifact, ids), ids


@pytest.mark.slow
def test_capture_records_each_npu_segments_inputs_before_the_step(fp32_plan_artifact, captured):
    from rwkv2rknn.runtime.hybrid import load_manifest
    from rwkv2rknn.runtime.ort import OrtRunner

    rows, ids = captured
    m = load_manifest(fp32_plan_artifact)
    npu = [s for s in m.segments if s.backend == "npu"]
    assert set(rows) == {s.name for s in npu} and len(npu) >= 2
    slots = {s.input: s.output for s in m.state}
    for seg in npu:
        r = rows[seg.name]
        assert len(r.feeds) == len(ids) == len(r.results)
        shift = [k for k in seg.inputs if k in slots]
        assert shift or seg.outputs == (m.logits_output,), seg.name  # the head reads activations
        for k in shift:  # the zero state first, then what the segment itself made a token before
            assert not r.feeds[0][k].any()
            if slots[k] in r.results[0]:
                np.testing.assert_array_equal(r.feeds[1][k], r.results[0][slots[k]])
        ort = OrtRunner(os.path.join(fp32_plan_artifact, seg.token.onnx), seg.name)
        again = ort.infer(r.feeds[5])
        for k in seg.outputs:
            np.testing.assert_allclose(again[k].reshape(-1), r.results[5][k].reshape(-1), atol=1e-5)


@pytest.mark.slow
def test_t_row_samples_give_the_per_token_outputs_stacked(fp32_plan_artifact, captured):
    from rwkv2rknn.runtime.hybrid import load_manifest
    from rwkv2rknn.runtime.ort import OrtRunner

    rows, _ = captured
    m = load_manifest(fp32_plan_artifact)
    slots = {s.input for s in m.state}
    seg = next(
        s for s in m.segments if s.backend == "npu" and s.seq.onnx and any(k in slots for k in s.inputs)
    )
    r = rows[seg.name]
    t = 8
    feeds = C.seq_feeds(r, t, [k for k in seg.inputs if k in slots])
    assert len(feeds) == len(r.feeds) // t
    ort = OrtRunner(os.path.join(fp32_plan_artifact, seg.seq.onnx), seg.name)
    for i in (0, 2):
        got = ort.infer(feeds[i])
        for k in seg.outputs:
            want = np.stack([x[k].reshape(-1) for x in r.results[i * t : (i + 1) * t]])
            np.testing.assert_allclose(got[k].reshape(t, -1), want, atol=1e-5)


@pytest.mark.slow
def test_dataset_lists_one_npy_per_input_per_sample(tmp_path, captured):
    rows, _ = captured
    r = next(iter(rows.values()))
    path = C.write_dataset(str(tmp_path / "ds"), r.inputs, r.feeds[:6])
    lines = open(path).read().splitlines()
    assert len(lines) == 6 and all(len(ln.split()) == len(r.inputs) for ln in lines)
    back = C.read_dataset(path)
    for j, k in enumerate(r.inputs):
        np.testing.assert_array_equal(back[3][j], r.feeds[3][k])
        assert back[3][j].dtype == np.float32


def test_accuracy_figures():
    want = [{"a": np.array([1.0, 2.0, -4.0])}, {"a": np.array([0.5, 0.0, 1.0])}]
    same = C.accuracy(want, want)
    assert same.min_cos == pytest.approx(1.0) and same.max_rel == 0.0 and same.rows == 2
    got = [{"a": np.array([1.0, 2.0, -3.6])}, {"a": np.array([0.5, 0.0, 1.0])}]
    acc = C.accuracy(got, want)
    assert acc.max_rel == pytest.approx(0.1) and acc.median_rel == pytest.approx(0.05)
    assert 0.99 < acc.min_cos < 1.0
    bad = C.accuracy([{"a": np.array([np.nan, 0, 0])}, got[1]], want)
    assert bad.min_cos == -1.0 and bad.max_rel == float("inf")
