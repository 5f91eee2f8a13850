#!/usr/bin/env python
"""Where one rknn-toolkit2 build spends its time: import, load_onnx, build, export_rknn.

    python bench/build_profile.py ART/segments/s003_npu_L0-L1.seq.onnx              # rows 2 / 2,16 / 2,16,64 / 2,16,32,64
    python bench/build_profile.py SEG.seq.onnx --rows 2,16,32,64 --config optimization_level=0 single_core_mode=True

Each build runs alone in a fresh child process (as the compiler's build children do), one after
the other; the table gives wall and CPU seconds (user + system) of every step and the child's
peak resident memory. CPU seconds are the figure to compare on a loaded machine. The segment
files come from `rwkv2rknn compile MODEL -o ART --plan-only`.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, os, resource, sys, time
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
t0 = time.perf_counter()
onnx_path, rows, extra, out = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
from rwkv2rknn.rknn.toolkit import dynamic_shapes, import_toolkit, quiet_fds
RKNN = import_toolkit()
wall, used = {"import": time.perf_counter() - t0}, {"import": cpu()}
with quiet_fds():
    rk = RKNN(verbose=False)
    cfg = dict(target_platform="rk3588", **extra)
    if rows:
        cfg["dynamic_input"] = dynamic_shapes(onnx_path, rows)
    steps = [("config", lambda: rk.config(**cfg)), ("load_onnx", lambda: rk.load_onnx(onnx_path)),
             ("build", lambda: rk.build(do_quantization=False)), ("export_rknn", lambda: rk.export_rknn(out))]
    for name, call in steps:
        t, c = time.perf_counter(), cpu()
        ret = call()
        wall[name], used[name] = time.perf_counter() - t, cpu() - c
        if ret not in (0, None):
            raise SystemExit(f"{name} returned {ret}")
    rk.release()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"wall": wall, "cpu": used, "peak": peak, "bytes": os.path.getsize(out)}))
"""


def profile(onnx_path, rows, extra):
    with tempfile.TemporaryDirectory(prefix="rwkv2rknn-prof-") as work:
        out = os.path.join(work, "out.rknn")
        env = dict(os.environ, TMPDIR=work)
        res = subprocess.run(
            [
                sys.executable,
                "-c",
                CHILD,
                os.path.abspath(onnx_path),
                json.dumps(rows),
                json.dumps(extra),
                out,
            ],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
        )
        if res.returncode != 0:
            return None, (res.stderr.strip().splitlines() or ["failed"])[-1]
        return json.loads(res.stdout.strip().splitlines()[-1]), ""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("onnx", nargs="+", help="segment ONNX files (.seq.onnx for T-row builds)")
    ap.add_argument(
        "--rows",
        nargs="*",
        default=["2", "2,16", "2,16,64", "2,16,32,64"],
        help="row sets to build (one build each; '' for a per-token graph)",
    )
    ap.add_argument("--config", nargs="*", default=[], help="extra rknn config(...) options, KEY=VALUE")
    a = ap.parse_args()
    configs = [{}] + [
        {k: json.loads(v.lower()) if v.lower() in ("true", "false") else (int(v) if v.isdigit() else v)}
        for k, v in (c.split("=", 1) for c in a.config)
    ]
    print(
        "| segment | ONNX MB | rows | config | import | load_onnx | build | export | total CPU | peak | .rknn MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for path in a.onnx:
        mb = os.path.getsize(path) / 1e6
        for extra in configs:
            for r in a.rows if not extra else a.rows[-1:]:
                rows = [int(x) for x in r.split(",") if x]
                got, why = profile(path, rows, extra)
                name = os.path.basename(path)
                conf = ", ".join(f"{k}={v}" for k, v in extra.items()) or "default"
                if got is None:
                    print(f"| {name} | {mb:.1f} | {r} | {conf} | failed: {why} |", flush=True)
                    continue
                w, c = got["wall"], got["cpu"]
                cell = lambda k: f"{c[k]:.1f} ({w[k]:.1f})"  # noqa: E731
                print(
                    f"| {name} | {mb:.1f} | {r or '-'} | {conf} | {cell('import')} | {cell('load_onnx')} | "
                    f"{cell('build')} | {cell('export_rknn')} | {sum(c.values()):.1f} | "
                    f"{got['peak'] / 2**30:.2f} GiB | {got['bytes'] / 1e6:.1f} |",
                    flush=True,
                )
    print("\nseconds of CPU (wall in brackets)")


if __name__ == "__main__":
    sys.exit(main())
