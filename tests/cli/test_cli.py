"""The command line: the main flows, and bad input as one line with the right exit code."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from rwkv2rknn.cli import cli


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def sh(*args, **kw):
    return subprocess.run(
        [sys.executable, "-m", "rwkv2rknn", *map(str, args)], capture_output=True, text=True, **kw
    )


def one_line_error(result, code):
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    err = result.stderr.strip().splitlines()
    assert err and err[-1].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    return err[-1]


@pytest.mark.slow
def test_export_compile_run_check_flow(tmp_path):
    from rwkv2rknn.models.checkpoint import random_checkpoint, save_checkpoint

    pth = tmp_path / "bytes.pth"
    save_checkpoint(random_checkpoint(layers=2, width=40, vocab=256, seed=4), str(pth))
    onnx_dir, art = tmp_path / "onnx", tmp_path / "art"
    r = invoke("export", pth, "-o", onnx_dir)
    assert r.exit_code == 0 and "exported RWKV-4 2 x 40, vocab 256" in r.output
    r = invoke("compile", onnx_dir, "-o", art, "--plan-only")
    assert r.exit_code == 0, r.output
    assert "NPU<->CPU boundaries per token" in r.output and "s001_npu" in r.output
    r = invoke("run", art, "--prompt", "Hello", "--max-tokens", 8, "--seed", 1, "--backend", "ort")
    assert r.exit_code == 0, r.output
    assert r.output.startswith("Hello") and len(r.output.strip()) > len("Hello")
    assert "tokens/s" in r.output  # the timing line (stderr, mixed in by CliRunner)
    r = invoke("check", art, "--backend", "ort", "--tokens", 8)
    assert r.exit_code == 0 and "PASS" in r.output


@pytest.mark.slow
def test_demo_compiles_generates_and_checks_the_bundled_model():
    """`make run`: the bundled model (compiled into this session's cache on first use), the plan
    table, generated text and the check, through the same functions as compile, run and check."""
    r = invoke("demo", "--prompt", "It was", "--max-tokens", 8, "--backend", "ort")
    assert r.exit_code == 0, r.output
    assert "NPU<->CPU boundaries per token" in r.output  # the plan table
    assert "\nIt was" in r.output and "8 generated" in r.output
    assert "backend ort: 256 tokens of the built-in English sample" in r.output  # real text, KL
    assert "KL mean" in r.output and r.output.rstrip().endswith("PASS")


@pytest.mark.slow
def test_eval_scores_an_artifact_as_its_per_layer_files(fp32_dir, fp32_plan_artifact, tmp_path):
    """`eval` opens an artifact and an uncompiled folder alike (the tokenizer recorded with each)."""
    import re

    text = tmp_path / "t.txt"
    text.write_text("THE QUICK BROWN FOX, 0123456789. " * 8)  # bytes below the vocabulary (97)
    scores = []
    for model in (fp32_plan_artifact, fp32_dir):
        r = invoke("eval", model, "--text", text, "--backend", "ort")
        assert r.exit_code == 0, r.output
        scores.append(float(re.search(r"([0-9.]+) bits per byte over 263 bytes", r.output).group(1)))
    assert "backend: pure onnxruntime over the per-layer files" in r.output
    assert 0 < scores[0] < 16 and abs(scores[0] - scores[1]) <= 1e-3
    r = sh("eval", fp32_dir, "--text", text, "--backend", "rknn-sim")
    assert "uncompiled per-layer model" in one_line_error(r, 2)


@pytest.mark.slow
def test_eval_of_an_rwkv7_fp16_folder_loads_every_file_without_a_note(slot_models, tmp_path):
    """onnxruntime's full optimisation fails on our fp16 files (a known fault of one fusion);
    eval does not fall back to ORT_ENABLE_EXTENDED for them, nor say it did."""
    text = tmp_path / "t.txt"
    text.write_text("Once upon a time there was a small model. " * 4)
    r = sh("eval", slot_models("7").dirs["fp16"], "--text", text, "--backend", "ort")
    assert r.returncode == 0, r.stderr
    assert "bits per byte over" in r.stdout
    assert "note:" not in r.stderr and "ORT_ENABLE" not in r.stderr, r.stderr


@pytest.mark.slow
def test_tokens_logits_out_equals_pure_reference(fp16_artifact, fp16_dir, tmp_path):
    a, b = tmp_path / "hybrid.npy", tmp_path / "ref.npy"
    assert (
        invoke(
            "run", fp16_artifact, "--tokens", "5,17,90", "--logits-out", a, "--backend", "rknn-sim"
        ).exit_code
        == 0
    )
    assert (
        invoke("run", fp16_dir, "--tokens", "5,17,90", "--logits-out", b, "--backend", "ort").exit_code == 0
    )
    r = sh("run", fp16_dir, "--tokens", "5,17,90", "--backend", "ort")
    # our fp16 files load at onnxruntime's full optimisation, with no note about a fallback
    assert r.returncode == 0 and "note:" not in r.stderr and "ORT_ENABLE" not in r.stderr, r.stderr
    la, lb = np.load(a), np.load(b)
    assert la.shape == lb.shape == (3, 97) and la.dtype == np.float32
    assert (la.argmax(1) == lb.argmax(1)).all()


@pytest.mark.slow
def test_check_passes_with_simulator_and_fails_on_tampering(fp16_artifact, tmp_path):
    r = invoke("check", fp16_artifact, "--backend", "rknn-sim", "--tokens", 32, "--per-segment")
    assert r.exit_code == 0, r.output
    assert "PASS" in r.output and "s001_npu" in r.output
    art = tmp_path / "t"
    shutil.copytree(fp16_artifact, art)
    seg = sorted(p for p in os.listdir(art / "segments") if p.endswith(".onnx"))[1]
    data = bytearray((art / "segments" / seg).read_bytes())
    data[-100] ^= 0xFF  # flip a weight's bits
    (art / "segments" / seg).write_bytes(bytes(data))
    r = sh("check", art, "--backend", "ort")
    assert r.returncode != 0
    assert "changed since it was compiled" in r.stderr


@pytest.mark.slow
def test_check_fails_outside_tolerance(fp32_plan_artifact, fp32_dir, small_sd, tmp_path):
    """A reference that differs a little (one weight changed) is caught by the numbers."""
    from rwkv2rknn.models.export import export

    sd = dict(small_sd)
    sd["head.weight"] = sd["head.weight"] * 1.01
    export(sd, str(tmp_path / "other"), fp32=True)
    r = invoke("check", fp32_plan_artifact, "--backend", "ort", "--reference", tmp_path / "other", "--json")
    assert r.exit_code == 1
    assert '"passed": false' in r.output


@pytest.mark.slow
@pytest.mark.parametrize(
    "args,code,text",
    [
        (["run", "ART", "--prompt", ""], 2, "prompt is empty"),
        (["run", "ART", "--prompt", "hi", "--max-tokens", "0"], 2, "--max-tokens 0"),
        (["run", "ART", "--prompt", "hi", "--max-tokens", "-3"], 2, "--max-tokens -3"),
        (["run", "ART", "--prompt", "hi", "--max-tokens", "10000000"], 2, "out of range"),
        (["run", "ART", "--tokens", "1,x,3"], 2, "not a comma-separated list"),
        (["run", "ART", "--tokens", "1,97"], 2, "outside the vocabulary"),
        (["run", "ART", "--tokens", "-1"], 2, "outside the vocabulary"),
        (["run", "ART", "--prompt", "hi", "--backend", "gpu"], 2, "gpu"),
        (["run", "ART"], 2, "nothing to do"),
        (["run", "MISSING", "--prompt", "hi", "--backend", "ort"], 1, "is not a folder"),
        (["compile", "MISSING", "-o", "OUT", "--plan-only"], 1, "does not exist"),
        (["compile", "ONNX", "-o", "OUT", "--dump-after", "nope", "--plan-only"], 2, "unknown pass"),
        (["export", "MISSING", "-o", "OUT"], 1, "does not exist"),
        (["run", "ART", "--prompt", "hi", "--seed", "-5"], 2, "--seed"),
        (["check", "ART", "--seed", "-1"], 2, "--seed"),
        (["check", "ART", "--max-rel", "-1"], 2, "--max-rel"),
        (["eval", "ART", "--text", "EMPTY", "--tokenizer", "bytes", "--backend", "ort"], 1, "too short"),
        (["export", "PTH", "-o", "OUT.onnx", "--tokenizer", "NOTTOK"], 1, "tokenizer"),
        # refused before any pass: the model is not even looked at
        (["compile", "MISSING", "-o", "FOREIGN", "--plan-only"], 1, "holds other files"),
    ],
)
def test_bad_usage_is_one_line(args, code, text, fp32_plan_artifact, fp32_dir, small_pth, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "tok.json").write_text("not a tokenizer")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "keep.txt").write_text("x")
    subst = {
        "ART": fp32_plan_artifact,
        "MISSING": str(tmp_path / "nope"),
        "OUT": str(tmp_path / "o"),
        "ONNX": fp32_dir,
        "EMPTY": str(tmp_path / "empty.txt"),
        "PTH": small_pth,
        "NOTTOK": str(tmp_path / "tok.json"),
        "OUT.onnx": str(tmp_path / "o.onnx"),
        "FOREIGN": str(tmp_path / "foreign"),
    }
    r = sh(*[subst.get(a, a) for a in args])
    line = one_line_error(r, code) if code == 1 or "error:" in r.stderr else None
    assert r.returncode == code, r.stderr
    assert text in r.stderr, r.stderr
    if line:
        assert len(line) < 300 and "internal error" not in line
    assert not os.path.exists(tmp_path / "o.onnx")


def test_a_full_disk_is_one_line(capsys):
    import errno

    from rwkv2rknn.cli.app import handle_errors

    @handle_errors
    def write():
        raise OSError(errno.ENOSPC, "No space left on device", "/art/segments/s001.onnx")

    with pytest.raises(SystemExit) as e:
        write()
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and len(err.splitlines()) == 1
    assert (
        err == "error: No space left on device (/art/segments/s001.onnx): free some space or write elsewhere"
    )


def test_an_import_cut_short_by_ctrl_c_is_an_interrupt(capsys):
    """Ctrl-C during a C extension's import surfaces as ImportError("initialization failed")
    with the KeyboardInterrupt as its context: it is 'interrupted', exit 130, not an internal
    error; and the exit ignores a second signal while the interpreter shuts down."""
    import signal

    from rwkv2rknn.cli.app import handle_errors

    @handle_errors
    def load():
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise ImportError("initialization failed")

    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(SystemExit) as e:
            load()
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    assert e.value.code == 130
    assert capsys.readouterr().err.strip() == "interrupted"


@pytest.mark.slow
def test_ctrl_c_seen_by_code_a_c_extension_evaluated_still_exits_130():
    """Under `python -m`, CPython ends a process by SIGINT (-2) at its very end if a Ctrl-C ever
    reached code evaluated from a string by C, even once caught; the CLI exits 130 all the same."""
    env = dict(os.environ, PYTHONPATH=os.path.join(os.path.dirname(os.path.dirname(__file__))))
    r = subprocess.run(
        [sys.executable, "-m", "helpers.interrupt_probe"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 130, (r.returncode, r.stderr)
    assert r.stderr.strip() == "interrupted", r.stderr


def test_debug_flag_shows_traceback(tmp_path):
    r = sh("--debug", "compile", tmp_path / "nope", "-o", tmp_path / "o", "--plan-only")
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_help_lists_commands():
    r = invoke("--help")
    for cmd in ("export", "compile", "run", "check"):
        assert cmd in r.output
    r = invoke("compile", "--help")
    assert "--plan-only" in r.output and "--dump-after" in r.output
