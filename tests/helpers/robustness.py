"""The robustness corpus's helpers and shared models (a pytest plugin: tests/conftest.py loads it,
so its fixtures are made once a session for every test module that asks for them).

Every failure is ONE short line on stderr starting with ``error: `` that names the problem and
the fix, exit 1 for a failed job and 2 for bad usage, and no traceback. Nothing is lost: a
compile that fails, is killed (SIGKILL) or interrupted (Ctrl-C) leaves the previous output and
the build cache whole, and two compiles can share the cache.

Everything runs the real CLI in a subprocess (``python -m rwkv2rknn``). Small models (2 layers,
width 32); ``--plan-only`` wherever rknn-toolkit2 is not the point. The tests:
tests/cli/test_bad_input.py, tests/compiler/test_lone_graph.py, tests/compiler/test_nothing_lost.py,
tests/rknn/test_faults.py, tests/rknn/test_missing_toolkit.py, tests/runtime/test_board_checks.py.
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
    return {
        name: sorted(os.listdir(os.path.join(folder, name)))
        if os.path.isdir(os.path.join(folder, name))
        else None
        for name in os.listdir(folder)
    }


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
        if s.token.rknn:
            assert sha256(os.path.join(art, s.token.rknn)) == s.token.rknn_sha256
        if s.seq.rknn:
            assert sha256(os.path.join(art, s.seq.rknn)) == s.seq.rknn_sha256
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
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            n += 1
    return n


def wait_group(pgid, timeout=120):
    """Wait until every process of the group (the compile and its build children) has ended."""
    end = time.time() + timeout
    while procs_in_group(pgid):
        assert time.time() < end, "build children still running"
        time.sleep(0.1)


def as_from_a_terminal():
    """For ``preexec_fn``: a shell runs background jobs (and so a CI runner's steps) with SIGINT
    ignored, and a child inherits that; give it the disposition a terminal's Ctrl-C meets."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_compile(model, out, env, *extra):
    return subprocess.Popen(
        [PY, "-m", "rwkv2rknn", "compile", str(model), "-o", str(out), *NO_ROWS, *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,
        preexec_fn=as_from_a_terminal,
    )


def conv_model():
    """A small conv net (Conv + Relu): valid ONNX, not RWKV."""
    import onnx
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    w = helper.make_tensor(
        "w", TensorProto.FLOAT, [4, 3, 3, 3], rng.standard_normal(108).astype(np.float32).tolist()
    )
    g = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["y"]),
        ],
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        [w],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 16)])
    onnx.checker.check_model(m)
    return m


def wait_for(ready, p, timeout=120):
    """Wait until ``ready()`` holds (the event a kill needs: the compile is under way, a build is
    running), or the process ``p`` has ended, or ``timeout`` s have gone."""
    end = time.monotonic() + timeout
    while not ready() and p.poll() is None and time.monotonic() < end:
        time.sleep(0.02)


def compile_under_way(out, pid):
    """The compile ``pid`` has started writing ``out`` (its partial folder is there): its signal
    handlers are in place."""
    prefix = f".{os.path.basename(str(out))}.partial-{pid}-"
    return lambda: any(n.startswith(prefix) for n in os.listdir(os.path.dirname(str(out))))


def build_under_way(tmp, pid):
    """A build of the compile ``pid`` is running: its scratch folder is in the private TMPDIR
    and its child process is alive (the folder is made just before the child starts)."""
    return lambda: any(n.startswith(_scratch_of(pid)) for n in os.listdir(tmp)) and procs_in_group(pid) >= 2


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("robust")


@pytest.fixture(scope="session")
def sd():
    from rwkv2rknn.models.checkpoint import random_checkpoint

    return random_checkpoint(**SHAPE)


@pytest.fixture(scope="session")
def model(sd, work):
    """A random RWKV-4 exported to per-layer fp32 files."""
    from rwkv2rknn.models.export import export

    d = str(work / "model")
    export(sd, d, fp32=True, tokenizer="bytes")
    return d


@pytest.fixture(scope="session")
def model1(work):
    """One layer: two NPU segments (the fewest toolkit builds)."""
    from rwkv2rknn.models.checkpoint import random_checkpoint
    from rwkv2rknn.models.export import export

    d = str(work / "model1")
    export(random_checkpoint(layers=1, width=32, vocab=256, seed=6), d, fp32=True, tokenizer="bytes")
    return d


