"""cut: every segment file keeps each decomposed LayerNorm in one run of nodes, whatever order
the source graph had (rknn-toolkit2 2.5.0 otherwise fuses an RMS norm and separate ops)."""

import glob
import os

import pytest

from helpers.layernorms import layernorms, split_layernorms
from rwkv2rknn.compiler.driver import compile_model
from rwkv2rknn.compiler.ir import Options


def _torch_block(path, width=64):
    """One RWKV time-mix front as torch.onnx writes it (opset 17): LayerNormalization, the token
    shift mixed in (x * mix + shift * (1 - mix)), three projections. The mixes of the shift read
    only a graph input, so in the graph's own order (by depth) they sit between the LayerNorm's
    ReduceMean and its Sub once canonicalize has decomposed it."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln = nn.LayerNorm(width)
            self.mix = nn.Parameter(torch.rand(3, width))
            self.r, self.k, self.v = (nn.Linear(width, width, bias=False) for _ in range(3))

        def forward(self, x, shift):
            xx = self.ln(x)
            return (
                xx,
                *(
                    lin(xx * self.mix[j] + shift * (1 - self.mix[j]))
                    for j, lin in enumerate((self.r, self.k, self.v))
                ),
            )

    torch.manual_seed(0)
    torch.onnx.export(
        Block(),
        (torch.randn(1, width), torch.randn(1, width)),
        path,
        opset_version=17,
        input_names=["x", "shift"],
        output_names=["xx", "r", "k", "v"],
        dynamo=False,
    )
    return path


def test_a_torch_block_per_token_segment_keeps_its_layernorm_in_one_run(tmp_path):
    import onnx_graphsurgeon as gs
    import onnx

    src = _torch_block(str(tmp_path / "block.onnx"))
    m = compile_model(src, str(tmp_path / "art"), Options(plan_only=True))
    (seg,) = [s for s in m.segments if s.backend == "npu"]
    for rel in (seg.token.onnx, seg.seq.onnx):
        path = os.path.join(tmp_path, "art", rel)
        assert len(layernorms(path)) == 1, rel
        assert split_layernorms(path) == [], rel
    # the order the graph had: depth first is what put the LayerNorm back together
    g = gs.import_onnx(onnx.load(os.path.join(tmp_path, "art", seg.token.onnx)))
    g.toposort()
    onnx.save(gs.export_onnx(g), str(tmp_path / "by_depth.onnx"))
    assert split_layernorms(str(tmp_path / "by_depth.onnx"))


@pytest.mark.slow
@pytest.mark.parametrize("version", ["4", "5", "6", "7"])
def test_every_versions_segments_keep_each_layernorm_in_one_run(version, fp32_plan_artifact, slot_models):
    art = fp32_plan_artifact if version == "4" else slot_models(version).plan_artifact
    files = sorted(glob.glob(os.path.join(art, "segments", "*_npu_*.onnx")))
    assert len([f for f in files if not f.endswith(".seq.onnx")]) == 5  # the head on its own
    # ln0 (RWKV-4, 5.2, 6, 7 per-layer files), ln1 and ln2 of each layer, ln_out
    assert sum(len(layernorms(f)) for f in files if not f.endswith(".seq.onnx")) == 2 + 2 * 3
    for f in files:
        assert split_layernorms(f) == [], f
