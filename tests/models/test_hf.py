"""Hugging Face model folders as `export` input (models/hf.py): stand-ins with the published key
names, shapes and config fields (tests/fixtures/hf_folders.py) read back to the official layout
exactly, exported, compiled and run against the `rwkv` package on the same weights in the
official layout (1e-4 relative, fp32); and every refused format named with its fix."""

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

from fixtures import hf_folders
from rwkv2rknn.cli import cli
from rwkv2rknn.errors import BadInput, UnsupportedModel
from rwkv2rknn.models import checkpoint
from rwkv2rknn.models.checkpoint import load_model

SHAPES = {
    "4": dict(layers=2, width=32, vocab=61, seed=11),
    "5": dict(layers=2, width=128, vocab=67, seed=12),
    "6": dict(layers=2, width=128, vocab=71, seed=13),
    "7": dict(layers=2, width=128, vocab=73, seed=14),
}
MAKERS = {
    "4": checkpoint.random_checkpoint,
    "5": checkpoint.random_rwkv5,
    "6": checkpoint.random_rwkv6,
    "7": checkpoint.random_rwkv7,
}
FORMAT = {
    "4": "RWKV-4 (transformers)",
    "5": "RWKV-5 (Hugging Face)",
    "6": "RWKV-6 (Hugging Face)",
    "7": "RWKV-7 (flash-linear-attention)",
}


@pytest.fixture(scope="module")
def sds():
    made = {}
    return lambda v: made.setdefault(v, MAKERS[v](**SHAPES[v]))


def _same(got, sd, rtol=0.0):
    assert sorted(got) == sorted(sd)
    for k in sd:
        assert got[k].shape == sd[k].shape, k
        np.testing.assert_allclose(got[k], sd[k], rtol=rtol, atol=0, err_msg=k)


@pytest.mark.parametrize(
    "version,weights",
    [
        ("4", "safetensors"),
        ("4", "bin"),
        ("5", "bin"),
        ("6", "sharded"),
        ("7", "safetensors"),
        ("7", "sharded"),
    ],
)
def test_folder_reads_back_to_the_official_layout(version, weights, sds, tmp_path):
    sd = sds(version)
    folder = hf_folders.save_folder(sd, str(tmp_path / "hf"), version, weights)
    got, tok, what = load_model(folder)
    _same(got, sd)
    assert what == FORMAT[version]
    assert tok == os.path.join(folder, "tokenizer.json")
    # the weights file (or the shard index) itself reads the same
    name = {
        "safetensors": "model.safetensors",
        "bin": "pytorch_model.bin",
        "sharded": "model.safetensors.index.json",
    }[weights]
    _same(load_model(os.path.join(folder, name))[0], sd)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_safetensors_read_as_torch_rounds_them(dtype, sds, tmp_path):
    import torch

    sd = sds("7")
    folder = hf_folders.save_folder(sd, str(tmp_path / "hf"), "7", dtype=dtype)
    got = load_model(folder)[0]
    want = {k: torch.from_numpy(v).to(getattr(torch, dtype)).float().numpy() for k, v in sd.items()}
    _same(got, want)
    assert any(not np.array_equal(got[k], sd[k]) for k in sd)  # it was rounded


def test_fla_packed_mix_and_a_tied_head(sds, tmp_path):
    sd = dict(sds("7"))
    sd["head.weight"] = sd["emb.weight"]
    folder = hf_folders.save_folder(sd, str(tmp_path / "hf"), "7", packed_mix=True, tie_head=True)
    _same(load_model(folder)[0], sd)


