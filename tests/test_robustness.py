"""Robustness: a corpus of bad inputs and faults for every command.

Every failure is ONE short line on stderr starting with ``error: `` that names the problem and
the fix, exit 1 for a failed job and 2 for bad usage, and no traceback. Nothing is lost: a
compile that fails, is killed (SIGKILL) or interrupted (Ctrl-C) leaves the previous output and
the build cache whole, and two compiles can share the cache.

Everything runs the real CLI in a subprocess (``python -m rwkv2rknn``). Small models (2 layers,
width 32); ``--plan-only`` wherever rknn-toolkit2 is not the point.
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from rwkv2rknn.errors import BadInput, MissingDependency

PY = sys.executable
SHAPE = dict(layers=2, width=32, vocab=256, seed=5)
# toolkit builds: the one-token build of each NPU segment only (the T-row prefill builds take
# the same code path, twice the time)
NO_ROWS = ("--prefill-rows", "none")


# ------------------------------------------------------------------------------ helpers


def cli(*args, env=None, timeout=600):
    """Run the CLI; arguments may be bytes (passed to the OS as they are)."""
    argv = [PY, "-m", "rwkv2rknn", *[a if isinstance(a, bytes) else str(a) for a in args]]
    r = subprocess.run(argv, capture_output=True, env=env, timeout=timeout)
    r.out = r.stdout.decode("utf-8", "replace")
    r.err = r.stderr.decode("utf-8", "replace")
    return r


def error_line(r, code, *words):
    """The one `error: ` line of a failed command, checked."""
    assert r.returncode == code, (r.returncode, r.out[-800:], r.err[-3000:])
    assert "Traceback" not in r.err, r.err
    lines = [ln for ln in r.err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], r.err
    line = errors[0]
    assert len(line) < 300, line
    for w in words:
        assert w.lower() in line.lower(), (w, line)
    return line


def env_with(**kw):
    env = dict(os.environ)
    env.update({k: str(v) for k, v in kw.items()})
    return env


def scratch_env(folder, **kw):
    """env_with(**kw) and a private, empty TMPDIR ``folder`` (made here): where the compile and
    its build children put their temporary folders."""
    os.makedirs(folder)
    return env_with(TMPDIR=folder, **kw)


def scratch_left(folder):
    """What is left in a private TMPDIR (every entry, with what each folder holds)."""
    return {name: sorted(os.listdir(os.path.join(folder, name)))
            if os.path.isdir(os.path.join(folder, name)) else None for name in os.listdir(folder)}


def _scratch_of(pid):
    """Name prefixes of the temporary folders a compile (process ``pid``) makes for its builds."""
    return (f"rwkv2rknn-build-{pid}-", f"rwkv2rknn-worker-{pid}-")


def snapshot(folder):
    """Every file of a folder: relative path -> bytes."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, folder)] = fh.read()
    return out


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def edit_manifest(art, fn):
    path = os.path.join(art, "manifest.json")
    with open(path) as f:
        d = json.load(f)
    fn(d)
    with open(path, "w") as f:
        json.dump(d, f)


def partials_in(folder):
    return [n for n in os.listdir(folder) if ".partial" in n] if os.path.isdir(folder) else []


def whole_artifact(art, tokens=(1, 5, 9)):
    """The artifact loads, every segment file matches its checksum, and it runs."""
    from rwkv2rknn.runtime.hybrid import HybridModel, load_manifest
    m = load_manifest(art)
    for s in m.segments:
        if s.rknn:
            assert sha256(os.path.join(art, s.rknn)) == s.rknn_sha256
        if getattr(s, "seq_rknn", None):
            assert sha256(os.path.join(art, s.seq_rknn)) == s.seq_rknn_sha256
    model = HybridModel(str(art), backend="ort")  # verifies the ONNX checksums
    logits = model.logits(list(tokens))
    assert np.isfinite(logits).all()
    return m, logits


def procs_in_group(pgid):
    """Live (non-zombie) processes of a process group."""
    n = 0
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            n += 1
    return n


def wait_group(pgid, timeout=120):
    """Wait until every process of the group (the compile and its build children) has ended."""
    end = time.time() + timeout
    while procs_in_group(pgid):
        assert time.time() < end, "build children still running"
        time.sleep(0.1)


def _default_sigint():
    # a shell runs background jobs with SIGINT ignored, and a child inherits that: give the
    # compile the disposition a terminal's Ctrl-C meets
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_compile(model, out, env, *extra):
    return subprocess.Popen([PY, "-m", "rwkv2rknn", "compile", str(model), "-o", str(out), *NO_ROWS,
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            start_new_session=True, preexec_fn=_default_sigint)


def conv_model():
    """A small conv net (Conv + Relu): valid ONNX, not RWKV."""
    import onnx
    from onnx import TensorProto, helper
    rng = np.random.default_rng(0)
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3, 3, 3],
                           rng.standard_normal(108).astype(np.float32).tolist())
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c"], ["y"])], "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 16)])
    onnx.checker.check_model(m)
    return m


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("robust")


@pytest.fixture(scope="module")
def sd():
    from rwkv2rknn.models.checkpoint import random_checkpoint
    return random_checkpoint(**SHAPE)


@pytest.fixture(scope="module")
def model(sd, work):
    """A random RWKV-4 exported to per-layer fp32 files."""
    from rwkv2rknn.models.export import export
    d = str(work / "model")
    export(sd, d, fp32=True, tokenizer="bytes")
    return d


@pytest.fixture(scope="module")
def model1(work):
    """One layer: two NPU segments (the fewest toolkit builds)."""
    from rwkv2rknn.models.checkpoint import random_checkpoint
    from rwkv2rknn.models.export import export
    d = str(work / "model1")
    export(random_checkpoint(layers=1, width=32, vocab=256, seed=6), d, fp32=True, tokenizer="bytes")
    return d


@pytest.fixture(scope="module")
def wide(work):
    """The same shape but width 48."""
    from rwkv2rknn.models.checkpoint import random_checkpoint
    from rwkv2rknn.models.export import export
    d = str(work / "wide")
    export(random_checkpoint(**{**SHAPE, "width": 48}), d, fp32=True, tokenizer="bytes")
    return d


@pytest.fixture(scope="module")
def plan(model, work):
    """The model compiled with --plan-only."""
    from rwkv2rknn.compiler.driver import compile_model
    from rwkv2rknn.compiler.ir import Options
    d = str(work / "plan")
    compile_model(model, d, Options(plan_only=True))
    return d


