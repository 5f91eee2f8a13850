"""RWKV-5.2, 6 and 7: the per-layer export against the `rwkv` package, one test per version."""

import numpy as np
import pytest

from rwkv2rknn.models.checkpoint import random_rwkv6, random_rwkv7, save_checkpoint
from rwkv2rknn.models.export import export
from rwkv2rknn.runtime.reference import PerLayerModel

# the fp16 files' largest error, as a share of the logit scale (RWKV-5.2: top-1 only)
FP16_MAX_REL = {"5": None, "6": 0.01, "7": 0.01}
VOCAB = {"5": 211, "6": 263, "7": 301}  # the session models' odd vocabularies (conftest.py)


@pytest.mark.slow
@pytest.mark.parametrize("version", ["5", "6", "7"])
def test_exports_equal_the_rwkv_package(slot_models, version):
    sm = slot_models(version)
    ref = sm.reference
    got32 = PerLayerModel(sm.dirs["fp32"]).logits(sm.tokens)
    got16 = PerLayerModel(sm.dirs["fp16"]).logits(sm.tokens)
    assert got32.shape == got16.shape == ref.shape == (40, VOCAB[version])
    scale = np.abs(ref).max()
    assert np.abs(got32 - ref).max() <= 1e-4 * scale
    assert (got16.argmax(1) == ref.argmax(1)).mean() >= 0.97
    if FP16_MAX_REL[version] is not None:
        assert np.abs(got16 - ref).max() <= FP16_MAX_REL[version] * scale
    assert len(set(ref.argmax(1))) > 10  # the logits really depend on the tokens


@pytest.mark.slow
@pytest.mark.parametrize(
    "version,make",
    [
        ("6", lambda: random_rwkv6(layers=2, width=128, vocab=97, seed=9, lora={"maa": 12, "decay": 28})),
        (
            "7",
            lambda: random_rwkv7(
                layers=2,
                width=128,
                vocab=97,
                seed=9,  # 2 heads
                lora={"w": 24, "a": 28, "v": 12, "g": 40},
            ),
        ),
    ],
    ids=["6", "7"],
)
def test_two_layer_128_wide_other_lora_widths(tmp_path, version, make):
    """Another odd shape, with LoRA widths of its own."""
    from helpers.rwkv_package import package_logits

    sd = make()
    pth = str(tmp_path / "m.pth")
    save_checkpoint(sd, pth)
    tokens = [int(t) for t in np.random.default_rng(1).integers(0, 97, 40)]
    ref = package_logits(pth, tokens, version, str(tmp_path))
    export(sd, str(tmp_path / "fp32"), fp32=True)
    got = PerLayerModel(str(tmp_path / "fp32")).logits(tokens)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
