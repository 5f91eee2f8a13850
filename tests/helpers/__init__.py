"""Modules the tests share (imported as helpers.NAME; tests/conftest.py puts tests/ on the path)."""


def random_model(tmp_path_factory, name: str, fp32: bool, **checkpoint) -> str:
    """A random RWKV checkpoint (``checkpoint``: random_checkpoint's layers, width, vocab, seed)
    exported as byte-tokenizer per-layer files into a new temporary folder; its path."""
    from rwkv2rknn.models.checkpoint import random_checkpoint
    from rwkv2rknn.models.export import export

    d = str(tmp_path_factory.mktemp(name) / ("fp32" if fp32 else "model"))
    export(random_checkpoint(**checkpoint), d, fp32=fp32, tokenizer="bytes")
    return d


def hot_checkpoint(scale: float, **checkpoint) -> dict:
    """A random RWKV-4 checkpoint (random_checkpoint's ``checkpoint``) whose FFN key weights are
    ``scale`` times larger and value weights ``scale``**2 smaller: relu(k)^2 far above fp16's
    65504, the same outputs in exact arithmetic."""
    from rwkv2rknn.models.checkpoint import random_checkpoint

    sd = random_checkpoint(**checkpoint)
    for i in range(checkpoint["layers"]):
        sd[f"blocks.{i}.ffn.key.weight"] *= scale
        sd[f"blocks.{i}.ffn.value.weight"] /= scale**2
    return sd


def start_cached_compile(model, out, cache, *flags, merge_output: bool = False):
    """``rwkv2rknn compile MODEL -o OUT FLAGS`` in its own process, its build cache in ``cache``
    (text pipes; ``merge_output``: stderr into stdout, one stream in the order written)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, RWKV2RKNN_CACHE=str(cache))
    return subprocess.Popen(
        [sys.executable, "-m", "rwkv2rknn", "compile", str(model), "-o", str(out), *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merge_output else subprocess.PIPE,
        env=env,
        text=True,
    )


def npu_segments_whole(art) -> list:
    """The NPU segments of the artifact ``art``'s manifest.json (as written: dicts), after
    checking that each of their builds (.rknn, .seq.rknn) has the checksum the manifest records."""
    import json
    import os

    from rwkv2rknn.artifact.plan import sha256_file

    with open(os.path.join(art, "manifest.json")) as f:
        m = json.load(f)
    npu = [s for s in m["segments"] if s["backend"] == "npu"]
    for s in npu:
        for k in ("rknn", "seq_rknn"):
            if s[k]:
                assert sha256_file(os.path.join(art, s[k])) == s[k + "_sha256"], (s["name"], k)
    return npu
