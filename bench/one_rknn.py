"""Size and build time of one .rknn per NPU segment (2 rows for decode + the prefill row counts)
against the earlier two builds (a per-token .rknn and a T-row .rknn for the prefill rows).

    python bench/one_rknn.py ARTIFACT      # an artifact compiled with --plan-only (has .seq.onnx)

Builds in child processes with rknn-toolkit2, like the compiler; prints bytes and seconds per
segment and in total. Times are wall times on a shared machine: compare them as ratios.
"""

import glob
import os
import sys
import tempfile
import time

from rwkv2rknn.compiler.driver import build_rknn


def main(artifact: str, rows=(16, 32, 64)) -> None:
    segs = sorted(glob.glob(os.path.join(artifact, "segments", "s*_npu_*.seq.onnx")))
    if not segs:
        sys.exit(f"{artifact} has no NPU T-row segments (compile it with --plan-only first)")
    totals = {"two builds": [0, 0.0], "one build": [0, 0.0]}
    work = tempfile.mkdtemp(prefix="one-rknn-")
    print(f"{'segment':<28} {'per-token':>10} {'T-rows':>10} {'one .rknn':>10}  (bytes)")
    for seq in segs:
        out = {}
        for label, path, r in (
            ("tok", seq.replace(".seq.onnx", ".onnx"), ()),
            ("seq", seq, rows),
            ("one", seq, (2,) + tuple(rows)),
        ):
            dst = os.path.join(work, f"{os.path.basename(path)}.{label}.rknn")
            t0 = time.perf_counter()
            why = build_rknn(path, dst, rows=r)
            if why:
                sys.exit(f"{os.path.basename(path)}: {why}")
            out[label] = (os.path.getsize(dst), time.perf_counter() - t0)
        totals["two builds"][0] += out["tok"][0] + out["seq"][0]
        totals["two builds"][1] += out["tok"][1] + out["seq"][1]
        totals["one build"][0] += out["one"][0]
        totals["one build"][1] += out["one"][1]
        name = os.path.basename(seq)[: -len(".seq.onnx")]
        print(f"{name:<28} {out['tok'][0]:>10} {out['seq'][0]:>10} {out['one'][0]:>10}")
    (b2, t2), (b1, t1) = totals["two builds"], totals["one build"]
    print(
        f"total: two builds {b2} bytes in {t2:.1f} s; one build {b1} bytes in {t1:.1f} s "
        f"({b1 / b2:.2f}x the bytes, {t1 / t2:.2f}x the build time)"
    )


if __name__ == "__main__":
    main(sys.argv[1])
