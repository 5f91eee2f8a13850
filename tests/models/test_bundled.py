"""The bundled default model: real text, through the whole tool."""

import os
import re

import pytest

from rwkv2rknn.compiler.bundled import ensure_compiled
from rwkv2rknn.models import bundled, rwkv4
from rwkv2rknn.models.checkpoint import load_checkpoint

HELDOUT = os.path.join(os.path.dirname(bundled.CHECKPOINT), "heldout.txt")
COMMON = {
    "the",
    "and",
    "of",
    "to",
    "a",
    "in",
    "was",
    "her",
    "it",
    "i",
    "he",
    "she",
    "that",
    "not",
    "be",
    "had",
    "his",
    "as",
    "with",
    "for",
    "you",
    "but",
    "is",
    "at",
    "on",
}


@pytest.fixture(scope="module")
def sd():
    return load_checkpoint(bundled.checkpoint_path())


@pytest.fixture(scope="module")
def heldout():
    with open(HELDOUT, encoding="utf-8") as f:
        return f.read()[:3000]


@pytest.fixture(scope="module")
def bundled_artifact(tmp_path_factory):
    """Compiled through the cache path a user's first `rwkv2rknn run` takes."""
    return ensure_compiled()


def test_it_is_a_small_byte_level_rwkv4(sd):
    shape = rwkv4.check_state_dict(sd)
    assert shape.vocab == 256
    assert 1e6 <= shape.params() <= 2e7
    assert os.path.getsize(bundled.CHECKPOINT) < 16 * 2**20


@pytest.mark.slow
def test_compiled_once_then_reused(bundled_artifact):
    manifest = os.path.join(bundled_artifact, "manifest.json")
    before = os.stat(manifest).st_mtime_ns
    assert ensure_compiled() == bundled_artifact
    assert os.stat(manifest).st_mtime_ns == before


@pytest.mark.slow
def test_bits_per_byte_hybrid_npu_within_2_percent_of_onnxruntime_fp32(
    sd, heldout, bundled_artifact, tmp_path
):
    from rwkv2rknn.tools.evaluate import bits_per_byte
    from rwkv2rknn.models.export import export
    from rwkv2rknn.runtime.hybrid import HybridModel
    from rwkv2rknn.runtime.reference import PerLayerModel
    from rwkv2rknn.runtime.tokenizer import ByteTokenizer

    export(sd, str(tmp_path / "fp32"), fp32=True)
    ref = bits_per_byte(PerLayerModel(str(tmp_path / "fp32")), ByteTokenizer(), heldout)
    hybrid = HybridModel(bundled_artifact, backend="rknn-sim")
    got = bits_per_byte(hybrid, ByteTokenizer(), heldout)
    hybrid.close()
    assert ref.bits_per_byte < 3.0  # far below uniform (8 bits per byte)
    assert abs(got.bits_per_byte - ref.bits_per_byte) <= 0.02 * ref.bits_per_byte, (got, ref)


@pytest.mark.slow
def test_generation_is_mostly_english_words(bundled_artifact):
    from rwkv2rknn.runtime.generate import generate
    from rwkv2rknn.runtime.hybrid import HybridModel
    from rwkv2rknn.runtime.tokenizer import ByteTokenizer

    model = HybridModel(bundled_artifact, backend="ort")
    tok = ByteTokenizer()
    state = model.init_state()
    res = generate(
        lambda t: model.step(t, state),
        tok.encode("It was a truth "),
        300,
        temperature=0.7,
        top_p=0.9,
        seed=0,
        prefill_fn=lambda ids: model.prefill(ids, state)[-1],
    )
    text = tok.decode(res.ids)
    words = re.findall(r"[^\s]+", text)
    alpha = [w for w in words if re.fullmatch(r"[A-Za-z][a-z]*[,.;:!?\"']*", w)]
    assert len(words) >= 30
    assert len(alpha) >= 0.7 * len(words), text
    assert len({w.strip(",.;:!?\"'").lower() for w in alpha} & COMMON) >= 5, text


# A w8a8 .rknn holds one byte per weight; what it holds besides (register commands, tensor
# tables, quantisation ranges) may exceed the fp16 build's by this share at most. Measured on
# L0..L1 below (one row count, 16): 12.6%; 25.1% when each output still ended in a Squeeze.
MAX_INT8_EXTRA = 0.18


@pytest.mark.slow
def test_w8a8_layer_build_is_its_int8_weights_and_about_the_fp16_builds_other_bytes(
    bundled_artifact, tmp_path
):
    """The fused layer segment L0..L1 (256 wide, 7 MatMuls) built in columns as the compile
    builds it (its .seq.onnx as written: the columns form, MatMuls as 1x1 Convs), fp16 and w8a8
    (calibrated on random rows: the sizes do not depend on the values)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper
    from rwkv2rknn.rknn.columns import in_columns
    from rwkv2rknn.rknn.toolkit import build_in_process

    seq = os.path.join(bundled_artifact, "segments", "s003_npu_L0-L1.seq.onnx")
    assert in_columns(seq)
    m = onnx.load(seq)
    init = {t.name: t for t in m.graph.initializer}
    weights = sum(numpy_helper.to_array(init[n.input[1]]).size for n in m.graph.node if n.op_type == "Conv")
    assert weights == 5 * 256 * 256 + 2 * 256 * 1024
    rng, names = np.random.default_rng(0), []
    for j, i in enumerate(m.graph.input):
        dims = [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim][::-1]  # its rows
        np.save(
            tmp_path / f"{j}.npy",
            rng.standard_normal([16 if isinstance(d, str) else d for d in dims]).astype(np.float32),
        )
        names.append(f"{j}.npy")
    (tmp_path / "dataset.txt").write_text(" ".join(names) + "\n")
    size = {}
    for precision in ("fp16", "w8a8"):
        out = str(tmp_path / f"{precision}.rknn")
        build_in_process(
            seq,
            rknn_out=out,
            rows=(16,),
            precision=precision,
            dataset=str(tmp_path / "dataset.txt") if precision != "fp16" else "",
        ).release()
        size[precision] = os.path.getsize(out)
    other_fp16, other_int8 = size["fp16"] - 2 * weights, size["w8a8"] - weights
    print(
        f"L0..L1 at 16 rows: fp16 {size['fp16']} bytes, w8a8 {size['w8a8']} "
        f"({size['w8a8'] / size['fp16']:.3f}x); besides the weights {other_fp16} and {other_int8}"
    )
    assert 0 < other_fp16 and 0 < other_int8 <= (1 + MAX_INT8_EXTRA) * other_fp16, size
