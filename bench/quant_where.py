"""Where w8a8's error comes from: the tensors that cross an NPU segment's boundary, rounded as
the toolkit's int8 activations round them (asymmetric, one scale per tensor, min/max from the
calibration text), one group at a time, everything else exact fp32 on onnxruntime. KL against
the unrounded model on the text `check` reads.

    python bench/quant_where.py ART [--tokens 256] [--bits 8]
    python bench/quant_where.py ART --weights     # also: the NPU weights alone, int8 per channel

ART is a `compile --quant w8a8` artifact (its calibration text gives the ranges). A group whose
rounding alone costs most of w8a8's KL is where keeping float pays; what no group explains is
the weights' and the segments' inner activations' share.
"""

import argparse
import re
import sys

import numpy as np

from rwkv2rknn.rknn.calibrate import calibration_ids
from rwkv2rknn.runtime.hybrid import HybridModel, load_manifest
from rwkv2rknn.tools.check import choose_tokens
from rwkv2rknn.tools.compare import quality
from rwkv2rknn.tools.weights import rewrite_segment

GROUPS = {
    "residual stream (x in and out)": r"(^embed/output$|^L\d+/output$|residual_out$)",
    "token-shift state (xx)": r"state_(in|out)\.(att|ffn)_xx$",
    "key / time_first + key (to exp)": r"(att\.key_out|wkv\.ww_out)$",
    "value": r"att\.value_out$",
    "receptance": r"att\.r_out$",
    "r*wkv (into the output projection)": r"att\.output\.row_in$",
    "logits": r"^logits$",
}


class Rounding:
    """Wraps an NPU segment's runner: its matching inputs and outputs rounded to ``bits``."""

    def __init__(self, runner, pattern, ranges, bits):
        self.runner, self.pattern, self.ranges, self.levels = runner, pattern, ranges, 2**bits - 1

    def _round(self, name, x):
        if not self.pattern or not re.search(self.pattern, name) or name not in self.ranges:
            return x
        lo, hi = self.ranges[name]
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        step = (hi - lo) / self.levels or 1.0
        zero = np.round(-lo / step)
        q = np.clip(np.round(x / step) + zero, 0, self.levels)
        return ((q - zero) * step).astype(x.dtype)

    def infer(self, feed):
        outs = self.runner.infer({k: self._round(k, v) for k, v in feed.items()})
        return {k: self._round(k, v) for k, v in outs.items()}

    def close(self):
        self.runner.close()


def ranges_of(art, ids):
    """min/max of every NPU segment input and output on ``ids`` (fp32 onnxruntime)."""
    model = HybridModel(art, backend="ort", fuse=False, share_weights=False, verify=False)
    seen = {}

    class Watch:
        def __init__(self, runner):
            self.runner = runner

        def infer(self, feed):
            outs = self.runner.infer(feed)
            for k, v in list(feed.items()) + list(outs.items()):
                lo, hi = float(np.min(v)), float(np.max(v))
                a, b = seen.get(k, (lo, hi))
                seen[k] = (min(a, lo), max(b, hi))
            return outs

        def close(self):
            self.runner.close()

    try:
        model.runners = [Watch(r) if n else r for r, n in zip(model.runners, model._npu)]
        state = model.init_state()
        for t in ids:
            model.step(int(t), state)
    finally:
        model.close()
    return seen


def rounded_weights(art, folder, bits):
    """A copy of ``art`` whose NPU segments' weight matrices are rounded symmetric per output
    channel to ``bits`` (the toolkit's per-channel int8 weights), activations untouched."""
    import os
    import shutil

    out = os.path.join(folder, "rounded")
    shutil.copytree(art, out)
    top = 2 ** (bits - 1) - 1

    def rounded(w, conv):
        # one scale per output channel: MatMul(x, W.T) holds W.T [in, out]; a Conv [out, in, 1, 1]
        axis = (1, 2, 3) if conv else 0
        scale = np.abs(w).max(axis=axis, keepdims=True) / top
        scale[scale == 0] = 1.0
        return np.round(w / scale) * scale

    for s in load_manifest(out).segments:
        if s.backend == "npu":
            rewrite_segment(out, s.name, rounded)
    return out


def run(art, ids, pattern, ranges, bits):
    model = HybridModel(art, backend="ort", fuse=False, share_weights=False, verify=False)
    try:
        model.runners = [
            Rounding(r, pattern, ranges, bits) if n else r for r, n in zip(model.runners, model._npu)
        ]
        state = model.init_state()
        return np.stack([model.step(int(t), state) for t in ids])
    finally:
        model.close()


def kl_line(q: dict) -> str:
    """KL mean, p99 and the share of the same top token of a ``compare.quality`` result."""
    k = q["kl"]
    return f"KL mean {k['mean']:.3g} p99 {k['p99']:.3g} same top {100 * q['same_top']:.1f}%"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--bits", type=int, default=8)
    ap.add_argument("--weights", action="store_true", help="also the weights alone, int8 per channel")
    args = ap.parse_args()
    art = args.artifact
    ref = HybridModel(art, backend="ort", fuse=False, share_weights=False, verify=False)
    feed = choose_tokens(ref.manifest, args.tokens, artifact=art)
    source = ref.manifest.model.get("source")
    ref.close()
    ids = feed.ids
    cal, _, where = calibration_ids(source, None, 256)
    ranges = ranges_of(art, cal)
    want = run(art, ids, "", ranges, args.bits)
    print(f"{art}: {len(ids)} tokens of {feed.source}; ranges from {len(cal)} tokens of {where}")
    if args.weights:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            q = quality(run(rounded_weights(art, tmp, args.bits), ids, "", ranges, args.bits), want, ids[1:])
        print(f"{'NPU weights only, per output channel':38s}: {kl_line(q)}", flush=True)
    every = "|".join(f"(?:{p})" for p in GROUPS.values())
    for label, pattern in list(GROUPS.items()) + [("all of them", every)]:
        names = sorted(k for k in ranges if re.search(pattern, k))
        widest = max((ranges[k][1] - ranges[k][0] for k in names), default=0.0)
        q = quality(run(art, ids, pattern, ranges, args.bits), want, ids[1:])
        print(f"{label:38s} {len(names):2d} tensors, widest range {widest:7.2f}: {kl_line(q)}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
