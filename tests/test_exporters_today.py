"""Files made the way users make them today: torch 2.13's ``torch.onnx.export`` with the dynamo
exporter (its default opset, 20, and 18) and the legacy exporter at 17, 18 and 20, of small RWKV-4
per-layer modules (``F.layer_norm``, tests/fixtures/torch_layers.py) and of a small RWKV-7 whole
model written with ``F.group_norm``, ``F.normalize`` and ``F.layer_norm`` (the rwkv-mobile entry
layout, tests/fixtures/slot_onefile.py). Each compiles, equals the `rwkv` package's logits on
the same weights and passes ``check`` on onnxruntime; one file per RWKV version is also built with
rknn-toolkit2 and checked on its simulator."""

import numpy as np
import pytest
from click.testing import CliRunner

from fixtures.slot_onefile import export_entries
from fixtures.torch_layers import export_torch
from rwkv2rknn.cli import cli
from rwkv2rknn.compiler.driver import compile_model
from rwkv2rknn.compiler.ir import Options
from rwkv2rknn.runtime.hybrid import HybridModel

V4 = dict(layers=2, width=32, vocab=61, seed=3)
V7 = dict(layers=2, width=128, vocab=101, seed=3)
PLAN = Options(plan_only=True, prefill_rows=())
EXPORTS = {  # name -> (opset, dynamo)
    "dynamo-default": (None, True),
    "dynamo-18": (18, True),
    "legacy-17": (17, False),
    "legacy-18": (18, False),
    "legacy-20": (20, False),
}
SLOW = {"dynamo-default", "dynamo-18"}  # the dynamo exporter takes 5-15 s a file


def _params():
    return [pytest.param(name, marks=pytest.mark.slow if name in SLOW else ()) for name in EXPORTS]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """version -> (state dict, tokens, the rwkv package's logits), made once."""
    from helpers.rwkv_package import package_logits

    from rwkv2rknn.models.checkpoint import random_checkpoint, random_rwkv7, save_checkpoint

    made = {}

    def get(version):
        if version not in made:
            shape = V4 if version == "4" else V7
            sd = (random_checkpoint if version == "4" else random_rwkv7)(**shape)
            pth = str(tmp_path_factory.mktemp(f"pth{version}") / "m.pth")
            save_checkpoint(sd, pth)
            tokens = [int(t) for t in np.random.default_rng(5).integers(0, shape["vocab"], 10)]
            made[version] = sd, tokens, package_logits(pth, tokens, version)
        return made[version]

    return get


def _source(version, name, sd, tmp_path):
    opset, dynamo = EXPORTS[name]
    if version == "4":
        return export_torch(sd, str(tmp_path / "src"), opset=opset, dynamo=dynamo)
    return export_entries(sd, str(tmp_path / "m.onnx"), "7", opset=opset, dynamo=dynamo, group_norm=True)


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def _check(art, backend):
    r = CliRunner().invoke(cli, ["check", art, "--backend", backend, "--tokens", "6"])
    assert r.exit_code == 0 and "PASS" in r.output, r.output


@pytest.mark.slow
@pytest.mark.parametrize("name", _params())
@pytest.mark.parametrize("version", ["4", "7"])
def test_torch_exports_compile_to_the_model_they_are(version, name, models, tmp_path):
    sd, tokens, ref = models(version)
    src = _source(version, name, sd, tmp_path)
    art = str(tmp_path / "art")
    m = compile_model(src, art, PLAN)
    projections = 7 * V4["layers"] + 1 if version == "4" else None
    if projections:
        assert sum(s.matmuls for s in m.segments if s.backend == "npu") == projections
    # both ort loads (the store and fused step; a large model's own prepacked sessions, which
    # run token steps on the T-row graphs) against the rwkv package
    for prepack in (False, True):
        got = HybridModel(art, backend="ort", prepack=prepack).logits(tokens)
        assert _rel(got, ref) < 1e-5, f"prepack={prepack}"
    _check(art, "ort")


@pytest.mark.slow
@pytest.mark.parametrize("version,name", [("4", "dynamo-default"), ("7", "legacy-20")])
def test_torch_exports_build_and_check_on_the_simulator(version, name, models, tmp_path):
    pytest.importorskip("rknn.api")
    sd, tokens, ref = models(version)
    src = _source(version, name, sd, tmp_path)
    art = str(tmp_path / "art")
    m = compile_model(src, art, Options(prefill_rows=(), strict=True))
    assert all(s.token.rknn and not s.token.fallback for s in m.segments if s.backend == "npu")
    got = HybridModel(art, backend="rknn-sim").logits(tokens)
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.9
    assert _rel(got, ref) < 0.05
    _check(art, "rknn-sim")
