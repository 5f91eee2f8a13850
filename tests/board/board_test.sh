#!/bin/sh
# `make board-test`: the board install of docs/board.md, run in a real arm64 Debian 12 userland
# under qemu-user (as root: apt-get, debootstrap, chroot). Not part of `make test`.
#
#   1. qemu-user-static + binfmt, debootstrap (Debian's packages) into $ROOTFS (kept for next time)
#   2. here (x86): a small random RWKV-4 compiled with the real toolkit, packed; its `run
#      --backend ort` output
#   3. in the arm64 userland, the steps of docs/board.md: a virtual environment, pip install -r
#      requirements-board.txt (serve's starlette and uvicorn included), the package with --no-deps;
#      then `doctor`, `run --backend ort` on the unpacked artifact (the same text as on x86), `serve`
#      on it answering GET /health and one POST /v1/completions (the same greedy text as on x86), the
#      packed artifact's refusal on ort, and an import audit (torch, onnx, onnx-graphsurgeon, rknn are
#      not there and nothing asks for them)
set -eu
HERE=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PY:-$HERE/.venv/bin/python}
ROOTFS=${ROOTFS:-/var/tmp/rwkv2rknn-arm64-bookworm}
WORK=${WORK:-/var/tmp/rwkv2rknn-board-test}
TOKENS=5,17,30,2,64,9,41

say() { printf '== %s\n' "$*"; }

# 1. the emulator and the userland
command -v qemu-aarch64-static >/dev/null && command -v debootstrap >/dev/null || {
    say "installing qemu-user-static, binfmt-support, debootstrap"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user-static binfmt-support debootstrap
}
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || update-binfmts --enable qemu-aarch64 || {
    echo "binfmt_misc cannot run aarch64 programs here (update-binfmts --enable qemu-aarch64 failed)"; exit 1; }
if [ ! -x "$ROOTFS/usr/bin/python3" ] || [ ! -e "$ROOTFS/usr/lib/python3.11/venv" ]; then
    say "debootstrap arm64 bookworm into $ROOTFS"
    rm -rf "$ROOTFS"
    debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
        bookworm "$ROOTFS"
fi
cp /etc/resolv.conf "$ROOTFS/etc/resolv.conf"
# this machine's CA bundle (it may reach the package registry through a proxy of its own)
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
    cp /etc/ssl/certs/ca-certificates.crt "$ROOTFS/etc/ssl/certs/ca-certificates.crt"
fi

# 2. the artifact, on this machine
rm -rf "$WORK" && mkdir -p "$WORK"
say "compiling a small model here"
"$PY" - "$WORK" <<'PYEOF'
import os, sys
work = sys.argv[1]
os.environ.setdefault("RWKV2RKNN_CACHE", os.path.join(work, "cache"))
from rwkv2rknn.models.checkpoint import random_checkpoint
from rwkv2rknn.models.export import export
from rwkv2rknn.compiler.driver import compile_model
from rwkv2rknn.compiler.ir import Options
from rwkv2rknn.artifact.pack import pack
export(random_checkpoint(layers=3, width=48, vocab=97, seed=1), os.path.join(work, "onnx"), tokenizer="bytes")
compile_model(os.path.join(work, "onnx"), os.path.join(work, "art"), Options())
pack(os.path.join(work, "art"), os.path.join(work, "packed"))
PYEOF
"$HERE/.venv/bin/rwkv2rknn" run "$WORK/art" --backend ort --tokens "$TOKENS" > "$WORK/x86.txt"
"$HERE/.venv/bin/rwkv2rknn" run "$WORK/art" --backend ort --prompt "A1" --max-tokens 24 --temperature 0 \
    > "$WORK/x86-text.txt"
# the same request `serve` gets on the board, answered here by `run` (greedy: one text)
"$HERE/.venv/bin/rwkv2rknn" run "$WORK/art" --backend ort --prompt "A1" --max-tokens 8 --temperature 0 \
    > "$WORK/x86-serve.txt"
rm -f "$WORK/art/selftest.json"

