"""w8a8 against fp16 on the random RWKV-5.2 / 6 / 7 test models: top-1 agreement with the fp32
files on onnxruntime and .rknn bytes.

    python bench/quant_versions.py 7 6 5        # versions; WORK=/tmp/qv to keep the files

Exports each model (tests/conftest.py's shapes) as fp32 files with the byte tokenizer, compiles
it plan-only (the fp32 reference), fp16 and `--quant w8a8 --calib-tokens 96` (both with
`--prefill-rows 16`), then runs both builds on rknn-sim teacher-forced on the last 400 bytes of
the built-in English sample: 64 tokens token by token, all of them in chunks of 16.
"""

import glob
import os
import sys
import tempfile
import time

import numpy as np

from rwkv2rknn.rknn import calibrate
from rwkv2rknn.compiler.driver import compile_model
from rwkv2rknn.compiler.ir import Options
from rwkv2rknn.models import checkpoint
from rwkv2rknn.models.export import export
from rwkv2rknn.runtime.hybrid import HybridModel
from rwkv2rknn.runtime.tokenizer import ByteTokenizer

SHAPES = {
    "7": dict(layers=3, width=192, vocab=301, seed=5),
    "6": dict(layers=3, width=192, vocab=263, seed=6),
    "5": dict(layers=3, width=128, vocab=211, seed=7),
}
MAKE = {"5": checkpoint.random_rwkv5, "6": checkpoint.random_rwkv6, "7": checkpoint.random_rwkv7}


def one(version: str, work: str) -> None:
    t0 = time.time()
    d = os.path.join(work, f"v{version}")
    export(MAKE[version](**SHAPES[version]), d + "/fp32", fp32=True, tokenizer="bytes", force=True)
    compile_model(d + "/fp32", d + "/plan", Options(plan_only=True), force=True)
    built = {}
    for q in ("fp16", "w8a8"):
        extra = dict(quant="w8a8", calib_tokens=96) if q == "w8a8" else {}
        built[q] = compile_model(d + "/fp32", f"{d}/{q}", Options(prefill_rows=(16,), **extra), force=True)
    ids = ByteTokenizer().encode(calibrate.BUILTIN_TEXT[-400:])
    ref = HybridModel(d + "/plan", backend="ort").logits(ids)
    for q, m in built.items():
        sim = HybridModel(f"{d}/{q}", backend="rknn-sim")
        try:
            step = sim.logits(ids[:64])
            chunks = sim.prefill(ids, sim.init_state(), chunk=16)
        finally:
            sim.close()
        size = sum(os.path.getsize(f) for f in glob.glob(f"{d}/{q}/segments/*.rknn"))
        npu = [s for s in m.segments if s.backend == "npu"]
        print(
            f"RWKV-{version} {q}: top-1 {np.mean(step.argmax(1) == ref[:64].argmax(1)):.3f} token by "
            f"token, {np.mean(chunks.argmax(1) == ref.argmax(1)):.3f} in chunks; max rel "
            f"{np.abs(chunks - ref).max() / np.abs(ref).max():.3f}; .rknn {size} bytes; "
            f"{[s.precision_label() for s in npu]}; layouts {[s.seq.layout or 'rows' for s in npu]}",
            flush=True,
        )
    print(f"RWKV-{version}: {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    root = os.environ.get("WORK") or tempfile.mkdtemp(prefix="quant-versions-")
    for v in sys.argv[1:] or ["7", "6", "5"]:
        one(v, root)
