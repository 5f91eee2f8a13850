"""Modules the tests share (imported as helpers.NAME; tests/conftest.py puts tests/ on the path)."""


def random_model(tmp_path_factory, name: str, fp32: bool, **checkpoint) -> str:
    """A random RWKV checkpoint (``checkpoint``: random_checkpoint's layers, width, vocab, seed)
    exported as byte-tokenizer per-layer files into a new temporary folder; its path."""
    from rwkv2rknn.models.checkpoint import random_checkpoint
    from rwkv2rknn.models.export import export
    d = str(tmp_path_factory.mktemp(name) / ("fp32" if fp32 else "model"))
    export(random_checkpoint(**checkpoint), d, fp32=fp32, tokenizer="bytes")
    return d