@pytest.mark.slow
@pytest.mark.parametrize("version", ["4", "5", "6", "7"])
def test_export_of_a_folder_runs_like_the_rwkv_package(version, sds, tmp_path):
    """`export FOLDER` (the folder's tokenizer.json recorded and copied), compile, run on ort:
    the rwkv package's logits on the same weights saved as an official .pth."""
    from helpers.rwkv_package import package_logits

    from rwkv2rknn.compiler.driver import compile_model
    from rwkv2rknn.compiler.ir import Options
    from rwkv2rknn.runtime.hybrid import HybridModel

    sd = sds(version)
    folder = hf_folders.save_folder(
        sd, str(tmp_path / "hf"), version, "sharded" if version == "6" else "safetensors"
    )
    out = tmp_path / "onnx"
    r = CliRunner().invoke(cli, ["export", folder, "-o", str(out), "--fp32"])
    assert r.exit_code == 0, r.output
    assert f"from {FORMAT[version]}" in r.output
    record = json.loads((out / "rwkv2rknn-model.json").read_text())
    assert record["tokenizer"] == "tokenizer.json" and (out / "tokenizer.json").is_file()
    art = str(tmp_path / "art")
    compile_model(str(out), art, Options(plan_only=True, prefill_rows=()))
    pth = str(tmp_path / "official.pth")
    checkpoint.save_checkpoint(sd, pth)
    tokens = [int(t) for t in np.random.default_rng(3).integers(0, SHAPES[version]["vocab"], 8)]
    ref = package_logits(pth, tokens, version)
    model = HybridModel(art, backend="ort")
    got = model.logits(tokens)
    assert float(np.abs(got - ref).max() / np.abs(ref).max()) < 1e-4
    from rwkv2rknn.runtime.loader import artifact_tokenizer
    from rwkv2rknn.runtime.tokenizer import load_tokenizer

    assert model.manifest.tokenizer == "tokenizer/tokenizer.json"  # bundled into the artifact
    tok = load_tokenizer(artifact_tokenizer(model.manifest.tokenizer, art))
    assert tok.vocab_size == SHAPES[version]["vocab"] and tok.encode("w5 w7") == [5, 7]


def test_one_file_export_of_a_folder_records_its_tokenizer(sds, tmp_path):
    folder = hf_folders.save_folder(sds("4"), str(tmp_path / "hf"), "4", "bin")
    out = str(tmp_path / "m.onnx")
    r = CliRunner().invoke(cli, ["export", os.path.join(folder, "pytorch_model.bin"), "-o", out])
    assert r.exit_code == 0, r.output
    import onnx

    props = {p.key: p.value for p in onnx.load(out, load_external_data=False).metadata_props}
    assert props["rwkv2rknn.tokenizer"] == os.path.join(folder, "tokenizer.json")


# ------------------------------------------------------------------------------ refusals


def _refused(args, *words, code=1):
    r = CliRunner().invoke(cli, ["export", *map(str, args)])
    assert r.exit_code == code, r.output
    line = r.output.strip().splitlines()[-1]
    assert "Traceback" not in r.output
    for w in words:
        assert w in line, line
    return line


def test_other_families_are_named(tmp_path):
    folder = tmp_path / "llama"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"})
    )
    import torch

    torch.save(
        {
            "model.embed_tokens.weight": torch.zeros(4, 2),
            "model.layers.0.self_attn.q_proj.weight": torch.zeros(2, 2),
        },
        str(folder / "pytorch_model.bin"),
    )
    _refused(
        [folder, "-o", tmp_path / "o"],
        "LlamaForCausalLM model, not an RWKV checkpoint",
        "Rwkv5/Rwkv6ForCausalLM",
        "RWKV7ForCausalLM",
    )
    _refused([folder / "pytorch_model.bin", "-o", tmp_path / "o"], "LlamaForCausalLM")


def test_the_rwkv_packages_converted_file_is_named(sds, tmp_path):
    """convert_and_save_and_exit writes '_strategy' (and transposed, cast weights)."""
    import torch

    sd = {k: torch.from_numpy(v.T.copy() if v.ndim == 2 else v) for k, v in sds("4").items()}
    sd["_strategy"] = "cpu fp32"
    sd["_version"] = "0.7"
    sd["_rescale_layer"] = 0
    torch.save(sd, str(tmp_path / "conv.pth"))
    _refused(
        [tmp_path / "conv.pth", "-o", tmp_path / "o"],
        "converted by the rwkv package",
        "give the original checkpoint",
    )


def test_other_files_are_named(tmp_path, fp32_dir):
    (tmp_path / "m.gguf").write_bytes(b"GGUF" + b"\0" * 60)
    _refused([tmp_path / "m.gguf", "-o", tmp_path / "o"], "GGUF", "original .pth")
    _refused([os.path.join(fp32_dir, "head.onnx"), "-o", tmp_path / "o"], "ONNX file", "rwkv2rknn compile")
    _refused([fp32_dir, "-o", tmp_path / "o"], "holds ONNX files", "rwkv2rknn compile")
    empty = tmp_path / "empty"
    empty.mkdir()
    _refused([empty, "-o", tmp_path / "o"], "holds no model weights")
    (tmp_path / "config.json").write_text("{}")
    _refused(
        [tmp_path / "config.json", "-o", tmp_path / "o"], "JSON file", "model folder or its weights file"
    )


def test_a_missing_shard_is_named(sds, tmp_path):
    folder = hf_folders.save_folder(sds("7"), str(tmp_path / "hf"), "7", "sharded")
    os.remove(os.path.join(folder, "model-00002-of-00002.safetensors"))
    with pytest.raises(
        BadInput,
        match="shard 'model-00002-of-00002.safetensors' listed in 'model.safetensors.index.json' is missing",
    ):
        load_model(folder)


