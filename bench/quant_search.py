"""Which w8a8 settings keep quality: KL divergence of a quantised artifact's decode path on rknn-sim
against its own fp32 segments on onnxruntime, with chosen NPU segments quantised one way and the
rest left in fp32 (onnxruntime), on the built-in text `check` reads.

    python bench/quant_search.py ART                       # each NPU segment alone, then all
    python bench/quant_search.py ART --algorithms normal,mmse,kl_divergence --methods channel,layer
    python bench/quant_search.py ART --keep s009_npu_head  # all but these quantised (fp16)
    python bench/quant_search.py ART --hybrid 0.999        # the toolkit's auto_hybrid at that cosine
    python bench/quant_search.py ART --smooth 0.5          # SmoothQuant scales folded (rknn.smooth)
    python bench/quant_search.py ART --float residual      # residual stream float16 (per-token builds)

ART is a `compile --quant w8a8` artifact (its calibration datasets are reused). "alone" rows say how
much KL each segment's quantisation adds on its own: the lever for mixed precision per segment.
"""

import argparse
import contextlib
import dataclasses
import os
import sys
import tempfile
import time

import numpy as np

from rwkv2rknn.runtime.hybrid import HybridModel
from rwkv2rknn.tools.check import choose_tokens
from rwkv2rknn.tools.compare import quality
import rwkv2rknn.rknn.sim as sim
from rwkv2rknn.rknn.toolkit import FLOAT_TENSORS

SIZES = {}  # .rknn bytes of each build of the last run


# --float: the int8 graph's tensors kept float16 by the toolkit's hybrid quantisation (names
# in its quantised graph, after hybrid_quantization_step1): the residual stream (each residual
# Add, and the segment's residual input and output) and, with 'norm', the LayerNorms
FLOAT = {
    "residual": FLOAT_TENSORS["residual"],  # what compile --quant-float residual keeps
    "norm": r"\.mean_2ln$",
    "nothing": r"^$",  # the same per-token hybrid flow, every tensor int8: the baseline
}


def hybrid_build(onnx_path: str, dataset: str, config: dict, pattern: str, rknn_out: str):
    """A w8a8 build of a per-token segment with the tensors matching ``pattern`` float16
    (hybrid_quantization_step1, its config edited, step2), started in the simulator."""
    import onnx
    import re
    from rwkv2rknn.rknn.toolkit import _absolute_dataset, _working_in, import_toolkit, quiet_fds

    RKNN = import_toolkit()
    base = os.path.splitext(os.path.basename(onnx_path))[0]
    with quiet_fds(), tempfile.TemporaryDirectory() as tmp, _working_in(tmp):
        rk = RKNN()
        rk.config(target_platform="rk3588", quantized_dtype="w8a8", **config)
        assert rk.load_onnx(os.path.abspath(onnx_path)) == 0
        assert rk.hybrid_quantization_step1(dataset=_absolute_dataset(dataset, tmp)) == 0
        rk.release()
        names = [o for n in onnx.load(base + ".model").graph.node for o in n.output if re.search(pattern, o)]
        with open(base + ".quantization.cfg") as f:
            cfg = f.read()
        listed = "".join(f"    {n}: float16\n" for n in names)
        cfg = cfg.replace("custom_quantize_layers: {}", "custom_quantize_layers:\n" + listed, 1)
        with open(base + ".quantization.cfg", "w") as f:
            f.write(cfg)
        rk = RKNN()
        assert rk.hybrid_quantization_step2(base + ".model", base + ".data", base + ".quantization.cfg") == 0
        assert rk.export_rknn(rknn_out) == 0
        assert rk.init_runtime() == 0
    return rk


@contextlib.contextmanager
def toolkit_options(config: dict, floating: str = ""):
    """Every simulator build in the block gets these RKNN.config options (and auto_hybrid);
    ``floating``: quantised per-token builds keep these tensors float16 (FLOAT)."""
    real = sim.build_in_process

    def patched(onnx_path, *a, **kw):
        if kw.get("precision", "fp16") != "fp16":
            kw["config"] = dict(config)
        with tempfile.TemporaryDirectory() as tmp:
            kw["rknn_out"] = os.path.join(tmp, "seg.rknn")
            if floating and kw.get("precision", "fp16") != "fp16" and not kw.get("rows"):
                rk = hybrid_build(onnx_path, kw["dataset"], config, floating, kw["rknn_out"])
            else:
                rk = real(onnx_path, *a, **kw)
            SIZES[os.path.basename(onnx_path)] = os.path.getsize(kw["rknn_out"])
        return rk

    sim.build_in_process = patched
    try:
        yield
    finally:
        sim.build_in_process = real