@pytest.fixture(scope="session")
def wide(work):
    """The same shape but width 48."""
    from rwkv2rknn.models.checkpoint import random_checkpoint
    from rwkv2rknn.models.export import export

    d = str(work / "wide")
    export(random_checkpoint(**{**SHAPE, "width": 48}), d, fp32=True, tokenizer="bytes")
    return d


@pytest.fixture(scope="session")
def plan(model, work):
    """The model compiled with --plan-only."""
    from rwkv2rknn.compiler.driver import compile_model
    from rwkv2rknn.compiler.ir import Options

    d = str(work / "plan")
    compile_model(model, d, Options(plan_only=True))
    return d


@pytest.fixture(scope="session")
def pth(sd, work):
    from rwkv2rknn.models.checkpoint import save_checkpoint

    p = str(work / "model.pth")
    save_checkpoint(sd, p)
    return p


@pytest.fixture(scope="session")
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
    open(p, "wb").write(blob[: len(blob) // 2])
    open(os.path.join(folder_copy(model, "empty_onnx"), "embed.onnx"), "wb").close()
    with open(os.path.join(folder_copy(model, "text_as_onnx"), "head.onnx"), "w") as f:
        f.write("this is a text file, not a model\n" * 20)
    shutil.copy(
        os.path.join(wide, "mixing_1.onnx"), os.path.join(folder_copy(model, "mixed_widths"), "mixing_1.onnx")
    )
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
    write("half.onnx", blob[: len(blob) // 2])
    # checkpoints
    write("empty.pth", b"")
    blob = open(pth, "rb").read()
    write("truncated.pth", blob[: len(blob) // 2])
    write("text.pth", b"not a checkpoint\n" * 10)
    torch.save({"note": "a dict, but no tensors", "n": 3}, str(d / "no_tensors.pth"))
    b["no_tensors_pth"] = str(d / "no_tensors.pth")
    other = {
        "conv1.weight": np.ones((4, 3, 3, 3), np.float32),
        "fc.weight": np.ones((10, 4), np.float32),
        "fc.bias": np.zeros(10, np.float32),
    }
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
    open(p, "w").write(text[: len(text) // 2])
    edit_manifest(folder_copy(plan, "art_v6"), lambda m: m.update(format_version=6))
    edit_manifest(folder_copy(plan, "art_other_format"), lambda m: m.update(format="something-else"))
    edit_manifest(folder_copy(plan, "art_no_segments"), lambda m: m.update(segments=[]))
    edit_manifest(folder_copy(plan, "art_moved_source"), lambda m: m["model"].update(source=str(d / "gone")))
    with open(os.path.join(plan, "manifest.json")) as f:
        seg = json.load(f)["segments"][1]["onnx"]
    os.remove(os.path.join(folder_copy(plan, "art_no_segment"), seg))
    p = os.path.join(folder_copy(plan, "art_changed_segment"), seg)
    blob = bytearray(open(p, "rb").read())
    blob[-100] ^= 0xFF
    open(p, "wb").write(bytes(blob))
    art = folder_copy(plan, "art_corrupt_segment")  # cut in half, checksum updated to match
    blob = open(os.path.join(art, seg), "rb").read()
    open(os.path.join(art, seg), "wb").write(blob[: len(blob) // 2])
    new = sha256(os.path.join(art, seg))
    edit_manifest(art, lambda m: [s.update(sha256=new) for s in m["segments"] if s["onnx"] == seg])
    return b


@pytest.fixture(scope="session")
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


@pytest.fixture(scope="session", params=["broken-package", "hidden-by-finder"])
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
    probe = subprocess.run(
        [
            PY,
            "-c",
            "from rwkv2rknn.runtime.board import toolkit_available\nfrom rwkv2rknn.rknn.toolkit import toolkit_installed\n"
            "print(toolkit_available(), toolkit_installed())\n"
            "import rknn.api",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert probe.stdout.split() == ["False", "False"], (probe.stdout, probe.stderr)
    assert probe.returncode == 1 and ("ImportError" in probe.stderr or "ModuleNotFoundError" in probe.stderr)
    return env
