"""Export parity with the reference implementation (the `rwkv` package, cpu fp32)."""

import os

import numpy as np
import pytest

from rwkv2rknn.errors import BadInput
from rwkv2rknn.models.checkpoint import random_checkpoint, save_checkpoint
from rwkv2rknn.models.export import export
from rwkv2rknn.runtime.reference import PerLayerModel

SHAPES = [
    dict(layers=2, width=32, vocab=64, seed=11),
    dict(layers=3, width=48, vocab=97, seed=12),
    dict(layers=4, width=72, vocab=300, seed=13),
]


@pytest.fixture(scope="module")
def parity_models(tmp_path_factory):
    """Per shape: the checkpoint, its .pth, 36 seeded tokens and the `rwkv` package's logits
    (cpu fp32; one child process for every shape)."""
    from helpers.rwkv_package import package_logits_each

    made = []
    for i, shape in enumerate(SHAPES):
        sd = random_checkpoint(**shape)
        pth = str(tmp_path_factory.mktemp(f"parity{i}") / "m.pth")
        save_checkpoint(sd, pth)
        made.append((sd, pth, [int(t) for t in np.random.default_rng(0).integers(0, shape["vocab"], 36)]))
    refs = package_logits_each([(pth, tokens) for _, pth, tokens in made], "4")
    return [m + (ref,) for m, ref in zip(made, refs)]


@pytest.mark.slow
@pytest.mark.parametrize(
    "index", range(len(SHAPES)), ids=[f"{s['layers']}x{s['width']}v{s['vocab']}" for s in SHAPES]
)
def test_parity_with_rwkv_package(index, parity_models, tmp_path):
    sd, pth, tokens, ref = parity_models[index]
    export(sd, str(tmp_path / "fp32"), fp32=True)
    export(sd, str(tmp_path / "fp16"))
    got32 = PerLayerModel(str(tmp_path / "fp32")).logits(tokens)
    got16 = PerLayerModel(str(tmp_path / "fp16")).logits(tokens)
    scale = np.abs(ref).max()
    assert np.abs(got32 - ref).max() <= 1e-4 * scale
    assert (got16.argmax(1) == ref.argmax(1)).mean() >= 0.97


def test_export_writes_the_public_layout(fp16_dir):
    import onnx

    names = sorted(os.listdir(fp16_dir))
    assert names == sorted(
        ["embed.onnx", "head.onnx", "mixing_0.onnx", "mixing_1.onnx", "mixing_2.onnx", "rwkv2rknn-model.json"]
    )
    m = onnx.load(os.path.join(fp16_dir, "mixing_1.onnx"))
    elem = {i.name: i.type.tensor_type.elem_type for i in list(m.graph.input) + list(m.graph.output)}
    assert elem == {"input": 10, "state_in": 10, "output": 10, "state_out": 10}  # float16
    dims = [d.dim_value for d in m.graph.input[1].type.tensor_type.shape.dim]
    assert dims == [5, 48]
    ops = {n.op_type for n in m.graph.node}
    assert "Cast" in ops  # the converter's fp32 islands around Max, as in the public files
    e = onnx.load(os.path.join(fp16_dir, "embed.onnx"))
    assert e.graph.input[0].type.tensor_type.elem_type == 6  # int32 token


def test_refuses_folder_with_other_files(small_sd, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(BadInput, match="holds other files"):
        export(small_sd, str(out))
    assert os.listdir(out) == ["notes.txt"]
    assert not [p for p in os.listdir(tmp_path) if "partial" in p]


def test_failure_midway_leaves_nothing(small_sd, tmp_path, monkeypatch):
    from rwkv2rknn.models import rwkv4

    def boom(sd):
        raise RuntimeError("disk full")

    monkeypatch.setattr(rwkv4, "head_graph", boom)
    with pytest.raises(RuntimeError):
        export(small_sd, str(tmp_path / "out"))
    assert os.listdir(tmp_path) == []


def test_public_recipe_files_run_in_reference(small_sd, tmp_path, tokens):
    """Files made by torch.onnx.export (opset 16) + onnxconverter-common fp16, as published."""
    from helpers.public_recipe import export_public

    pub = export_public(small_sd, str(tmp_path / "pub"))
    model = PerLayerModel(pub)
    assert model.notes == []  # onnxruntime's known fusion fault is avoided, not reported
    export(small_sd, str(tmp_path / "ours"), fp32=True)
    ours = PerLayerModel(str(tmp_path / "ours")).logits(tokens[:16])
    theirs = model.logits(tokens[:16])
    assert (ours.argmax(1) == theirs.argmax(1)).mean() >= 0.9
    assert np.abs(ours - theirs).max() <= 0.02 * np.abs(ours).max()


@pytest.mark.parametrize("fp32", [True, False])
def test_one_file_is_written_stage_by_stage_as_onnx_would_save_it(fp32, tmp_path):
    """export to one .onnx file writes one stage at a time (a whole ModelProto of a 430M model did not fit
    in 12 GB); the bytes are what onnx.save writes for the joined model."""
    from onnx import helper
    from rwkv2rknn import fileio
    from rwkv2rknn.models.checkpoint import random_rwkv7
    from rwkv2rknn.models.export import METADATA_PREFIX, export, whole_model

    sd = random_rwkv7(layers=2, width=128, vocab=97, seed=2)
    path = str(tmp_path / "m.onnx")
    export(sd, path, fp32=fp32, tokenizer="bytes")
    model, _, arch = whole_model(sd, fp32)
    helper.set_model_props(
        model,
        {
            METADATA_PREFIX + "arch": arch.ARCH,
            METADATA_PREFIX + "tokenizer": "bytes",
            METADATA_PREFIX + "dtype": "float32" if fp32 else "float16",
        },
    )
    fileio.save_onnx_file(model, str(tmp_path / "joined.onnx"))
    assert open(path, "rb").read() == (tmp_path / "joined.onnx").read_bytes()
    with pytest.raises(BadInput, match="exists"):
        export(sd, path, fp32=fp32)
    assert sorted(os.listdir(tmp_path)) == ["joined.onnx", "m.onnx"]  # no scratch left