def run(art: str, ids, quantised: dict, config: dict, floating: str = "") -> np.ndarray:
    """Decode logits with the segments in ``quantised`` (name -> precision) on rknn-sim at that
    precision and every other segment on onnxruntime fp32 (``floating``: per-token builds with
    those tensors float16)."""
    model = HybridModel(art, backend="ort", fuse=False, share_weights=False, verify=False)
    try:
        with toolkit_options(config, floating):
            model.backend = "rknn-sim"  # only for the runners made here
            for i, seg in enumerate(model.manifest.segments):
                if seg.name in quantised:
                    p = quantised[seg.name]
                    # the compile writes every NPU segment's datasets, also where it kept one fp16
                    token_calib, seq_calib = (
                        ("", "")
                        if p == "fp16"
                        else (
                            seg.token.calib
                            or (
                                f"calib/{seg.name}.seq/dataset.txt"
                                if seg.decode_rows
                                else f"calib/{seg.name}/dataset.txt"
                            ),
                            seg.seq.calib or f"calib/{seg.name}.seq/dataset.txt",
                        )
                    )
                    if floating and p != "fp16":  # per-token builds, from the per-token rows
                        token_calib = f"calib/{seg.name}/dataset.txt"
                    seg = dataclasses.replace(
                        seg,
                        token=dataclasses.replace(seg.token, precision=p, calib=token_calib),
                        seq=dataclasses.replace(seg.seq, precision=p, calib=seq_calib),
                        decode_rows=0 if floating else seg.decode_rows,
                    )
                    model.runners[i].close()
                    model.runners[i] = model._runner(seg)
            model.backend = "ort"
        state = model.init_state()
        return np.stack([model.step(int(t), state) for t in ids])
    finally:
        model.close()


def smoothed(art: str, alpha: float, folder: str) -> str:
    """A copy of ``art`` in ``folder`` with SmoothQuant scales folded into every NPU segment
    (per token and T rows), measured on its per-token calibration rows."""
    import json
    import shutil
    from rwkv2rknn.rknn.calibrate import read_dataset
    from rwkv2rknn.rknn.smooth import smooth_files

    out = os.path.join(folder, os.path.basename(os.path.normpath(art)))
    shutil.copytree(art, out)
    with open(os.path.join(out, "manifest.json")) as f:
        m = json.load(f)
    for s in m["segments"]:
        if s["backend"] != "npu" or not s.get("calib"):
            continue
        per_token = os.path.join(out, "calib", s["name"], "dataset.txt")
        feeds = [dict(zip(s["inputs"], r)) for r in read_dataset(per_token)]
        paths = [os.path.join(out, s["onnx"])] + (
            [os.path.join(out, s["seq_onnx"])] if s.get("seq_onnx") else []
        )
        print(f"{s['name']}: {smooth_files(paths, feeds, alpha)} projection(s) smoothed", flush=True)
    return out


def line(label: str, got, want, ids, seconds: float) -> str:
    q = quality(got, want, ids[1:])
    k = q["kl"]
    size = f" {sum(SIZES.values()) / 1e6:.2f} MB" if SIZES else ""
    SIZES.clear()
    return (
        f"{label:48s}{size} KL mean {k['mean']:.3g} med {k['median']:.3g} p99 {k['p99']:.3g} "
        f"max {k['max']:.3g} top {100 * q['same_top']:.1f}% ({seconds:.0f} s)"
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--algorithms", default="normal")
    ap.add_argument("--methods", default="channel")
    ap.add_argument("--precision", default="w8a8")
    ap.add_argument("--alone", action="store_true", help="also each NPU segment quantised alone")
    ap.add_argument("--keep", default="", help="comma-separated NPU segments kept fp16")
    ap.add_argument("--keep-as", default="fp16", help="precision of the kept segments")
    ap.add_argument("--hybrid", type=float, default=0.0, help="auto_hybrid cosine threshold")
    ap.add_argument("--level", type=int, default=-1, help="quantized_hybrid_level")
    ap.add_argument("--smooth", type=float, default=0.0, help="SmoothQuant alpha (0: none)")
    ap.add_argument(
        "--float",
        default="",
        help="comma-separated FLOAT groups (residual, norm) kept float16 in per-token w8a8 builds",
    )
    args = ap.parse_args()
    art = args.artifact
    if args.smooth:
        art = smoothed(art, args.smooth, tempfile.mkdtemp(prefix="quant-search-"))
    ref = HybridModel(art, backend="ort", fuse=False, share_weights=False, verify=False)
    feed = choose_tokens(ref.manifest, args.tokens, artifact=art)
    ids = feed.ids
    state = ref.init_state()
    want = np.stack([ref.step(int(t), state) for t in ids])
    npu = [s.name for s in ref.manifest.segments if s.backend == "npu"]
    ref.close()
    print(f"{art}: {len(ids)} tokens of {feed.source}; NPU segments {', '.join(npu)}", flush=True)
    keep = [k for k in args.keep.split(",") if k]
    for alg in args.algorithms.split(","):
        for method in args.methods.split(","):
            config = {"quantized_algorithm": alg, "quantized_method": method}
            if args.hybrid:
                config.update(auto_hybrid=True, auto_hybrid_cos_thresh=args.hybrid)
            if args.level >= 0:
                config["quantized_hybrid_level"] = args.level
            tag = (
                f"{args.precision} {alg}/{method}"
                + (f" hybrid {args.hybrid}" if args.hybrid else "")
                + (f" level {args.level}" if args.level >= 0 else "")
            )
            floating = "|".join(FLOAT[g] for g in args.float.split(",") if g)
            if floating:
                tag += f" float {args.float}"
            if args.alone:
                for name in npu:
                    t0 = time.time()
                    got = run(art, ids, {name: args.precision}, config, floating)
                    print(line(f"{tag}: {name} alone", got, want, ids, time.time() - t0), flush=True)
            t0 = time.time()
            q = {n: (args.keep_as if n in keep else args.precision) for n in npu}
            got = run(art, ids, q, config, floating)
            label = f"{tag}: all" + (f" but {','.join(keep)} {args.keep_as}" if keep else "")
            print(line(label, got, want, ids, time.time() - t0), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    sys.exit(main())