def test_a_truncated_safetensors_is_named(sds, tmp_path):
    folder = hf_folders.save_folder(sds("4"), str(tmp_path / "hf"), "4")
    p = os.path.join(folder, "model.safetensors")
    blob = open(p, "rb").read()
    open(p, "wb").write(blob[: len(blob) // 2])
    with pytest.raises(BadInput, match="cannot read .*model.safetensors' as safetensors.*download it again"):
        load_model(folder)


def test_an_fla_variant_with_unknown_tensors_is_refused(sds, tmp_path):
    from safetensors.numpy import save_file

    keys = hf_folders.fla_keys(sds("7"))
    keys["model.layers.0.attn.extra_gate.weight"] = np.zeros((2, 2), np.float32)
    save_file(
        {k: np.ascontiguousarray(v, np.float32) for k, v in keys.items()}, str(tmp_path / "model.safetensors")
    )
    with pytest.raises(
        UnsupportedModel, match="unexpected key 'attn.extra_gate.weight' in an fla-hub RWKV-7 checkpoint"
    ):
        load_model(str(tmp_path / "model.safetensors"))


# ------------------------------------------------------------------------------ tokenizers


def test_a_tokenizer_that_does_not_fit_is_refused(sds, tmp_path):
    pth = str(tmp_path / "m.pth")
    checkpoint.save_checkpoint(sds("4"), pth)  # vocab 61
    small = hf_folders.tokenizer_json(str(tmp_path / "tok300.json"), 300)
    _refused(
        [pth, "-o", tmp_path / "o", "--tokenizer", small],
        "has 300 tokens, the model 61",
        "the tokenizer the model was trained with",
    )
    folder = hf_folders.save_folder(sds("4"), str(tmp_path / "hf"), "4", tokenizer=False)
    hf_folders.tokenizer_json(os.path.join(folder, "tokenizer.json"), 3)
    _refused([folder, "-o", tmp_path / "o"], "has 3 tokens, the model 61")
    assert not os.path.exists(tmp_path / "o")


def test_export_without_a_fitting_tokenizer_says_so(sds, tmp_path):
    pth = str(tmp_path / "m.pth")
    checkpoint.save_checkpoint(sds("4"), pth)
    r = CliRunner().invoke(cli, ["export", pth, "-o", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    assert (
        r.stderr.strip()
        .splitlines()[-1]
        .startswith(
            "warning: no tokenizer recorded: none of the built-in ones (bytes 256, world 65536) has "
            "61 tokens; export again with --tokenizer PATH/tokenizer.json"
        )
    ), r.stderr


def test_export_help_lists_the_formats():
    r = CliRunner().invoke(cli, ["export", "--help"])
    assert r.exit_code == 0
    for name in (
        "RwkvForCausalLM",
        "Rwkv5ForCausalLM",
        "RWKV7ForCausalLM",
        ".safetensors",
        "pytorch_model.bin",
        "index.json",
        "one .onnx",
        "docs/formats.md",
    ):
        assert name in r.output, name


def test_compile_of_a_checkpoint_says_export_it_first(sds, tmp_path):
    folder = hf_folders.save_folder(sds("4"), str(tmp_path / "hf"), "4")
    pth = str(tmp_path / "m.pth")
    checkpoint.save_checkpoint(sds("4"), pth)
    for given in (folder, os.path.join(folder, "model.safetensors"), pth):
        r = CliRunner().invoke(cli, ["compile", given, "-o", str(tmp_path / "art"), "--plan-only"])
        assert r.exit_code == 1, r.output
        line = r.output.strip().splitlines()[-1]
        assert "not ONNX" in line and f"export it first: rwkv2rknn export {given} -o model/" in line


def test_rwkv6_time_decay_saved_per_head_reads_as_the_pth_has_it(sds, tmp_path):
    """A freshly initialised Rwkv6ForCausalLM keeps time_decay as [H, N]; the .pth has [1, 1, C]."""
    from safetensors.numpy import save_file

    sd = sds("6")
    keys = hf_folders.transformers_keys(sd)
    for k in [k for k in keys if k.endswith("attention.time_decay")]:
        keys[k] = keys[k].reshape(2, 64)
    save_file(
        {k: np.ascontiguousarray(v, np.float32) for k, v in keys.items()}, str(tmp_path / "model.safetensors")
    )
    got, tok, what = load_model(str(tmp_path / "model.safetensors"))
    _same(got, sd)
    assert tok is None and what == FORMAT["6"]
