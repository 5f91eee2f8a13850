#!/usr/bin/env python
"""`rwkv2rknn serve` figures, measured on real server processes on 127.0.0.1:

1. time to first token of a follow-up chat turn after ~1000 tokens of history: a server with
   the state cache (the history's state is kept from the turn before) against one without
   (--state-cache-mb 0: the whole conversation is prefilled again); the ratio;
2. decode time per token streamed by the server (/v1/completions, stream) against `rwkv2rknn
   run` on the same artifact, interleaved; the server's overhead per token;
3. RWKV state bytes per conversation (what the cache and a /save file hold) by version and size.

    python bench/serve.py                          # the bundled model (compiled on first use)
    python bench/serve.py ARTIFACT --backend ort --history 1000 --tokens 200 --repeats 5
"""

import argparse
import http.client
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time

HOST = "127.0.0.1"
HERE = os.path.dirname(os.path.abspath(__file__))
HELDOUT = os.path.join(os.path.dirname(HERE), "models", "default", "heldout.txt")


def free_port():
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, artifact, backend, *extra):
        self.port = free_port()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "rwkv2rknn",
                "serve",
                artifact,
                "--backend",
                backend,
                "--host",
                HOST,
                "--port",
                str(self.port),
                *extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=dict(os.environ, TQDM_DISABLE="1"),
        )
        end = time.time() + 120
        while time.time() < end:
            if self.proc.poll() is not None:
                raise SystemExit("the server did not start")
            try:
                if self.call("GET", "/health")[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)
        self.name = self.call("GET", "/v1/models")[1]["data"][0]["id"]

    def call(self, method, path, body=None):
        c = http.client.HTTPConnection(HOST, self.port, timeout=600)
        try:
            c.request(
                method, path, None if body is None else json.dumps(body), {"Content-Type": "application/json"}
            )
            r = c.getresponse()
            return r.status, json.loads(r.read())
        finally:
            c.close()

    def stream(self, path, body):
        """(seconds to the first text, seconds between first and last text, events with text,
        usage) of a streamed request."""
        c = http.client.HTTPConnection(HOST, self.port, timeout=600)
        t0 = time.perf_counter()
        c.request(
            "POST",
            path,
            json.dumps({**body, "stream": True, "stream_options": {"include_usage": True}}),
            {"Content-Type": "application/json"},
        )
        r = c.getresponse()
        first = last = None
        n, usage = 0, None
        while True:
            line = r.readline()
            if not line:
                break
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            obj = json.loads(line[6:])
            usage = obj.get("usage") or usage
            for ch in obj.get("choices", []):
                text = ch.get("text") or (ch.get("delta") or {}).get("content")
                if text:
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    n += 1
        c.close()
        return (first - t0 if first else None), ((last - first) if first else 0.0), n, usage

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def conversation(text, start, history_bytes):
    """User/assistant turns cut from real prose, about ``history_bytes`` long."""
    msgs, at, role = [], start, "user"
    while sum(len(m["content"]) + 13 for m in msgs) < history_bytes:
        msgs.append({"role": role, "content": text[at : at + 180]})
        at += 180
        role = "assistant" if role == "user" else "user"
    if msgs[-1]["role"] == "assistant":
        msgs.pop()
    return msgs


def ttft(args, artifact, text):
    cached = Server(artifact, args.backend)
    scratch = Server(artifact, args.backend, "--state-cache-mb", "0")
    rows = []
    try:
        for i in range(args.repeats):
            history = conversation(text, 4000 * i, args.history)
            for srv in (cached, scratch):  # the turn before: the cached server keeps its state
                status, r1 = srv.call(
                    "POST",
                    "/v1/chat/completions",
                    {"model": srv.name, "messages": history, "max_tokens": 16, "temperature": 0},
                )
                if status != 200:
                    raise SystemExit(f"the server answered {status}: {r1}")
            follow = history + [
                {"role": "assistant", "content": r1["choices"][0]["message"]["content"]},
                {"role": "user", "content": "And what happened next?"},
            ]
            body = {"messages": follow, "max_tokens": 4, "temperature": 0}
            t_c, _, _, u_c = cached.stream("/v1/chat/completions", {**body, "model": cached.name})
            t_s, _, _, u_s = scratch.stream("/v1/chat/completions", {**body, "model": scratch.name})
            rows.append(
                (
                    t_c,
                    t_s,
                    u_c["prompt_tokens"],
                    u_c["prompt_tokens_details"]["cached_tokens"],
                    u_s["prompt_tokens_details"]["cached_tokens"],
                )
            )
    finally:
        cached.stop()
        scratch.stop()
    c = statistics.median(r[0] for r in rows)
    s = statistics.median(r[1] for r in rows)
    print(
        f"1. follow-up turn, {rows[0][2]} prompt tokens ({rows[0][3]} of them cached; "
        f"{rows[0][4]} without the cache), median of {len(rows)}:"
    )
    print(
        f"   time to first token: cached {1000 * c:.1f} ms, from scratch {1000 * s:.1f} ms, "
        f"ratio {s / c:.1f}x"
    )
    return {
        "prompt_tokens": rows[0][2],
        "cached_tokens": rows[0][3],
        "ttft_cached_ms": 1000 * c,
        "ttft_scratch_ms": 1000 * s,
        "ratio": s / c,
    }