# 3. in the arm64 userland
rm -rf "$ROOTFS/opt/src" "$ROOTFS/opt/art" "$ROOTFS/opt/packed" "$ROOTFS/opt/venv"
rm -f "$ROOTFS"/opt/*.txt
mkdir -p "$ROOTFS/opt/src"
(cd "$HERE" && tar cf - --exclude='*.pyc' --exclude=__pycache__ --exclude='models/default/*.pth' \
    setup.py setup.cfg pyproject.toml README.md requirements-board.txt rwkv2rknn passes models) | tar xf - -C "$ROOTFS/opt/src"
cp -r "$WORK/art" "$ROOTFS/opt/art"
cp -r "$WORK/packed" "$ROOTFS/opt/packed"
cat > "$ROOTFS/opt/steps.sh" <<'STEPS'
set -eu
uname -m
python3 --version
# docs/board.md, "Install"
python3 -m venv /opt/venv
/opt/venv/bin/pip install --disable-pip-version-check -q -r /opt/src/requirements-board.txt
/opt/venv/bin/pip install --disable-pip-version-check -q --no-deps /opt/src
/opt/venv/bin/python -c "import onnxruntime, numpy; print('onnxruntime', onnxruntime.__version__, 'numpy', numpy.__version__)"
# docs/board.md, "Check the board"
set +e
/opt/venv/bin/rwkv2rknn doctor /opt/art > /opt/doctor.txt 2>&1
echo "doctor exit $?" >> /opt/doctor.txt
set -e
cat /opt/doctor.txt
# the artifact on onnxruntime
/opt/venv/bin/rwkv2rknn run /opt/art --backend ort --tokens TOKENS > /opt/arm64.txt
/opt/venv/bin/rwkv2rknn run /opt/art --backend ort --prompt "A1" --max-tokens 24 --temperature 0 > /opt/arm64-text.txt
# docs/board.md, "serve": the OpenAI-compatible server on the unpacked artifact, asked with urllib
PORT=$(/opt/venv/bin/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
/opt/venv/bin/rwkv2rknn serve /opt/art --backend ort --port "$PORT" --model-name art > /opt/serve-log.txt 2>&1 &
SERVE_PID=$!
set +e
/opt/venv/bin/python - "$PORT" > /opt/serve.txt 2>&1 <<'CLIENT'
import json, sys, time, urllib.error, urllib.request
base = f"http://127.0.0.1:{sys.argv[1]}"
deadline, health = time.monotonic() + 300, None  # onnxruntime under qemu-user loads slowly
while time.monotonic() < deadline:
    try:
        with urllib.request.urlopen(base + "/health", timeout=10) as r:
            health = json.load(r)
        if health.get("status") == "ok":
            break
    except (OSError, ValueError):
        pass
    time.sleep(1)
assert health and health.get("status") == "ok", f"GET /health never said ok: {health}"
print("health", json.dumps(health, sort_keys=True))
body = json.dumps({"model": "art", "prompt": "A1", "max_tokens": 8, "temperature": 0}).encode()
req = urllib.request.Request(base + "/v1/completions", body, {"Content-Type": "application/json"})
with urllib.request.urlopen(req, timeout=300) as r:
    reply = json.load(r)
choice = reply["choices"][0]
assert reply["object"] == "text_completion" and reply["usage"]["completion_tokens"] > 0, reply
print("completion", json.dumps(choice["text"]))
with open("/opt/serve-text.txt", "w") as f:
    f.write(choice["text"])
CLIENT
echo "exit $?" >> /opt/serve.txt
set -e
kill "$SERVE_PID" 2>/dev/null || true
wait "$SERVE_PID" 2>/dev/null || true
cat /opt/serve.txt
# the packed one is for the NPU runtime: one line, no traceback
set +e
/opt/venv/bin/rwkv2rknn run /opt/packed --backend ort --tokens 1,2 > /opt/packed.txt 2>&1
echo "exit $?" >> /opt/packed.txt
set -e
# import audit
/opt/venv/bin/python - <<'AUDIT'
import importlib.util, subprocess, sys
for m in ("torch", "onnx", "onnx_graphsurgeon", "onnxconverter_common", "rknn"):
    assert importlib.util.find_spec(m) is None, f"{m} is installed on the board"
out = subprocess.run([sys.executable, "-X", "importtime", "-m", "rwkv2rknn", "run", "/opt/art", "--backend",
                      "ort", "--tokens", "1,2"], capture_output=True, text=True)
assert out.returncode == 0, out.stderr[-2000:]
names = {line.split("|")[-1].strip().split(".")[0] for line in out.stderr.splitlines() if "|" in line}
bad = names & {"torch", "onnx", "onnx_graphsurgeon", "onnxconverter_common", "rknn"}
assert not bad, bad
print("import audit: nothing of the compile side is imported")
AUDIT
STEPS
sed -i "s/TOKENS/$TOKENS/" "$ROOTFS/opt/steps.sh"
say "the board's steps, arm64 under qemu-user"
mount -t proc proc "$ROOTFS/proc"
mount --bind /sys "$ROOTFS/sys"
trap 'umount "$ROOTFS/proc" "$ROOTFS/sys" 2>/dev/null || true' EXIT
chroot "$ROOTFS" /bin/sh /opt/steps.sh

# the verdicts
fail=0
cmp -s "$WORK/x86.txt" "$ROOTFS/opt/arm64.txt" && say "run --backend ort: the same text as on x86: $(cat "$WORK/x86.txt")" || {
    say "run --backend ort differs: x86 '$(cat "$WORK/x86.txt")', arm64 '$(cat "$ROOTFS/opt/arm64.txt")'"; fail=1; }
cmp -s "$WORK/x86-text.txt" "$ROOTFS/opt/arm64-text.txt" && say "run --prompt (greedy): the same text as on x86" || {
    say "run --prompt differs"; fail=1; }
grep -q "^ok   self-test: " "$ROOTFS/opt/doctor.txt" && ! grep -q Traceback "$ROOTFS/opt/doctor.txt" \
    && say "doctor: self-test passed on arm64, every other verdict one line" || { say "doctor failed"; fail=1; }
grep -q "packed for the board" "$ROOTFS/opt/packed.txt" && grep -q "^exit 2" "$ROOTFS/opt/packed.txt" \
    && ! grep -q Traceback "$ROOTFS/opt/packed.txt" && say "packed artifact on ort: refused in one line" \
    || { say "packed artifact: unexpected"; cat "$ROOTFS/opt/packed.txt"; fail=1; }
grep -q "^exit 0" "$ROOTFS/opt/serve.txt" && say "serve: GET /health ok, POST /v1/completions answered" || {
    say "serve failed"; cat "$ROOTFS/opt/serve.txt"; tail -20 "$ROOTFS/opt/serve-log.txt"; fail=1; }
# `run` prints the prompt then the continuation; the completion is the continuation alone
[ -f "$ROOTFS/opt/serve-text.txt" ] && [ "A1$(cat "$ROOTFS/opt/serve-text.txt")" = "$(cat "$WORK/x86-serve.txt")" ] \
    && say "serve: the same greedy text as run on x86" \
    || { say "serve text differs: x86 run '$(cat "$WORK/x86-serve.txt")', arm64 serve 'A1$(cat "$ROOTFS/opt/serve-text.txt" 2>/dev/null)'"; fail=1; }
[ $fail = 0 ] && echo "board-test: 7 passed, 0 failed" || echo "board-test: failed"
exit $fail
