"""compile --quant w8a8 --quant-float residual: the residual stream float16 in per-token builds
(the toolkit's hybrid quantisation), recorded in the build's quant record, keyed in the build
cache, followed by rknn-sim, refused where there are T-row builds."""

import json
import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from rwkv2rknn.artifact.plan import MANIFEST
from rwkv2rknn.cli import cli
from rwkv2rknn.rknn.build import _quant_variant, quant_settings
from rwkv2rknn.runtime.hybrid import HybridModel, load_manifest
from rwkv2rknn.tools.check import run_check
from conftest import W8A8_OPTIONS

CALIB = str(W8A8_OPTIONS["calib_tokens"])


def _compile(byte_model, out, *more):
    args = ["compile", byte_model, "-o", str(out), "--quant", "w8a8", "--calib-tokens", CALIB, *more]
    return CliRunner().invoke(cli, args)


@pytest.mark.parametrize(
    "more, says",
    [
        ([], "--quant-float needs per-token builds"),  # the default --prefill-rows builds T rows
        (["--prefill-rows", "4,8"], "add --prefill-rows none"),
        (["--prefill-rows", "none", "--quant", "w16a16i"], "--quant-float is for w8a8 builds"),
        (["--prefill-rows", "none", "--quant", "fp16"], "--quant-float is for w8a8 builds"),
    ],
)
def test_it_is_refused_with_one_line_where_it_cannot_be_built(byte_model, tmp_path, more, says):
    r = _compile(byte_model, tmp_path / "art", "--quant-float", "residual", *more)
    assert r.exit_code != 0 and says in r.output
    assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output
    assert not os.path.exists(tmp_path / "art")  # refused before any pass ran


def test_an_unknown_group_is_refused(byte_model, tmp_path):
    r = _compile(byte_model, tmp_path / "art", "--quant-float", "norm", "--prefill-rows", "none")
    assert r.exit_code != 0 and "--quant-float 'norm' is not a tensor group: use residual" in r.output


def test_the_record_and_the_cache_key_hold_the_float_groups():
    assert "float" not in quant_settings()  # records and keys of builds without it unchanged
    assert quant_settings(("residual",))["float"] == "residual"
    assert _quant_variant("w8a8", "d") != _quant_variant("w8a8", "d", ("residual",))
    assert _quant_variant("w8a8", "d", ()) == _quant_variant("w8a8", "d")


def _kl(art):
    # decode only: with per-token builds the prompt path runs the same builds
    rep, _ = run_check(art, 128, backend="rknn-sim", prefill=False)
    return rep.to_dict()["quality"]["kl"]["mean"]


@pytest.mark.slow
def test_the_residual_stream_in_float16_is_recorded_rebuilt_and_lowers_kl(byte_model, tmp_path):
    plain, floated = tmp_path / "plain", tmp_path / "float"
    r = _compile(byte_model, plain, "--prefill-rows", "none")
    assert r.exit_code == 0, r.output
    r = _compile(byte_model, floated, "--prefill-rows", "none", "--quant-float", "residual")
    assert r.exit_code == 0, r.output
    # a new build cache entry for every quantised segment: none came from the plain compile's
    assert "0 from the cache" in r.output and "fell back" in r.output
    npu = [s for s in load_manifest(str(floated)).segments if s.backend == "npu"]
    assert npu and all(s.token.precision == "w8a8" for s in npu)
    assert all(s.token.quant["float"] == "residual" and not s.seq.rknn for s in npu)
    assert all("float" not in s.token.quant for s in load_manifest(str(plain)).segments)
    # float16 tensors cost bytes (16-bit activations where int8 ones were)
    size = {a: sum(os.path.getsize(os.path.join(a, s.token.rknn)) for s in npu) for a in (plain, floated)}
    assert size[floated] > size[plain]
    # rknn-sim rebuilds it as recorded: without the record it simulates the plain build
    ids = list(b"The ferry left the harbour at noon.")
    bare = tmp_path / "bare"
    shutil.copytree(floated, bare)
    d = json.load(open(bare / MANIFEST))
    for s in d["segments"]:
        (s.get("quant") or {}).pop("float", None)
    json.dump(d, open(bare / MANIFEST, "w"))
    got = {}
    for a in (floated, bare, plain):
        sim = HybridModel(str(a), backend="rknn-sim")
        try:
            got[a] = sim.logits(ids)
        finally:
            sim.close()
    assert np.array_equal(got[bare], got[plain]) and not np.array_equal(got[floated], got[plain])
    # and on text the float16 residual stream is closer to fp32
    assert _kl(str(floated)) < _kl(str(plain))