def overhead(args, artifact):
    srv = Server(artifact, args.backend)
    served, ran = [], []
    try:
        for _ in range(args.repeats):
            body = {
                "model": srv.name,
                "prompt": "It was a truth universally acknowledged",
                "max_tokens": args.tokens,
                "temperature": 1.0,
                "top_p": 1.0,
                "seed": 0,
            }
            _, span, n, usage = srv.stream("/v1/completions", body)
            served.append(span / max(usage["completion_tokens"] - 1, 1))
            out = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "rwkv2rknn",
                    "run",
                    artifact,
                    "--backend",
                    args.backend,
                    "--prompt",
                    "It was a truth universally acknowledged",
                    "--max-tokens",
                    str(args.tokens),
                    "--temperature",
                    "1",
                    "--top-p",
                    "1",
                    "--seed",
                    "0",
                ],
                capture_output=True,
                text=True,
                env=dict(os.environ, TQDM_DISABLE="1"),
            )
            m = re.search(r"([\d.]+) tokens/s\]", out.stderr)
            if not m:
                raise SystemExit("run printed no speed: " + out.stderr[-300:])
            ran.append(1.0 / float(m.group(1)))
    finally:
        srv.stop()
    s, r = statistics.median(served), statistics.median(ran)
    print(f"2. decode, {args.tokens} tokens, median of {len(served)} interleaved runs:")
    print(
        f"   run {1000 * r:.3f} ms/token, serve (streamed) {1000 * s:.3f} ms/token: "
        f"overhead {1000 * (s - r):+.3f} ms/token ({100 * (s - r) / r:+.1f}%)"
    )
    return {"run_ms_per_token": 1000 * r, "serve_ms_per_token": 1000 * s, "overhead_pct": 100 * (s - r) / r}


def state_bytes():
    """float32 state of one conversation: RWKV-4 keeps 5 rows of C per layer; RWKV-5.2, 6 and 7
    keep two token shifts of C and a [C/64, 64, 64] matrix per layer."""
    print("3. state bytes per conversation (float32; a saved state adds 4 bytes per token id):")
    out = {}
    for name, layers, width in (("0.1B", 12, 768), ("1.5B", 24, 2048)):
        v4 = 4 * layers * 5 * width
        v7 = 4 * layers * (2 * width + (width // 64) * 64 * 64)
        out[name] = {"rwkv4": v4, "rwkv5.2/6/7": v7}
        print(
            f"   {name} ({layers} x {width}): RWKV-4 {v4 / 2**20:.2f} MiB; RWKV-5.2/6/7 {v7 / 2**20:.2f} MiB"
        )
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", nargs="?", default=None, help="default: the bundled model")
    ap.add_argument("--backend", default="ort")
    ap.add_argument("--history", type=int, default=1000, help="bytes of history (tokens for the bytes model)")
    ap.add_argument("--tokens", type=int, default=200, help="tokens decoded per overhead run")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None, help="also save the figures here")
    args = ap.parse_args()
    artifact = args.artifact
    if artifact is None:
        from rwkv2rknn.compiler import bundled

        artifact = bundled.ensure_compiled()
    with open(HELDOUT, encoding="utf-8") as f:
        text = f.read()
    print(f"artifact {artifact}, backend {args.backend}, load average {os.getloadavg()[0]:.1f}")
    res = {"ttft": ttft(args, artifact, text), "decode": overhead(args, artifact), "state": state_bytes()}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
