#!/usr/bin/env python
"""Bytes per parameter of what the board holds: a random checkpoint of a given shape (default a
0.1B-shaped RWKV-7, 12 x 768, vocabulary 65536), exported (fp16), compiled and packed; prints
the packed bytes by kind of file and per parameter.

    python bench/pack_size.py [--version 7] [--layers 12] [--width 768] [--vocab 65536]
                              [--quant fp16|w8a8] [--tokenizer bytes|world|none] [--work DIR]

A quantised build calibrates on text, so it needs a tokenizer: by default the World tokenizer for
a vocabulary of 65536, bytes for one of 256 or less (its file is packed too).
"""

import argparse
import os
import sys
import tempfile
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--version", default="7", choices=["4", "5", "6", "7"])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--quant", default="fp16")
    ap.add_argument(
        "--tokenizer",
        default=None,
        help="bytes, world or none (default: by vocabulary "
        "for a quantised build, bytes for a vocabulary of 256 or less, else none)",
    )
    ap.add_argument("--work", default=None, help="folder to keep the files in (default: temporary)")
    a = ap.parse_args()
    from rwkv2rknn.compiler.driver import compile_model
    from rwkv2rknn.compiler.ir import Options
    from rwkv2rknn.models import checkpoint
    from rwkv2rknn.models.export import export
    from rwkv2rknn.artifact.pack import pack

    work = a.work or tempfile.mkdtemp(prefix="pack-size-")
    make = {
        "4": checkpoint.random_checkpoint,
        "5": checkpoint.random_rwkv5,
        "6": checkpoint.random_rwkv6,
        "7": checkpoint.random_rwkv7,
    }[a.version]
    t0 = time.time()
    sd = make(layers=a.layers, width=a.width, vocab=a.vocab, seed=1)
    src, art, out = (os.path.join(work, x) for x in ("onnx", "art", "packed"))
    tok = a.tokenizer or (
        "bytes" if a.vocab <= 256 else "world" if a.quant != "fp16" and a.vocab == 65536 else "none"
    )
    export(sd, src, tokenizer=None if tok == "none" else tok, force=True)
    del sd
    compile_model(src, art, Options(quant=a.quant), force=True)
    t1 = time.time()
    res = pack(art, out, force=True)
    kinds = {}
    for d, _, files in os.walk(out):
        for f in files:
            kind = (
                "golden"
                if "golden" in d
                else ".rknn"
                if f.endswith(".rknn")
                else ".onnx"
                if ".onnx" in f
                else f
            )
            kinds[kind] = kinds.get(kind, 0) + os.path.getsize(os.path.join(d, f))
    print(
        f"RWKV-{a.version} {a.layers} x {a.width}, vocab {a.vocab}, {a.quant}, tokenizer {tok}: "
        f"compiled in {t1 - t0:.0f} s"
    )
    for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]):
        print(f"  {k:14s} {v:>14,d} bytes")
    print(
        f"packed {res['bytes']:,} bytes for {res['parameters']:,} parameters: "
        f"{res['bytes'] / res['parameters']:.3f} bytes per parameter"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
