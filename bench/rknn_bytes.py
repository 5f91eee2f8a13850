#!/usr/bin/env python
"""What the bytes of each NPU segment's .rknn are, fp16 against w8a8: weights, the first row
count's commands, each further row count, the three-core commands, the metadata.

    rwkv2rknn compile MODEL -o ART --quant w8a8      # for its calibration datasets (calib/)
    python bench/rknn_bytes.py ART [--rows 2,16,64]

Each segment's T-row ONNX is built alone (as the compile built it: the file as written, in columns
where ``seq_layout`` says so, w8a8 from the artifact's calibration dataset) in a child process, with the toolkit's
verbose log: its "Total Weight Memory Size" is the weights (with biases and per-channel
constants). The other parts come from builds of fewer row counts (the largest alone, then the
decode rows added, then the rest) and one with ``single_core_mode``; the metadata is the JSON the
toolkit appends after the model and the Python dict of input attributes and quantisation ranges
it stores in it. Numbers are bytes.
"""

import argparse
import json
import os
import re
import struct
import subprocess
import sys
import tempfile

CHILD = r"""
import json, sys
from rwkv2rknn.rknn.toolkit import build_in_process
a = json.loads(sys.argv[1])
rk = build_in_process(a["onnx"], rknn_out=a["out"], rows=tuple(a["rows"]), precision=a["precision"],
                      dataset=a["dataset"], verbose=True, config=a["config"])
rk.release()
"""


def build(onnx, rows, precision, dataset, config, work):
    out = os.path.join(work, "out.rknn")
    arg = dict(
        onnx=os.path.abspath(onnx),
        out=out,
        rows=list(rows),
        precision=precision,
        dataset=dataset and os.path.abspath(dataset),
        config=config,
    )
    res = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(arg)], cwd=work, capture_output=True, text=True
    )
    if res.returncode != 0 or not os.path.isfile(out):
        sys.exit(f"{os.path.basename(onnx)} {precision} rows {rows}: build failed\n{res.stderr[-2000:]}")
    m = re.search(r"Total Weight Memory Size: ([0-9.]+)KB", res.stdout)
    data = open(out, "rb").read()
    os.remove(out)
    return len(data), round(float(m.group(1)) * 1024) if m else 0, metadata(data), npu_ops(res.stdout)


def metadata(data: bytes) -> int:
    """The JSON after the model (its length is in the outer header) and the stored attribute dict."""
    inner = struct.unpack("<Q", data[0x10:0x18])[0]
    start = data.find(b"{'attrs'")
    stored = data.find(b"\0", start) - start if start >= 0 else 0
    return len(data) - 0x40 - inner + stored


def npu_ops(log: str) -> int:
    """Ops of the first graph's layer table that run on the NPU."""
    table = log.split("Network Layer Information Table")[1].split("Feature Tensor Information")[0]
    return sum(1 for ln in table.splitlines() if re.search(r"\] \d+ +\w+ +\w+ +NPU ", ln))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact")
    ap.add_argument("--rows", default="", help="row counts (default: the artifact's)")
    a = ap.parse_args()
    manifest = json.load(open(os.path.join(a.artifact, "manifest.json")))
    print(
        "| segment | precision | file | weights | first row count | + decode rows | + each further "
        "| of which 3-core | metadata | NPU ops |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for seg in manifest["segments"]:
        if not seg.get("seq_onnx") or seg.get("backend") != "npu":
            continue
        rows = tuple(int(r) for r in a.rows.split(",")) if a.rows else tuple(seg["seq_rows"])
        onnx = os.path.join(a.artifact, seg["seq_onnx"])
        big, rest = max(rows), sorted(set(rows) - {max(rows), 2})
        for precision in ("fp16", "w8a8"):
            dataset = os.path.join(a.artifact, seg["seq_calib"]) if precision != "fp16" else ""
            if precision != "fp16" and not seg.get("seq_calib"):
                continue
            with tempfile.TemporaryDirectory(prefix="rknn-bytes-") as work:
                one, w, meta, ops = build(onnx, (big,), precision, dataset, {}, work)
                two = build(onnx, (2, big), precision, dataset, {}, work)[0] if 2 in rows else one
                full = build(onnx, rows, precision, dataset, {}, work)[0]
                single = build(onnx, rows, precision, dataset, {"single_core_mode": True}, work)[0]
            each = (full - two) / max(len(rest), 1)
            print(
                f"| {seg['name']} | {precision} | {full:,} | {w:,} | {one - w - meta:,} | {two - one:,} | "
                f"{each:,.0f} ({len(rest)}) | {full - single:,} | {meta:,} | {ops} |",
                flush=True,
            )


if __name__ == "__main__":
    sys.exit(main())
