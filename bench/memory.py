#!/usr/bin/env python
"""Peak resident memory of `rwkv2rknn run --backend ort` after a prompt, against the model's fp32
weight bytes (issue 26's target: at most 1.3x).

    python bench/memory.py                      # RWKV-7 24 x 1024, vocab 65536, random weights
    python bench/memory.py --work /tmp/mem430   # reuse the artifact compiled there before
    python bench/memory.py --layers 2 --width 64 --vocab 256   # a quick look at the mechanics

The first run makes a random checkpoint, exports fp32 per-layer files and compiles them with
--plan-only into WORK/art (every segment on onnxruntime under --backend ort); later runs with
the same WORK reuse it. Each measurement is a fresh child process, so its peak is its own:

- ``run``: the command itself, `rwkv2rknn run ART --backend ort --prompt <N bytes> --tokenizer
  bytes --max-tokens K --temperature 0`, its peak from the kernel (wait4's ru_maxrss);
- ``phases``: what `run` does through the Python API (load, the prompt as one prefill of its
  last row only, K token steps), the resident and peak memory after each phase, and the time of
  the prompt and of the token steps (``--src DIR`` runs another tree's code, e.g. the main branch,
  for a before/after in the same run).

The fp32 weight bytes are 4 bytes per element of every initializer of the per-token segment
files (what the model's parameters take in fp32).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def proc_status() -> dict:
    """This process's resident and peak resident bytes (VmRSS, VmHWM)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) * 1024
    return out


def child(args) -> None:
    """The phases, in this (fresh) process; one JSON line on stdout."""
    import numpy as np

    phases = {"start": proc_status()}
    from rwkv2rknn.runtime.hybrid import HybridModel

    t0 = time.perf_counter()
    model = HybridModel(args.artifact, backend="ort")
    load_s = time.perf_counter() - t0
    phases["load"] = proc_status()
    if hasattr(model, "prepare_prefill"):
        model.prepare_prefill()
    phases["prepare_prefill"] = proc_status()
    seq = getattr(model, "_seq", None) or []
    counts = {
        "T-row sessions": sum(1 for r in seq if r is not None),
        "row-by-row sessions": 0,
    }
    for runner, s in zip(model.runners, seq):
        if s is None and hasattr(runner, "runner"):  # made now, not in the prompt's first chunk
            runner.runner
            counts["row-by-row sessions"] += 1
    phases["row-by-row sessions"] = proc_status()
    state = model.init_state()
    ids = list((b"The quick brown fox jumps over the lazy dog. " * 100)[: args.prompt])
    t0 = time.perf_counter()
    logits = model.prefill(ids, state, last_only=True)[-1]
    prompt_s = time.perf_counter() - t0
    phases["prompt"] = proc_status()
    times = []
    for _ in range(args.steps):
        tok = int(np.argmax(logits))
        t0 = time.perf_counter()
        logits = model.step(tok, state)
        times.append(time.perf_counter() - t0)
    phases["steps"] = proc_status()
    print(
        json.dumps(
            {
                "phases": phases,
                "load_s": load_s,
                "prompt_s": prompt_s,
                "step_ms": [1000 * t for t in times],
                "execution": model.execution() if hasattr(model, "execution") else "",
                "counts": counts,
                "code": os.path.dirname(os.path.dirname(sys.modules["rwkv2rknn"].__file__)),
            }
        )
    )