@pytest.fixture(scope="module")
def pth(sd, work):
    from rwkv2rknn.models.checkpoint import save_checkpoint
    p = str(work / "model.pth")
    save_checkpoint(sd, p)
    return p


@pytest.fixture(scope="module")
def bad(work, model, wide, plan, sd, pth):
    """The corpus of bad inputs, by name."""
    import onnx
    import torch
    from rwkv2rknn.models.checkpoint import save_checkpoint
    d = work / "bad"
    d.mkdir()
    b = {}

    def folder_copy(src, name):
        dst = str(d / name)
        shutil.copytree(src, dst)
        b[name] = dst
        return dst

    def write(name, data):
        p = str(d / name)
        with open(p, "wb") as f:
            f.write(data)
        b[name.replace(".", "_")] = p
        return p

    b["empty_dir"] = str(d / "empty_dir")
    os.mkdir(b["empty_dir"])
    # per-layer folders
    os.remove(os.path.join(folder_copy(model, "no_mixing_1"), "mixing_1.onnx"))
    os.remove(os.path.join(folder_copy(model, "no_mixing_0"), "mixing_0.onnx"))
    p = os.path.join(folder_copy(model, "truncated"), "mixing_0.onnx")
    blob = open(p, "rb").read()
    open(p, "wb").write(blob[:len(blob) // 2])
    open(os.path.join(folder_copy(model, "empty_onnx"), "embed.onnx"), "wb").close()
    with open(os.path.join(folder_copy(model, "text_as_onnx"), "head.onnx"), "w") as f:
        f.write("this is a text file, not a model\n" * 20)
    shutil.copy(os.path.join(wide, "mixing_1.onnx"),
                os.path.join(folder_copy(model, "mixed_widths"), "mixing_1.onnx"))
    m = onnx.load(os.path.join(model, "mixing_0.onnx"))
    m.graph.input[1].name = "state"
    for n in m.graph.node:
        n.input[:] = ["state" if x == "state_in" else x for x in n.input]
    onnx.save(m, os.path.join(folder_copy(model, "renamed_input"), "mixing_0.onnx"))
    m = onnx.load(os.path.join(model, "head.onnx"))
    m.graph.output[0].name = "logits"
    for n in m.graph.node:
        n.output[:] = ["logits" if x == "output" else x for x in n.output]
    onnx.save(m, os.path.join(folder_copy(model, "renamed_output"), "head.onnx"))
    conv = conv_model()
    b["conv_dir"] = str(d / "conv_dir")
    os.mkdir(b["conv_dir"])
    for name in ("embed.onnx", "mixing_0.onnx", "head.onnx"):
        onnx.save(conv, os.path.join(b["conv_dir"], name))
    b["conv_file"] = str(d / "conv.onnx")
    onnx.save(conv, b["conv_file"])
    write("notes.onnx", b"just some notes\n" * 10)
    blob = open(os.path.join(model, "mixing_1.onnx"), "rb").read()
    write("half.onnx", blob[:len(blob) // 2])
    # checkpoints
    write("empty.pth", b"")
    blob = open(pth, "rb").read()
    write("truncated.pth", blob[:len(blob) // 2])
    write("text.pth", b"not a checkpoint\n" * 10)
    torch.save({"note": "a dict, but no tensors", "n": 3}, str(d / "no_tensors.pth"))
    b["no_tensors_pth"] = str(d / "no_tensors.pth")
    other = {"conv1.weight": np.ones((4, 3, 3, 3), np.float32), "fc.weight": np.ones((10, 4), np.float32),
             "fc.bias": np.zeros(10, np.float32)}
    b["other_pth"] = str(d / "other.pth")
    save_checkpoint(other, b["other_pth"])
    v6 = dict(sd)
    v6["blocks.0.att.time_maa_x"] = np.zeros((1, 1, SHAPE["width"]), np.float32)
    b["rwkv6_pth"] = str(d / "rwkv6.pth")
    save_checkpoint(v6, b["rwkv6_pth"])
    v5 = dict(sd)
    v5["blocks.0.att.ln_x.weight"] = np.ones(SHAPE["width"], np.float32)
    b["rwkv5_pth"] = str(d / "rwkv5.pth")
    save_checkpoint(v5, b["rwkv5_pth"])
    # artifacts
    os.remove(os.path.join(folder_copy(plan, "art_no_manifest"), "manifest.json"))
    with open(os.path.join(folder_copy(plan, "art_not_json"), "manifest.json"), "w") as f:
        f.write("{this is not json")
    p = os.path.join(folder_copy(plan, "art_truncated_json"), "manifest.json")
    text = open(p).read()
    open(p, "w").write(text[:len(text) // 2])
    edit_manifest(folder_copy(plan, "art_v4"), lambda m: m.update(format_version=4))
    edit_manifest(folder_copy(plan, "art_other_format"), lambda m: m.update(format="something-else"))
    edit_manifest(folder_copy(plan, "art_no_segments"), lambda m: m.update(segments=[]))
    edit_manifest(folder_copy(plan, "art_moved_source"),
                  lambda m: m["model"].update(source=str(d / "gone")))
    with open(os.path.join(plan, "manifest.json")) as f:
        seg = json.load(f)["segments"][1]["onnx"]
    os.remove(os.path.join(folder_copy(plan, "art_no_segment"), seg))
    p = os.path.join(folder_copy(plan, "art_changed_segment"), seg)
    blob = bytearray(open(p, "rb").read())
    blob[-100] ^= 0xFF
    open(p, "wb").write(bytes(blob))
    art = folder_copy(plan, "art_corrupt_segment")  # cut in half, checksum updated to match
    blob = open(os.path.join(art, seg), "rb").read()
    open(os.path.join(art, seg), "wb").write(blob[:len(blob) // 2])
    new = sha256(os.path.join(art, seg))
    edit_manifest(art, lambda m: [s.update(sha256=new) for s in m["segments"] if s["onnx"] == seg])
    return b


# ------------------------------------------------------------------------------ the corpus

OUT = "{out}"
CASES = [
    # export
    ("export-missing", ["export", "{missing}", "-o", OUT], 1, ["does not exist"]),
    ("export-empty-path", ["export", "", "-o", OUT], 1, ["does not exist"]),
    ("export-empty-file", ["export", "{empty_pth}", "-o", OUT], 1, ["cannot read checkpoint"]),
    ("export-truncated", ["export", "{truncated_pth}", "-o", OUT], 1, ["cannot read checkpoint", "truncated"]),
    ("export-text-file", ["export", "{text_pth}", "-o", OUT], 1, ["cannot read checkpoint"]),
    ("export-no-tensors", ["export", "{no_tensors_pth}", "-o", OUT], 1, ["not a state dict of tensors"]),
    ("export-not-rwkv", ["export", "{other_pth}", "-o", OUT], 1, ["not an RWKV checkpoint", "RWKV-4"]),
    ("export-rwkv6-damaged", ["export", "{rwkv6_pth}", "-o", OUT], 1, ["not an RWKV-6 checkpoint"]),
    ("export-rwkv5-damaged", ["export", "{rwkv5_pth}", "-o", OUT], 1, ["not an RWKV-5.2 checkpoint"]),
    ("export-folder-as-checkpoint", ["export", "{model}", "-o", OUT], 1, ["holds ONNX files",
                                                                          "rwkv2rknn compile"]),
    ("export-no-output", ["export", "{pth}"], 2, ["missing option", "--help"]),
    ("export-into-foreign-folder", ["export", "{pth}", "-o", "{foreign}"], 1, ["holds other files", "--force"]),
    # compile
    ("compile-missing", ["compile", "{missing}", "-o", OUT, "--plan-only"], 1, ["does not exist"]),
    ("compile-empty-path", ["compile", "", "-o", OUT, "--plan-only"], 1, ["does not exist"]),
    ("compile-empty-folder", ["compile", "{empty_dir}", "-o", OUT, "--plan-only"], 1, ["has no embed.onnx"]),
    ("compile-no-mixing-1", ["compile", "{no_mixing_1}", "-o", OUT, "--plan-only"], 1,
     ["missing mixing_1.onnx", "export the model again"]),
    ("compile-no-mixing-0", ["compile", "{no_mixing_0}", "-o", OUT, "--plan-only"], 1, ["missing mixing_0.onnx"]),
    ("compile-truncated-onnx", ["compile", "{truncated}", "-o", OUT, "--plan-only"], 1,
     ["mixing_0.onnx", "truncated", "export it again"]),
    ("compile-empty-onnx", ["compile", "{empty_onnx}", "-o", OUT, "--plan-only"], 1, ["embed.onnx", "empty"]),
    ("compile-text-as-onnx", ["compile", "{text_as_onnx}", "-o", OUT, "--plan-only"], 1,
     ["head.onnx", "not a readable ONNX model"]),
    ("compile-conv-folder", ["compile", "{conv_dir}", "-o", OUT, "--plan-only"], 1,
     ["not the per-layer RWKV ONNX layout"]),
    ("compile-mixed-widths", ["compile", "{mixed_widths}", "-o", OUT, "--plan-only"], 1,
     ["disagree on the width", "one export"]),
    ("compile-renamed-input", ["compile", "{renamed_input}", "-o", OUT, "--plan-only"], 1,
     ["mixing_0.onnx", "'state'", "state_in"]),
    ("compile-renamed-output", ["compile", "{renamed_output}", "-o", OUT, "--plan-only"], 1,
     ["head.onnx", "'logits'", "per-layer RWKV ONNX layout"]),
    ("compile-text-file", ["compile", "{notes_onnx}", "-o", OUT, "--plan-only"], 1, ["not a readable ONNX model"]),
    ("compile-half-file", ["compile", "{half_onnx}", "-o", OUT, "--plan-only"], 1, ["truncated"]),
    ("compile-checkpoint", ["compile", "{pth}", "-o", OUT, "--plan-only"], 1, ["is a checkpoint, not ONNX",
                                                                              "rwkv2rknn export"]),
    ("compile-output-is-file", ["compile", "{model}", "-o", "{pth}", "--plan-only"], 2, ["is a file"]),
    ("compile-unknown-target", ["compile", "{model}", "-o", OUT, "--target", "rk9999", "--plan-only"], 2,
     ["--target", "rk9999"]),
    ("compile-calib-zero", ["compile", "{model}", "-o", OUT, "--calib-tokens", "0", "--plan-only"], 2,
     ["--calib-tokens"]),
    ("compile-unknown-pass", ["compile", "{model}", "-o", OUT, "--dump-after", "nope", "--plan-only"], 2,
     ["unknown pass", "use one of"]),
    ("compile-bad-prefill-rows", ["compile", "{model}", "-o", OUT, "--prefill-rows", "1,x", "--plan-only"], 2,
     ["--prefill-rows", "16,64"]),
    ("compile-unknown-option", ["compile", "{model}", "-o", OUT, "--fast"], 2, ["--fast", "--help"]),
    ("compile-into-foreign-folder", ["compile", "{model}", "-o", "{foreign}", "--plan-only"], 1,
     ["holds other files", "--force"]),
    # run
    ("run-missing", ["run", "{missing}", "--prompt", "hi", "--backend", "ort"], 1, ["is not a folder"]),
    ("run-empty-path", ["run", "", "--prompt", "hi", "--backend", "ort"], 1, ["is not a folder"]),
    ("run-empty-folder", ["run", "{empty_dir}", "--prompt", "hi", "--backend", "ort"], 1, ["no manifest.json"]),
    ("run-no-manifest", ["run", "{art_no_manifest}", "--prompt", "hi", "--backend", "ort"], 1,
     ["no manifest.json", "compile"]),
    ("run-manifest-not-json", ["run", "{art_not_json}", "--prompt", "hi", "--backend", "ort"], 1,
     ["corrupt", "compile the model again"]),
    ("run-manifest-truncated", ["run", "{art_truncated_json}", "--prompt", "hi", "--backend", "ort"], 1,
     ["corrupt"]),
    ("run-manifest-version-4", ["run", "{art_v4}", "--prompt", "hi", "--backend", "ort"], 1,
     ["format version 4", "reads versions 1, 2, 3", "compile the model again"]),
    ("run-manifest-other-format", ["run", "{art_other_format}", "--prompt", "hi", "--backend", "ort"], 1,
     ["not an rwkv2rknn manifest"]),
    ("run-manifest-no-segments", ["run", "{art_no_segments}", "--prompt", "hi", "--backend", "ort"], 1,
     ["lists no segments"]),
    ("run-segment-missing", ["run", "{art_no_segment}", "--prompt", "hi", "--backend", "ort"], 1,
     ["is missing", "compile the model again"]),
    ("run-segment-changed", ["run", "{art_changed_segment}", "--prompt", "hi", "--backend", "ort"], 1,
     ["checksum"]),
    ("run-segment-corrupt", ["run", "{art_corrupt_segment}", "--prompt", "hi", "--backend", "ort"], 1,
     ["onnxruntime cannot load", "corrupt"]),
    ("run-uncompiled-conv", ["run", "{conv_dir}", "--tokens", "1", "--backend", "ort"], 1,
     ["not the per-layer RWKV ONNX layout"]),
    ("run-uncompiled-mixed-widths", ["run", "{mixed_widths}", "--tokens", "1", "--backend", "ort"], 1,
     ["disagree on the width"]),
    ("run-uncompiled-no-mixing-1", ["run", "{no_mixing_1}", "--tokens", "1", "--backend", "ort"], 1,
     ["missing mixing_1.onnx"]),
    ("run-uncompiled-rknn-sim", ["run", "{model}", "--prompt", "hi", "--backend", "rknn-sim"], 2,
     ["compile it first"]),
    ("run-prompt-empty", ["run", "{plan}", "--prompt", "", "--backend", "ort"], 2, ["prompt is empty"]),
    ("run-prompt-invalid-utf8", ["run", "{plan}", "--prompt", b"\xff\xfe", "--backend", "ort"], 2,
     ["not valid UTF-8"]),
    ("run-nothing-to-do", ["run", "{plan}", "--backend", "ort"], 2, ["nothing to do", "--prompt"]),
    ("run-tokens-and-prompt", ["run", "{plan}", "--tokens", "1", "--prompt", "hi", "--backend", "ort"], 2,
     ["give one of them"]),
    ("run-tokens-not-numbers", ["run", "{plan}", "--tokens", "1,x,3", "--backend", "ort"], 2,
     ["not a comma-separated list", "--tokens 5,17,300"]),
    ("run-tokens-words", ["run", "{plan}", "--tokens", "hello", "--backend", "ort"], 2, ["not a comma-separated"]),
    ("run-tokens-float", ["run", "{plan}", "--tokens", "1.5", "--backend", "ort"], 2, ["not a comma-separated"]),
    ("run-tokens-empty", ["run", "{plan}", "--tokens", "", "--backend", "ort"], 2, ["--tokens is empty"]),
    ("run-tokens-commas", ["run", "{plan}", "--tokens", " , ,", "--backend", "ort"], 2, ["--tokens is empty"]),
    ("run-token-at-vocab", ["run", "{plan}", "--tokens", "1,256", "--backend", "ort"], 2,
     ["token id 256 is outside the vocabulary (0..255)"]),
    ("run-token-negative", ["run", "{plan}", "--tokens", "-1", "--backend", "ort"], 2, ["outside the vocabulary"]),
    ("run-token-huge", ["run", "{plan}", "--tokens", "99999999999999999999999", "--backend", "ort"], 2,
     ["outside the vocabulary"]),
    ("run-max-tokens-zero", ["run", "{plan}", "--prompt", "hi", "--max-tokens", "0", "--backend", "ort"], 2,
     ["--max-tokens 0", "1 to 65536"]),
    ("run-max-tokens-negative", ["run", "{plan}", "--prompt", "hi", "--max-tokens", "-5", "--backend", "ort"], 2,
     ["--max-tokens -5"]),
    ("run-max-tokens-huge", ["run", "{plan}", "--prompt", "hi", "--max-tokens", str(10**12), "--backend", "ort"], 2,
     ["out of range"]),
    ("run-max-tokens-text", ["run", "{plan}", "--prompt", "hi", "--max-tokens", "many", "--backend", "ort"], 2,
     ["--max-tokens", "many"]),
    ("run-temperature-negative", ["run", "{plan}", "--prompt", "hi", "--temperature", "-1", "--backend", "ort"], 2,
     ["--temperature"]),
    ("run-unknown-backend", ["run", "{plan}", "--prompt", "hi", "--backend", "gpu"], 2, ["--backend", "'gpu'"]),
    ("run-logits-out-no-folder", ["run", "{plan}", "--tokens", "1", "--logits-out", "{missing}/l.npy",
                                  "--backend", "ort"], 2, ["--logits-out", "does not exist"]),
    ("run-logits-out-without-tokens", ["run", "{plan}", "--prompt", "hi", "--logits-out", "{out}.npy",
                                       "--backend", "ort"], 2, ["--logits-out needs --tokens"]),
    ("run-unknown-tokenizer", ["run", "{plan}", "--prompt", "hi", "--tokenizer", "nonsense", "--backend", "ort"],
     1, ["unknown tokenizer 'nonsense'"]),
    ("run-rknn-lite-plan-only", ["run", "{plan}", "--prompt", "hi", "--backend", "rknn-lite"], 1,
     ["--plan-only", "--backend ort"]),
    # check
    ("check-missing", ["check", "{missing}", "--backend", "ort"], 1, ["is not a folder"]),
    ("check-no-manifest", ["check", "{art_no_manifest}", "--backend", "ort"], 1, ["no manifest.json"]),
    ("check-manifest-not-json", ["check", "{art_not_json}", "--backend", "ort"], 1, ["corrupt"]),
    ("check-segment-changed", ["check", "{art_changed_segment}", "--backend", "ort"], 1, ["checksum"]),
    ("check-source-moved", ["check", "{art_moved_source}", "--backend", "ort"], 1, ["pass --reference"]),
    ("check-reference-missing", ["check", "{plan}", "--backend", "ort", "--reference", "{missing}"], 1,
     ["pass --reference"]),
    ("check-reference-other-width", ["check", "{plan}", "--backend", "ort", "--reference", "{wide}"], 1,
     ["not the model the artifact was compiled from"]),
    ("check-reference-conv", ["check", "{plan}", "--backend", "ort", "--reference", "{conv_dir}"], 1,
     ["not the per-layer RWKV ONNX layout"]),
    ("check-reference-truncated", ["check", "{plan}", "--backend", "ort", "--reference", "{truncated}"], 1,
     ["onnxruntime cannot load mixing_0.onnx", "not a valid ONNX model"]),
    ("check-tokens-zero", ["check", "{plan}", "--backend", "ort", "--tokens", "0"], 2, ["--tokens"]),
    ("check-min-top1", ["check", "{plan}", "--backend", "ort", "--min-top1", "2"], 2, ["--min-top1"]),
    ("check-unknown-backend", ["check", "{plan}", "--backend", "cuda"], 2, ["--backend"]),
    # bench
    ("bench-layers-zero", ["bench", "--layers", "0"], 2, ["--layers"]),
    ("bench-version-eight", ["bench", "--version", "8"], 2, ["--version"]),
    ("bench-width-tiny", ["bench", "--width", "4"], 2, ["--width"]),
    ("bench-tokens-two", ["bench", "--tokens", "2"], 2, ["--tokens"]),
    ("bench-vocab-text", ["bench", "--vocab", "lots"], 2, ["--vocab"]),
    ("bench-json-out-no-folder", ["bench", "--layers", "1", "--width", "8", "--vocab", "4", "--tokens", "3",
                                  "--no-rwkv", "--json-out", "{missing}/b.json"], 2, ["--json-out", "does not exist"]),
    # demo, and the group itself
    ("demo-prompt-empty", ["demo", "--prompt", ""], 2, ["prompt is empty"]),
    ("demo-prompt-invalid-utf8", ["demo", "--prompt", b"\xff\xfe"], 2, ["not valid UTF-8"]),
    ("demo-max-tokens-zero", ["demo", "--max-tokens", "0"], 2, ["--max-tokens"]),
    ("unknown-command", ["frobnicate"], 2, ["no such command"]),
]


@pytest.mark.parametrize("args,code,words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(args, code, words, bad, model, plan, wide, pth, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("keep me")
    paths = {**bad, "model": model, "plan": plan, "wide": wide, "pth": pth,
             "missing": str(tmp_path / "missing"), "out": str(tmp_path / "out"), "foreign": str(foreign)}
    argv = [a if isinstance(a, bytes) else a.format(**paths) for a in args]
    before = {k: snapshot(v) for k, v in (("plan", plan), ("model", model))}
    r = cli(*argv)
    error_line(r, code, *words)
    # nothing written, nothing half-written, nothing lost
    assert not os.path.exists(tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["foreign"]
    assert snapshot(foreign) == {"mine.txt": b"keep me"}
    assert {k: snapshot(v) for k, v in (("plan", plan), ("model", model))} == before


def test_debug_shows_the_traceback(bad, tmp_path):
    r = cli("--debug", "compile", bad["truncated"], "-o", tmp_path / "o", "--plan-only")
    assert r.returncode != 0 and "Traceback" in r.err and "BadInput" in r.err


# ------------------------------------------------------------------------------ not RWKV, as one file


def test_single_conv_file_compiles_as_a_lone_graph_and_run_refuses_it(bad, tmp_path):
    """A single .onnx is compiled as a lone graph: a conv net may compile; the result must be
    sane (its segments, chained, compute what the model computes) and `run`/`check` refuse it."""
    import onnx
    from rwkv2rknn.runtime.hybrid import load_manifest
    from rwkv2rknn.runtime.ort import OrtRunner
    out = tmp_path / "conv.art"
    r = cli("compile", bad["conv_file"], "-o", out, "--plan-only")
    assert r.returncode == 0, r.err
    assert "Traceback" not in r.err and "segments (" in r.out
    m = load_manifest(out)
    assert m.token_input == "" and m.logits_output == "" and m.model["arch"] == "onnx"
    assert m.segments and {"Conv"} <= {n.op_type for s in m.segments
                                       for n in onnx.load(os.path.join(out, s.onnx)).graph.node}
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    env = {"x": x}
    for s in m.segments:
        assert sha256(os.path.join(out, s.onnx)) == s.sha256
        env.update(OrtRunner(os.path.join(out, s.onnx), s.name).infer({k: env[k] for k in s.inputs}))
    want = OrtRunner(bad["conv_file"]).infer({"x": x})["y"]
    np.testing.assert_allclose(env["y"], want, rtol=1e-5, atol=1e-5)
    error_line(cli("run", out, "--prompt", "hi", "--backend", "ort"), 1, "single ONNX graph", "compile a whole model")
    error_line(cli("run", out, "--tokens", "1", "--backend", "ort"), 1, "single ONNX graph")
    error_line(cli("check", out, "--backend", "ort"), 1, "single ONNX graph")


# ------------------------------------------------------------------------------ nothing lost


def test_foreign_output_folder_is_replaced_only_with_force(model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    error_line(cli("compile", model, "-o", out, "--plan-only"), 1, "holds other files", "--force")
    assert os.listdir(out) == ["notes.txt"]
    r = cli("compile", model, "-o", out, "--plan-only", "--force")
    assert r.returncode == 0, r.err
    assert not os.path.exists(out / "notes.txt")
    whole_artifact(out)
    assert not partials_in(tmp_path)


def test_failed_compile_of_a_bad_model_keeps_the_previous_artifact(bad, plan, tmp_path):
    out = tmp_path / "art"
    shutil.copytree(plan, out)
    before = snapshot(out)
    for src in (bad["truncated"], bad["mixed_widths"], bad["conv_dir"], bad["no_mixing_1"]):
        error_line(cli("compile", src, "-o", out, "--plan-only"), 1)
        assert snapshot(out) == before
    whole_artifact(out)
    assert not partials_in(tmp_path)


def test_compile_failing_midway_keeps_the_previous_artifact(model1, tmp_path):
    """--strict with a toolkit build that crashes fails inside the build pass, after the new
    artifact's segment files were written: the previous artifact stays as it was."""
    from rwkv2rknn.compiler.driver import compile_model
    from rwkv2rknn.compiler.ir import Options
    out = tmp_path / "art"
    compile_model(model1, str(out), Options(plan_only=True))
    before = snapshot(out)
    cache = tmp_path / "cache"
    tmp = tmp_path / "tmp"
    r = cli("compile", model1, "-o", out, "--strict", *NO_ROWS,
            env=scratch_env(tmp, RWKV2RKNN_FLOAT_DTYPE="tfloat32", RWKV2RKNN_CACHE=cache))
    error_line(r, 1, "build", "failed", "--strict")
    assert snapshot(out) == before
    whole_artifact(out)
    assert not partials_in(tmp_path)
    assert scratch_left(tmp) == {}  # the build's temporary folders are gone on an error too
    assert not [e for e in os.listdir(cache / "rknn") if not e.endswith(".lock")]


def test_stale_partial_folders_of_killed_compiles_are_removed(model, tmp_path):
    """A `.OUT.partial-PID-*` folder whose process is gone is removed by the next compile; one of
    a running process is left alone."""
    pid = 4194000
    while os.path.exists(f"/proc/{pid}"):
        pid -= 1
    dead = tmp_path / f".out.partial-{pid}-abc"
    live = tmp_path / f".out.partial-{os.getppid()}-def"  # our parent: certainly running
    for d in (dead, live):
        d.mkdir()
        (d / "manifest.json").write_text("{half")
    r = cli("compile", model, "-o", tmp_path / "out", "--plan-only")
    assert r.returncode == 0, r.err
    assert not dead.exists() and live.exists()
    whole_artifact(tmp_path / "out")


def test_stale_cache_partials_are_removed(tmp_path):
    from rwkv2rknn.rknn.build import clean_stale_partials
    pid = 4194000
    while os.path.exists(f"/proc/{pid}"):
        pid -= 1
    names = [f"k.rknn.partial-{pid}", f"k.rknn.partial-{os.getpid()}", "k.rknn"]
    for n in names:
        (tmp_path / n).write_bytes(b"x")
    clean_stale_partials(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == sorted(names[1:])


def _whole_or_previous(out, before):
    """OUT is missing (before is None), the previous artifact byte for byte, or a whole new one."""
    if before is None and not os.path.exists(out):
        return "missing"
    if before is not None and snapshot(out) == before:
        whole_artifact(out)
        return "previous"
    whole_artifact(out)
    return "new"


def test_killed_compile_loses_nothing_and_the_next_one_reuses_the_cache(model, plan, tmp_path):
    """SIGKILL a compile at several moments (the compile alone, or its whole process group with
    the build child): OUT is missing or whole, cache entries are whole, and the next compile
    succeeds, cleans up, and takes every whole entry from the cache."""
    cache, tmp = tmp_path / "cache", tmp_path / "tmp"
    env = scratch_env(tmp, RWKV2RKNN_CACHE=cache)
    fresh, out = tmp_path / "fresh", tmp_path / "out"
    shutil.copytree(plan, out)  # a complete previous artifact
    before = snapshot(out)
    hit_a_build = False
    # an early kill, then two kills while a toolkit build child runs (waited for, so a slow
    # machine does not turn them into early kills too)
    for delay, in_build, whole_group, target in ((0.5, False, False, fresh), (0.3, True, False, out),
                                                 (1.0, True, True, out)):
        p = start_compile(model, target, env)
        deadline = time.monotonic() + 60
        while in_build and procs_in_group(p.pid) < 2 and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(delay)
        busy = procs_in_group(p.pid) >= 2  # a build child is running
        if p.poll() is None:  # builds side by side and the cache can finish a compile first
            (os.killpg if whole_group else os.kill)(p.pid, signal.SIGKILL)
        p.communicate()
        wait_group(p.pid)
        hit_a_build |= p.returncode == -signal.SIGKILL and busy
        state = _whole_or_previous(target, before if target == out else None)
        if state == "new" and target == out:
            before = snapshot(out)
        rknn = cache / "rknn"
        for e in (os.listdir(rknn) if rknn.exists() else []):
            if not whole_group:  # an orphaned build child finishes its entry, whole
                assert e.endswith((".rknn", ".sha256", ".lock")) and ".partial" not in e, e
                assert ".tmp" not in e, e
            if e.endswith(".rknn"):
                assert os.path.getsize(rknn / e) > 0
    assert hit_a_build, "no kill landed while a toolkit build was running"
    whole = {e: (cache / "rknn" / e).read_bytes() for e in os.listdir(cache / "rknn") if e.endswith(".rknn")}
    if busy and p.returncode == -signal.SIGKILL:  # the last kill left its build's folders
        assert [n for n in scratch_left(tmp) if n.startswith(_scratch_of(p.pid))], scratch_left(tmp)
    r = cli("compile", model, "-o", out, *NO_ROWS, env=env)
    assert r.returncode == 0, r.err
    assert scratch_left(tmp) == {}  # the next compile removed what the killed ones left
    m, logits = whole_artifact(out)
    npu = [s for s in m.segments if s.backend == "npu"]
    assert npu and not any(s.fallback for s in m.segments)
    # builds are not byte-reproducible: an entry that was reused is still the same bytes, and
    # the artifact got exactly those bytes
    for e, data in whole.items():
        assert (cache / "rknn" / e).read_bytes() == data, f"{e} was rebuilt"
    reused = [s for s in npu if (out / s.rknn).read_bytes() in whole.values()]
    assert len(reused) == len(whole)
    note = [x for x in m.report if x.startswith("build:")][0]
    assert f"{len(npu) - len(whole)} built, {len(whole)} from the cache" in note, (note, list(whole))
    assert r.err.count(": cached") == len(whole)
    assert not partials_in(cache / "rknn")
    assert not [p for p in partials_in(tmp_path) if p.startswith(".out.")]  # stale ones removed
    r = cli("compile", model, "-o", fresh, "--plan-only")  # and those beside the other output
    assert r.returncode == 0, r.err
    assert not partials_in(tmp_path)
    from rwkv2rknn.runtime.reference import PerLayerModel
    np.testing.assert_allclose(logits, PerLayerModel(model).logits([1, 5, 9]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("delay,whole_group,sig", [(0.4, True, signal.SIGINT),
                                                   (1.5, False, signal.SIGINT),
                                                   (0.3, True, signal.SIGTERM)],
                         ids=["ctrl-c-early-group", "sigint-during-build", "sigterm-during-build"])
def test_ctrl_c_exits_130_and_loses_nothing(model, plan, tmp_path, delay, whole_group, sig):
    """Ctrl-C (SIGINT) exits 130, SIGTERM 143, each with one line; the previous artifact, the
    cache and the temporary folders are as they were. SIGTERM lands while a build runs (its
    temporary folders listed there before it)."""
    cache, tmp = tmp_path / "cache", tmp_path / "tmp"
    out = tmp_path / "out"
    shutil.copytree(plan, out)
    before = snapshot(out)
    p = start_compile(model, out, scratch_env(tmp, RWKV2RKNN_CACHE=cache))
    deadline = time.monotonic() + 60
    while sig == signal.SIGTERM and procs_in_group(p.pid) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(delay)
    during = scratch_left(tmp)
    (os.killpg if whole_group else os.kill)(p.pid, sig)
    _, err = p.communicate(timeout=300)
    wait_group(p.pid)
    err = err.decode("utf-8", "replace")
    code, word = (130, "interrupted") if sig == signal.SIGINT else (143, "terminated")
    assert p.returncode == code, err
    assert err.strip().splitlines()[-1] == word and "Traceback" not in err, err
    assert snapshot(out) == before
    assert not partials_in(tmp_path)
    assert not partials_in(cache / "rknn")
    if sig == signal.SIGTERM:
        assert any(n.startswith(_scratch_of(p.pid)) for n in during), during
    assert scratch_left(tmp) == {}, (during, err)


@pytest.fixture(scope="module")
def two_at_once(model, work):
    """Two compiles of the same model started together, sharing one fresh cache."""
    cache = work / "shared-cache"
    env = scratch_env(work / "at-once-tmp", RWKV2RKNN_CACHE=cache)
    outs = [work / "at-once-a", work / "at-once-b"]
    procs = [start_compile(model, o, env) for o in outs]
    results = []
    for p in procs:
        o, e = p.communicate(timeout=600)
        results.append((p.returncode, o.decode(), e.decode()))
    return cache, outs, results


def test_two_compiles_share_the_cache(two_at_once, model):
    """Both succeed; the cache holds only whole entries, and each is byte for byte the .rknn
    that one of the artifacts got (builds are not byte-reproducible, so this is one build)."""
    from rwkv2rknn.runtime.hybrid import load_manifest
    cache, outs, results = two_at_once
    for code, out, err in results:
        assert code == 0, err
        assert "fell back" not in out and "Traceback" not in err
    assert scratch_left(cache.parent / "at-once-tmp") == {}  # TMPDIR as it was before them
    names = os.listdir(cache / "rknn")  # entries, their checksums and locks; no partial files
    assert names and all(e.endswith((".rknn", ".sha256", ".lock")) for e in names), names
    entries = [e for e in names if e.endswith(".rknn")]
    got = []
    for art in outs:
        m, _ = whole_artifact(art)
        npu = [s for s in m.segments if s.backend == "npu"]
        assert npu and all(s.rknn for s in npu)
        got += [(art / s.rknn).read_bytes() for s in npu]
    assert len(entries) == len(got) // 2  # one entry per NPU segment of the (one) model
    for e in entries:
        data = (cache / "rknn" / e).read_bytes()
        assert data and data in got, e
    a, b = load_manifest(outs[0]), load_manifest(outs[1])
    assert [s.sha256 for s in a.segments] == [s.sha256 for s in b.segments]  # the same plan


# ------------------------------------------------------------------------------ faults


def test_crashing_toolkit_build_falls_back_and_the_cli_reports_it(model1, tmp_path):
    """float_dtype='tfloat32' makes rknn-toolkit2 2.5.0 kill its own process during build."""
    out, cache, tmp = tmp_path / "art", tmp_path / "cache", tmp_path / "tmp"
    r = cli("compile", model1, "-o", out, *NO_ROWS,
            env=scratch_env(tmp, RWKV2RKNN_FLOAT_DTYPE="tfloat32", RWKV2RKNN_CACHE=cache))
    assert r.returncode == 0, r.err
    assert scratch_left(tmp) == {}  # nor when the toolkit ended its own process
    assert "Traceback" not in r.err
    assert "failed, CPU fallback" in r.err
    assert "* NPU candidate that fell back to the CPU" in r.out and "the toolkit's process" in r.out
    assert "cpu*" in r.out  # the table marks each fallen-back segment
    assert not [e for e in os.listdir(cache / "rknn") if not e.endswith(".lock")]  # no entry
    m, _ = whole_artifact(out)
    assert all(s.backend == "cpu" for s in m.segments)
    r = cli("run", out, "--tokens", "1,2,3", "--backend", "ort")
    assert r.returncode == 0, r.err


def _scale_output(path, name, factor=1e30, times=3):
    """Make output `name` of the ONNX file at `path` come out multiplied by factor**times."""
    import onnx
    from onnx import helper, numpy_helper
    m = onnx.load(path)
    pre = name + "__pre"
    producer = next(n for n in m.graph.node if name in n.output)
    producer.output[:] = [pre if x == name else x for x in producer.output]
    for n in m.graph.node:
        n.input[:] = [pre if x == name else x for x in n.input]
    elem = next(o for o in m.graph.output if o.name == name).type.tensor_type.elem_type
    dtype = helper.tensor_dtype_to_np_dtype(elem)
    m.graph.initializer.append(numpy_helper.from_array(np.array(factor, dtype), "big__"))
    cur = pre
    for i in range(times):
        nxt = name if i == times - 1 else f"{pre}{i}"
        m.graph.node.append(helper.make_node("Mul", [cur, "big__"], [nxt], name=f"poison{i}"))
        cur = nxt
    onnx.save(m, path)
    return sha256(path)


def _poison_npu_segment(art):
    """Scale the first output of the first NPU segment (and of its T-row prefill variant, if
    any) by 1e90, inf in float32; update the checksums so that only the numbers are wrong."""
    from rwkv2rknn.runtime.hybrid import load_manifest
    seg = next(s for s in load_manifest(art).segments if s.backend == "npu")
    name = seg.outputs[0]
    sums = {"sha256": _scale_output(os.path.join(art, seg.onnx), name)}
    if getattr(seg, "seq_onnx", None):
        sums["seq_sha256"] = _scale_output(os.path.join(art, seg.seq_onnx), name)
    edit_manifest(art, lambda d: [s.update(sums) for s in d["segments"] if s["name"] == seg.name])
    return seg.name


def test_inf_in_an_npu_segment_fails_with_the_segment_named(plan, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(plan, art)
    name = _poison_npu_segment(art)
    r = cli("run", art, "--prompt", "hi", "--max-tokens", "8", "--seed", "1", "--backend", "ort")
    error_line(r, 1, f"segment {name}", "NaN/inf", "even in fp32")
    assert r.out in ("", "hi")  # the prompt echo at most, never generated garbage
    r = cli("run", art, "--tokens", "1,2,3", "--backend", "ort")
    error_line(r, 1, f"segment {name}", "NaN/inf")
    assert r.out == ""
    r = cli("check", art, "--backend", "ort")
    error_line(r, 1, f"segment {name}", "NaN/inf")
    assert "PASS" not in r.out


# ------------------------------------------------------------------------------ missing toolkits

HIDE_RKNN = '''
import sys


class _HideRknn:
    """rknn-toolkit2 looks uninstalled: importing rknn (or rknn.*) fails."""

    def find_spec(self, name, path=None, target=None):
        if name == "rknn" or name.startswith("rknn."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _HideRknn())
'''


@pytest.fixture(scope="module", params=["broken-package", "hidden-by-finder"])
def no_toolkit(request, work):
    """An environment where rknn-toolkit2 cannot be imported: a package `rknn` first on
    PYTHONPATH whose import fails, or a sitecustomize whose meta-path finder hides `rknn`."""
    d = work / request.param
    if request.param == "broken-package":
        (d / "rknn").mkdir(parents=True)
        (d / "rknn" / "__init__.py").write_text('raise ImportError("rknn-toolkit2 is broken here (test)")\n')
    else:
        d.mkdir()
        (d / "sitecustomize.py").write_text(HIDE_RKNN)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(d)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    probe = subprocess.run([PY, "-c", "from rwkv2rknn.runtime.board import toolkit_available\nfrom rwkv2rknn.rknn.toolkit import toolkit_installed\n"
                            "print(toolkit_available(), toolkit_installed())\n"
                            "import rknn.api"], env=env, capture_output=True, text=True)
    assert probe.stdout.split() == ["False", "False"], (probe.stdout, probe.stderr)
    assert probe.returncode == 1 and ("ImportError" in probe.stderr or "ModuleNotFoundError" in probe.stderr)
    return env


def test_compile_without_the_toolkit_names_the_install(no_toolkit, model, tmp_path):
    out = tmp_path / "art"
    r = cli("compile", model, "-o", out, env=no_toolkit)
    error_line(r, 1, "rknn-toolkit2", "pip install", "--plan-only")
    assert not out.exists() and not partials_in(tmp_path)
    r = cli("compile", model, "-o", out, "--plan-only", env=no_toolkit)
    assert r.returncode == 0, r.err
    r = cli("run", out, "--prompt", "hi", "--max-tokens", "4", "--seed", "0", env=no_toolkit)
    assert r.returncode == 0, r.err
    assert "backend: ort (auto)" in r.err and r.out.startswith("hi")
    r = cli("run", out, "--tokens", "1,2", "--backend", "rknn-sim", env=no_toolkit)
    error_line(r, 1, "rknn-toolkit2 is not installed", "pip install")


def test_toolkit_checks_in_process(monkeypatch, model, tmp_path):
    from rwkv2rknn.compiler.driver import compile_model
    from rwkv2rknn.compiler.ir import Options
    from rwkv2rknn.rknn import toolkit
    from rwkv2rknn.runtime import board
    for name in ("rknn", "rknn.api"):
        monkeypatch.setitem(sys.modules, name, None)  # import rknn -> ImportError
    assert not board.toolkit_available() and not toolkit.toolkit_installed()
    with pytest.raises(MissingDependency, match="pip install"):
        toolkit.import_toolkit()
    with pytest.raises(MissingDependency, match="--plan-only"):
        compile_model(model, str(tmp_path / "a"), Options())
    assert not os.path.exists(tmp_path / "a")


def test_rknn_lite_off_the_board_names_the_install(two_at_once, tmp_path):
    _, outs, _ = two_at_once
    art = tmp_path / "art"
    shutil.copytree(outs[0], art)
    r = cli("run", art, "--prompt", "hi", "--backend", "rknn-lite")
    error_line(r, 1, "rknn-toolkit-lite2", "pip install rknn-toolkit-lite2", "board")
    edit_manifest(art, lambda d: d.update(target="rk3566"))  # off the board the SoC is unknown
    r = cli("run", art, "--tokens", "1", "--backend", "rknn-lite")
    error_line(r, 1, "rknn-toolkit-lite2")


def test_rknn_lite_refuses_an_artifact_built_for_another_soc(plan, tmp_path, monkeypatch):
    from rwkv2rknn.runtime import board
    from rwkv2rknn.runtime.hybrid import HybridModel
    art = tmp_path / "art"
    shutil.copytree(plan, art)
    monkeypatch.setattr(board, "board_soc", lambda *a, **k: "rk3588")
    edit_manifest(art, lambda d: d.update(target="rk3566"))
    with pytest.raises(BadInput, match=r"compiled for rk3566, but this board is rk3588.*--target rk3588"):
        HybridModel(str(art), backend="rknn-lite")
    edit_manifest(art, lambda d: d.update(target="rk3588"))  # right SoC: on to the next check
    with pytest.raises(BadInput, match="--plan-only"):
        HybridModel(str(art), backend="rknn-lite")


def test_board_soc_from_the_device_tree(tmp_path):
    from rwkv2rknn.runtime.board import board_soc, same_npu
    f = tmp_path / "compatible"
    f.write_bytes(b"radxa,rock-5b\0rockchip,rk3588s\0")
    assert board_soc(str(f)) == "rk3588"
    f.write_bytes(b"rockchip,rk3566-evb\0rockchip,rk3566\0")
    assert board_soc(str(f)) == "rk3566"
    f.write_bytes(b"raspberrypi,4-model-b\0brcm,bcm2711\0")
    assert board_soc(str(f)) == ""
    assert board_soc(str(tmp_path / "none")) == ""
    assert same_npu("rk3568", "rk3566") and same_npu("rk3588", "rk3588")
    assert not same_npu("rk3588", "rk3566") and not same_npu("rk3576", "rk3588")


def test_a_kill_between_the_two_renames_of_a_replace_is_undone(tmp_path):
    """Replacing an artifact moves the old one aside, then the new one in; a process killed in
    between leaves OUT missing and the old copy aside: the next call puts it back first."""
    import subprocess as sp
    from rwkv2rknn.fileio import atomic_dir
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text("old")
    dead = sp.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    aside = tmp_path / f".out.old-{int(dead.stdout)}-abc"
    aside.mkdir()
    os.replace(out, aside / "x")  # the state a kill between the renames leaves
    assert not out.exists()
    with pytest.raises(RuntimeError):
        with atomic_dir(str(out), "manifest.json"):
            raise RuntimeError("this compile fails too")
    assert (out / "manifest.json").read_text() == "old"
    assert not aside.exists()
