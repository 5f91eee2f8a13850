"""KL divergence of compiled artifacts against onnxruntime on their source files, per NPU
precision, on the bundled model and small random models: the measurements behind check's KL
tolerances (rwkv2rknn.tools.check.KL_TOLERANCE) and docs/quality.md.

    python bench/quality.py                        # every model, fp16 w8a8 w16a16i
    python bench/quality.py --models bundled --quant w8a8 --perturb
    python bench/quality.py --models rwkv7-bytes.pth     # a checkpoint file, e.g. a trained one
    WORK=/tmp/q python bench/quality.py ...        # keep the files

For each model and precision: export (fp32 files; the bundled model also as the fp16 files the
demo compiles), compile, then `check` on rknn-sim: the built-in English sample (256 tokens) and
32 seeded random ids, decode and prefill. With --perturb, each NPU segment in turn has its
weights (per-token and T-row ONNX) scaled by 1.05 (1.25 for w8a8) and is checked again: what the
gate must catch.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time


from rwkv2rknn.tools.check import run_check
from rwkv2rknn.compiler.driver import compile_model
from rwkv2rknn.compiler.ir import Options
from rwkv2rknn.models import bundled, checkpoint
from rwkv2rknn.models.export import export
from rwkv2rknn.tools.bench import random_model
from rwkv2rknn.tools.weights import rewrite_segment, scaled
from rwkv2rknn.artifact.plan import MANIFEST

MODELS = {
    "bundled": lambda: checkpoint.load_checkpoint(bundled.checkpoint_path()),
    # the byte-level model of tests/conftest.py (byte_model): the check tests' artifacts
    "test": lambda: checkpoint.random_checkpoint(layers=2, width=64, vocab=256, seed=5),
    "v4": lambda: checkpoint.random_checkpoint(layers=3, width=96, vocab=256, seed=11),
    "v5": lambda: checkpoint.random_rwkv5(layers=3, width=128, vocab=256, seed=12),
    "v6": lambda: checkpoint.random_rwkv6(layers=3, width=128, vocab=256, seed=13),
    "v7": lambda: checkpoint.random_rwkv7(layers=3, width=128, vocab=256, seed=14),
    # the 430M shapes (24 x 1024; the vocabularies of the Pile and World tokenizers), random weights
    # stored float16 (half the memory; read as float32): `--tokens 64 --random-tokens 16` keeps a
    # precision to about an hour on rknn-sim here
    "430m-v4": lambda: random_model("4", 24, 1024, 50277, 0),
    "430m-v7": lambda: random_model("7", 24, 1024, 65536, 0),
}


# the built-in text sample is tokenized with the model's tokenizer: bytes unless named here (the
# Pile tokenizer of RWKV-4 430M is not bundled, so that shape reads bytes: ids below 256)
TOKENIZER = {"430m-v7": "world"}


def model_for(name: str) -> dict:
    """A model of MODELS by name, or a checkpoint file (.pth) such as a trained RWKV-7."""
    if name.endswith(".pth"):
        return checkpoint.load_checkpoint(name)
    return MODELS[name]()


FACTOR = {"fp16": 1.05, "w16a16i": 1.05, "w8a8": 1.25}


def perturb(art: str, seg_name: str, factor: float) -> None:
    """Scale every weight matrix of one NPU segment's ONNX files (per token and T rows) and
    update the manifest's checksums, as if the compiler had written a wrong segment."""
    rewrite_segment(art, seg_name, scaled(factor))


def figures(rep) -> dict:
    out = {}
    for path, d in (("decode", rep.to_dict()), ("prefill", rep.prefill)):
        if d and d.get("quality"):
            q = d["quality"]
            out[path] = dict(
                q["kl"],
                same_top=q["same_top"],
                bits=q.get("bits"),
                max_rel=d["max_rel"],
                state_drift=d.get("state_drift"),
            )
    return out


def row(label: str, fig: dict) -> str:
    cells = []
    for path in ("decode", "prefill"):
        f = fig.get(path)
        if not f:
            cells.append("-")
            continue
        b = f.get("bits")
        bits = f" bpb {b['artifact']:.4f}/{b['reference']:.4f}" if b else ""
        cells.append(
            f"mean {f['mean']:.3g} med {f['median']:.3g} p99 {f['p99']:.3g} max {f['max']:.3g} "
            f"top {100 * f['same_top']:.1f}%{bits}"
        )
    return f"{label:40s} | " + " | ".join(cells)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(MODELS), help="names of MODELS, or checkpoint files (.pth)")
    ap.add_argument("--quant", default="fp16,w8a8,w16a16i")
    ap.add_argument("--tokens", type=int, default=256, help="tokens of the English sample")
    ap.add_argument("--random-tokens", type=int, default=32, help="seeded random ids")
    ap.add_argument("--perturb", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    work = os.environ.get("WORK") or tempfile.mkdtemp(prefix="rwkv2rknn-quality-")
    results = []
    for name in args.models.split(","):
        sd = model_for(name)
        name = os.path.splitext(os.path.basename(name))[0]
        sources = {"fp32": os.path.join(work, name, "fp32")}
        if name == "bundled":
            sources["fp16"] = os.path.join(work, name, "fp16")
        for dtype, d in sources.items():
            if not os.path.exists(os.path.join(d, "model.json")):
                export(sd, d, fp32=dtype == "fp32", tokenizer=TOKENIZER.get(name, "bytes"), force=True)
        for q in args.quant.split(","):
            for dtype, d in sources.items():
                art = os.path.join(work, name, f"{dtype}-{q}")
                t0 = time.time()
                if not os.path.exists(os.path.join(art, MANIFEST)):
                    compile_model(d, art, Options(quant=q), force=True)
                label = f"{name} {dtype} files, {q}"
                for kind in ("text", "random"):
                    rep, _ = run_check(
                        art,
                        args.tokens if kind == "text" else args.random_tokens,
                        backend="rknn-sim",
                        random_ids=kind == "random",
                    )
                    fig = figures(rep)
                    results.append(
                        {
                            "model": name,
                            "source": dtype,
                            "quant": q,
                            "tokens": kind,
                            "figures": fig,
                            "passed": rep.passed,
                            "failures": rep.failures,
                        }
                    )
                    print(
                        row(f"{label} [{kind}]", fig) + f" | {'PASS' if rep.passed else 'FAIL'}"
                        f" ({time.time() - t0:.0f} s)",
                        flush=True,
                    )
                if args.perturb and dtype == "fp32":
                    with open(os.path.join(art, MANIFEST)) as f:
                        npu = [s["name"] for s in json.load(f)["segments"] if s["backend"] == "npu"]
                    for seg in npu:
                        bad = art + "-bad"
                        shutil.rmtree(bad, ignore_errors=True)
                        shutil.copytree(art, bad)
                        perturb(bad, seg, FACTOR[q])
                        rep, _ = run_check(bad, args.tokens, backend="rknn-sim")
                        fig = figures(rep)
                        results.append(
                            {
                                "model": name,
                                "source": dtype,
                                "quant": q,
                                "tokens": "text",
                                "perturbed": seg,
                                "factor": FACTOR[q],
                                "figures": fig,
                                "passed": rep.passed,
                                "failures": rep.failures,
                            }
                        )
                        print(
                            row(f"  {seg} x{FACTOR[q]}", fig) + f" | {'PASS' if rep.passed else 'FAIL'}",
                            flush=True,
                        )
                        shutil.rmtree(bad, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