def weight_bytes(art: str) -> int:
    """4 bytes per element of every initializer of the per-token segment files."""
    import mmap

    from rwkv2rknn.artifact.plan import MANIFEST, Manifest
    from rwkv2rknn.fileio import read_json
    from rwkv2rknn.runtime import onnxwire as wire

    m = Manifest.from_dict(read_json(os.path.join(art, MANIFEST), "manifest"))
    total = 0
    for seg in m.segments:
        with open(os.path.join(art, seg.token.onnx), "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        view = memoryview(mm)
        graph = wire.graph_of(view)
        for num, _, value, _, _ in wire.fields(graph):
            if num == wire.G_INIT:
                total += 4 * wire.Tensor(value).size
        del graph, value, view
        mm.close()
    return total


def make_artifact(work: str, version: str, layers: int, width: int, vocab: int, fp16: bool = False) -> str:
    art = os.path.join(work, "art")
    if os.path.exists(os.path.join(art, "manifest.json")):
        print(f"reusing {art}")
        return art
    import shutil

    from rwkv2rknn.compiler.driver import compile_model
    from rwkv2rknn.compiler.ir import Options
    from rwkv2rknn.models.export import export
    from rwkv2rknn.tools.bench import random_model

    t0 = time.perf_counter()
    onnx_dir = os.path.join(work, "onnx")
    sd = random_model(version, layers, width, vocab, 0)
    export(sd, onnx_dir, fp32=not fp16)
    del sd
    compile_model(onnx_dir, art, Options(plan_only=True))
    shutil.rmtree(onnx_dir, ignore_errors=True)
    print(f"compiled {art} (--plan-only) in {time.perf_counter() - t0:.0f} s")
    return art


def _peak_child(cmd, env=None, cwd=None):
    """Run ``cmd``; (stdout, its own peak RSS in bytes)."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=cwd)
    _, status, ru = os.wait4(p.pid, 0)
    out = p.stdout.read().decode()
    err = p.stderr.read().decode()
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{' '.join(cmd[:4])} failed: {err[-800:]}")
    return out, ru.ru_maxrss * 1024


def gib(n: float) -> str:
    return f"{n / 2**30:.3f} GiB"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/mem430", help="where the artifact is (made if missing)")
    ap.add_argument("--version", default="7")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--fp16", action="store_true", help="export fp16 files (else fp32) before the compile")
    ap.add_argument("--prompt", type=int, default=200, help="prompt bytes (bytes tokenizer: one token each)")
    ap.add_argument("--steps", type=int, default=8, help="tokens after the prompt")
    ap.add_argument("--what", default="run,phases", help="run, phases or both")
    ap.add_argument(
        "--src", action="append", default=[], help="also measure the phases with this tree's code"
    )
    ap.add_argument(
        "--repeat", type=int, default=1, help="measure the phases of each tree this many times, in turn"
    )
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.artifact = args.child
        child(args)
        return
    if args.compile:
        make_artifact(args.work, args.version, args.layers, args.width, args.vocab, args.fp16)
        return
    os.makedirs(args.work, exist_ok=True)
    art = os.path.abspath(os.path.join(args.work, "art"))
    if not os.path.exists(os.path.join(art, "manifest.json")):
        # in a child: a child's peak from wait4 counts what its parent held when it was started
        # (the exec inherits the high-water mark), so this process stays small
        subprocess.run([sys.executable, __file__, "--compile"] + sys.argv[1:], check=True)
    wb = weight_bytes(art)
    load = os.getloadavg()
    print(f"artifact {art}; fp32 weight bytes {wb:,} ({gib(wb)}); load average {load[0]:.2f} {load[1]:.2f}")
    what = args.what.split(",")
    if "run" in what:
        prompt = (("The quick brown fox jumps over the lazy dog. " * 100)[: args.prompt]).replace("\n", " ")
        cmd = [sys.executable, "-m", "rwkv2rknn", "run", art, "--backend", "ort", "--tokenizer", "bytes"]
        cmd += ["--prompt", prompt, "--max-tokens", str(args.steps), "--temperature", "0"]
        for src in [ROOT] + args.src:
            # in src: `python -m` looks in the working directory before PYTHONPATH
            _, peak = _peak_child(cmd, dict(os.environ, PYTHONPATH=src), cwd=src)
            print(
                f"run --backend ort ({src}), {args.prompt}-byte prompt, {args.steps} tokens: "
                f"peak {gib(peak)} = {peak / wb:.2f}x"
            )
    if "phases" in what:
        for src in ([ROOT] + args.src) * args.repeat:
            env = dict(os.environ, PYTHONPATH=src)
            out, peak = _peak_child(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    art,
                    "--prompt",
                    str(args.prompt),
                    "--steps",
                    str(args.steps),
                ],
                env,
            )
            r = json.loads(out.strip().splitlines()[-1])
            print(f"phases (code in {r['code']}):")
            for k, v in r["phases"].items():
                print(
                    f"  {k:16s} resident {gib(v['VmRSS'])}  peak so far {gib(v['VmHWM'])} = {v['VmHWM'] / wb:.2f}x"
                )
            steps = sorted(r["step_ms"])
            print(
                f"  load {r['load_s']:.1f} s; prompt {r['prompt_s']:.2f} s ({args.prompt / r['prompt_s']:.1f} tokens/s); "
                f"token steps median {steps[len(steps) // 2]:.1f} ms (min {steps[0]:.1f})"
            )
            print(f"  peak {gib(peak)} = {peak / wb:.2f}x; {r['counts']}; {r['execution']}")
    own = proc_status()["VmHWM"]
    print(f"(this process's own peak {gib(own)}: the children's peaks above are at least that)")
    load = os.getloadavg()
    print(f"load average at the end {load[0]:.2f} {load[1]:.2f}")


if __name__ == "__main__":
    main()
