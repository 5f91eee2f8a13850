"""compile --strict and a T-row (prefill) build that rknn-toolkit2 really refuses.

The model is a whole model in one file as torch.onnx.export writes it: an embedding, a LayerNorm
written by hand whose input is reshaped after its mean is taken (``mean = x.mean(-1); d =
x.reshape(1, 1, C) - mean``), a LayerNorm after it, and the token shift of a state ``[1, 1, C]``. Its per-token
segment builds; its T-row variant is built as rows (a rank-3 state input has no columns form)
and rknn-toolkit2 2.5.0 fails on it (IndexError inside its graph passes). Without --strict that
is a warning and prefill runs token by token; with --strict it is a one-line error and nothing
is written."""

import json
import os

import pytest

from helpers.robustness import cli, env_with, error_line, partials_in, snapshot, whole_artifact

pytestmark = pytest.mark.slow  # every test here takes more than a few seconds

C, V = 64, 97


def _export(path):
    import torch

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(0)

            def p(*shape):
                return torch.nn.Parameter(torch.randn(*shape, generator=g) * 0.2)

            self.emb, self.w, self.b, self.mix = p(V, C), p(C), p(C), p(C)
            self.key, self.value, self.head = p(C, 4 * C), p(4 * C, C), p(C, V)
            self.ln1 = torch.nn.LayerNorm(C)

        def forward(self, token, shift):
            x = self.emb[token]  # [1, 1, C]
            mean = x.mean(-1, keepdim=True)
            d = x.reshape(1, 1, C) - mean
            x = d / torch.sqrt((d * d).mean(-1, keepdim=True) + 1e-5) * self.w + self.b
            xx = self.ln1(x)
            xk = xx + (shift - xx) * self.mix
            return torch.relu(xk @ self.key) ** 2 @ self.value @ self.head, xx

    torch.onnx.export(
        Model(),
        (torch.tensor([[3]]), torch.zeros(1, 1, C)),
        path,
        opset_version=17,
        input_names=["in", "L0_shift_in"],
        output_names=["logits", "L0_shift_out"],
        dynamo=False,
    )
    return path


@pytest.fixture(scope="module")
def refused(tmp_path_factory):
    return _export(str(tmp_path_factory.mktemp("strict") / "model.onnx"))


ROWS = ("--prefill-rows", "16")


def test_a_failed_t_row_build_warns_and_strict_makes_it_an_error(refused, tmp_path):
    out = tmp_path / "art"
    r = cli("compile", refused, "-o", out, *ROWS, env=env_with(RWKV2RKNN_CACHE=tmp_path / "c1"))
    assert r.returncode == 0, r.err[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    # the build really failed in the toolkit, in rows: the columns form does not take this state
    assert any(
        "T-row build as rows, not columns (input 'L0_shift_in' is [1, 1, 64]" in line
        for line in manifest["report"]
    ), manifest["report"]
    seg = "s001_npu_embed-head"
    warning = [ln for ln in r.err.splitlines() if ln.startswith("warning: ")]
    assert len(warning) == 1 and seg in warning[0] and "IndexError" in warning[0], r.err
    assert f"{seg:<28} npu~" in r.out
    (npu,) = [s for s in manifest["segments"] if s["backend"] == "npu"]
    assert "IndexError" in npu["seq_fallback"] and npu["rknn"] and not npu["seq_rknn"]
    whole_artifact(out, tokens=(1, 5))
    before = snapshot(out)

    cache = tmp_path / "c2"
    r = cli("compile", refused, "-o", out, *ROWS, "--strict", env=env_with(RWKV2RKNN_CACHE=cache))
    line = error_line(r, 1, seg, "T-row", "IndexError", "drop --strict", "--prefill-rows none")
    assert line.startswith(f"error: the T-row (prefill) build of segment {seg} failed: ")
    assert snapshot(out) == before  # the artifact of the compile before is left as it was
    assert not partials_in(tmp_path)
    assert not [e for e in os.listdir(cache / "rknn") if not e.endswith(".lock")]

    r = cli(
        "compile",
        refused,
        "-o",
        out,
        "--strict",
        "--prefill-rows",
        "none",
        env=env_with(RWKV2RKNN_CACHE=cache),
    )
    assert r.returncode == 0 and "warning" not in r.err, r.err[-2000:]
    whole_artifact(out, tokens=(1, 5))
