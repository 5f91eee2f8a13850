"""A quantised build records how it was quantised (plan.Build.quant), and rknn-sim rebuilds it
that way: a changed default never changes what `check` simulates for an old artifact."""

import json
import os
import shutil

import numpy as np
import pytest

import rwkv2rknn.rknn.toolkit as toolkit
from rwkv2rknn.artifact.plan import MANIFEST, QUANT_BEFORE_RECORD, Manifest
from rwkv2rknn.runtime.hybrid import HybridModel, load_manifest


def _manifest(art):
    with open(os.path.join(art, MANIFEST)) as f:
        return json.load(f)


@pytest.mark.slow
def test_a_manifest_without_the_record_reads_as_the_settings_it_was_built_with(w8a8_artifact):
    d = _manifest(w8a8_artifact)
    npu = [s for s in d["segments"] if s["backend"] == "npu"]
    assert npu and all(s["quant"] == {"algorithm": "normal", "method": "channel"} for s in npu)
    assert all(s["seq_quant"] == s["quant"] for s in npu if s.get("seq_rknn"))
    assert all(s["quant"] == {} for s in d["segments"] if s["backend"] == "cpu")
    for s in d["segments"]:  # as an artifact written before the record was kept
        s.pop("quant", None)
        s.pop("seq_quant", None)
    old = Manifest.from_dict(d)
    for s in old.segments:
        want = QUANT_BEFORE_RECORD if s.token.precision != "fp16" else {}
        assert s.token.quant == want and s.token.quant == want
        assert s.seq.quant == (QUANT_BEFORE_RECORD if s.seq.precision != "fp16" else {})
    d["segments"][0]["quant"] = "normal"
    with pytest.raises(Exception, match="'quant' should be dict"):
        Manifest.from_dict(d)


def _logits(art, ids):
    sim = HybridModel(art, backend="rknn-sim")
    try:
        return sim.logits(ids)
    finally:
        sim.close()


@pytest.mark.slow
def test_the_simulator_rebuilds_with_the_recorded_settings_not_todays(w8a8_artifact, tmp_path, monkeypatch):
    ids = list(b"The ferry left the harbour at noon.")
    recorded = _logits(w8a8_artifact, ids)
    # another default today: the old artifact still simulates as it was built
    monkeypatch.setattr(toolkit, "QUANT_ALGORITHM", "mmse")
    monkeypatch.setattr(toolkit, "QUANT_METHOD", "layer")
    assert np.array_equal(_logits(w8a8_artifact, ids), recorded)
    monkeypatch.undo()
    # and the record is what the simulator follows: the same artifact recording mmse/layer
    other = str(tmp_path / "mmse")
    shutil.copytree(w8a8_artifact, other)
    d = _manifest(other)
    for s in d["segments"]:
        for k in ("quant", "seq_quant"):
            if s.get(k):
                s[k] = {"algorithm": "mmse", "method": "layer"}
    with open(os.path.join(other, MANIFEST), "w") as f:
        json.dump(d, f)
    assert {s.token.quant["algorithm"] for s in load_manifest(other).segments if s.token.quant} == {"mmse"}
    changed = _logits(other, ids)
    assert np.isfinite(changed).all() and not np.array_equal(changed, recorded)
