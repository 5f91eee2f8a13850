"""Bad input to every command: one `error: ` line naming the problem and its fix, the right exit
code, no traceback, nothing written or lost (the corpus: tests/helpers/robustness.py)."""

import os

import pytest

from helpers.robustness import cli, error_line, snapshot

OUT = "{out}"
CASES = [
    # export
    ("export-missing", ["export", "{missing}", "-o", OUT], 1, ["does not exist"]),
    ("export-empty-path", ["export", "", "-o", OUT], 1, ["does not exist"]),
    ("export-empty-file", ["export", "{empty_pth}", "-o", OUT], 1, ["cannot read checkpoint"]),
    (
        "export-truncated",
        ["export", "{truncated_pth}", "-o", OUT],
        1,
        ["cannot read checkpoint", "truncated"],
    ),
    ("export-text-file", ["export", "{text_pth}", "-o", OUT], 1, ["cannot read checkpoint"]),
    ("export-no-tensors", ["export", "{no_tensors_pth}", "-o", OUT], 1, ["not a state dict of tensors"]),
    ("export-not-rwkv", ["export", "{other_pth}", "-o", OUT], 1, ["not an RWKV checkpoint", "RWKV-4"]),
    ("export-rwkv6-damaged", ["export", "{rwkv6_pth}", "-o", OUT], 1, ["not an RWKV-6 checkpoint"]),
    ("export-rwkv5-damaged", ["export", "{rwkv5_pth}", "-o", OUT], 1, ["not an RWKV-5.2 checkpoint"]),
    (
        "export-folder-as-checkpoint",
        ["export", "{model}", "-o", OUT],
        1,
        ["holds ONNX files", "rwkv2rknn compile"],
    ),
    ("export-no-output", ["export", "{pth}"], 2, ["missing option", "--help"]),
    (
        "export-into-foreign-folder",
        ["export", "{pth}", "-o", "{foreign}"],
        1,
        ["holds other files", "--force"],
    ),
    # compile
    ("compile-missing", ["compile", "{missing}", "-o", OUT, "--plan-only"], 1, ["does not exist"]),
    ("compile-empty-path", ["compile", "", "-o", OUT, "--plan-only"], 1, ["does not exist"]),
    ("compile-empty-folder", ["compile", "{empty_dir}", "-o", OUT, "--plan-only"], 1, ["has no embed.onnx"]),
    (
        "compile-no-mixing-1",
        ["compile", "{no_mixing_1}", "-o", OUT, "--plan-only"],
        1,
        ["missing mixing_1.onnx", "export the model again"],
    ),
    (
        "compile-no-mixing-0",
        ["compile", "{no_mixing_0}", "-o", OUT, "--plan-only"],
        1,
        ["missing mixing_0.onnx"],
    ),
    (
        "compile-truncated-onnx",
        ["compile", "{truncated}", "-o", OUT, "--plan-only"],
        1,
        ["mixing_0.onnx", "truncated", "export it again"],
    ),
    ("compile-empty-onnx", ["compile", "{empty_onnx}", "-o", OUT, "--plan-only"], 1, ["embed.onnx", "empty"]),
    (
        "compile-text-as-onnx",
        ["compile", "{text_as_onnx}", "-o", OUT, "--plan-only"],
        1,
        ["head.onnx", "not a readable ONNX model"],
    ),
    (
        "compile-conv-folder",
        ["compile", "{conv_dir}", "-o", OUT, "--plan-only"],
        1,
        ["not the per-layer RWKV ONNX layout"],
    ),
    (
        "compile-mixed-widths",
        ["compile", "{mixed_widths}", "-o", OUT, "--plan-only"],
        1,
        ["disagree on the width", "one export"],
    ),
    (
        "compile-renamed-input",
        ["compile", "{renamed_input}", "-o", OUT, "--plan-only"],
        1,
        ["mixing_0.onnx", "'state'", "state_in"],
    ),
    (
        "compile-renamed-output",
        ["compile", "{renamed_output}", "-o", OUT, "--plan-only"],
        1,
        ["head.onnx", "'logits'", "per-layer RWKV ONNX layout"],
    ),
    (
        "compile-text-file",
        ["compile", "{notes_onnx}", "-o", OUT, "--plan-only"],
        1,
        ["not a readable ONNX model"],
    ),
    ("compile-half-file", ["compile", "{half_onnx}", "-o", OUT, "--plan-only"], 1, ["truncated"]),
    (
        "compile-checkpoint",
        ["compile", "{pth}", "-o", OUT, "--plan-only"],
        1,
        ["is a checkpoint, not ONNX", "rwkv2rknn export"],
    ),
    ("compile-output-is-file", ["compile", "{model}", "-o", "{pth}", "--plan-only"], 2, ["is a file"]),
    (
        "compile-unknown-target",
        ["compile", "{model}", "-o", OUT, "--target", "rk9999", "--plan-only"],
        2,
        ["--target", "rk9999"],
    ),
    (
        "compile-calib-zero",
        ["compile", "{model}", "-o", OUT, "--calib-tokens", "0", "--plan-only"],
        2,
        ["--calib-tokens"],
    ),
    (
        "compile-unknown-pass",
        ["compile", "{model}", "-o", OUT, "--dump-after", "nope", "--plan-only"],
        2,
        ["unknown pass", "use one of"],
    ),
    (
        "compile-bad-prefill-rows",
        ["compile", "{model}", "-o", OUT, "--prefill-rows", "1,x", "--plan-only"],
        2,
        ["--prefill-rows", "16,64"],
    ),
    ("compile-unknown-option", ["compile", "{model}", "-o", OUT, "--fast"], 2, ["--fast", "--help"]),
    (
        "compile-into-foreign-folder",
        ["compile", "{model}", "-o", "{foreign}", "--plan-only"],
        1,
        ["holds other files", "--force"],
    ),
    # run
    ("run-missing", ["run", "{missing}", "--prompt", "hi", "--backend", "ort"], 1, ["is not a folder"]),
    ("run-empty-path", ["run", "", "--prompt", "hi", "--backend", "ort"], 1, ["is not a folder"]),
    (
        "run-empty-folder",
        ["run", "{empty_dir}", "--prompt", "hi", "--backend", "ort"],
        1,
        ["no manifest.json"],
    ),
    (
        "run-no-manifest",
        ["run", "{art_no_manifest}", "--prompt", "hi", "--backend", "ort"],
        1,
        ["no manifest.json", "compile"],
    ),
    (
        "run-manifest-not-json",
        ["run", "{art_not_json}", "--prompt", "hi", "--backend", "ort"],
        1,
        ["corrupt", "compile the model again"],
    ),
    (
        "run-manifest-truncated",
        ["run", "{art_truncated_json}", "--prompt", "hi", "--backend", "ort"],
        1,
        ["corrupt"],
    ),
    (
        "run-manifest-version-6",
        ["run", "{art_v6}", "--prompt", "hi", "--backend", "ort"],
        1,
        ["format version 6", "reads versions 1, 2, 3, 4, 5", "compile the model again"],
    ),
    (
        "run-manifest-other-format",
        ["run", "{art_other_format}", "--prompt", "hi", "--backend", "ort"],
        1,
        ["not an rwkv2rknn manifest"],
    ),
    (
        "run-manifest-no-segments",
        ["run", "{art_no_segments}", "--prompt", "hi", "--backend", "ort"],
        1,
        ["lists no segments"],
    ),
    (
        "run-segment-missing",
        ["run", "{art_no_segment}", "--prompt", "hi", "--backend", "ort"],
        1,
        ["is missing", "compile the model again"],
    ),
    (
        "run-segment-changed",
        ["run", "{art_changed_segment}", "--prompt", "hi", "--backend", "ort"],
        1,
        ["checksum"],
    ),
    (
        "run-segment-corrupt",
        ["run", "{art_corrupt_segment}", "--prompt", "hi", "--backend", "ort"],
        1,
        ["onnxruntime cannot load", "corrupt"],
    ),
    (
        "run-uncompiled-conv",
        ["run", "{conv_dir}", "--tokens", "1", "--backend", "ort"],
        1,
        ["not the per-layer RWKV ONNX layout"],
    ),
    (
        "run-uncompiled-mixed-widths",
        ["run", "{mixed_widths}", "--tokens", "1", "--backend", "ort"],
        1,
        ["disagree on the width"],
    ),
    (
        "run-uncompiled-no-mixing-1",
        ["run", "{no_mixing_1}", "--tokens", "1", "--backend", "ort"],
        1,
        ["missing mixing_1.onnx"],
    ),
    (
        "run-uncompiled-rknn-sim",
        ["run", "{model}", "--prompt", "hi", "--backend", "rknn-sim"],
        2,
        ["compile it first"],
    ),
    ("run-prompt-empty", ["run", "{plan}", "--prompt", "", "--backend", "ort"], 2, ["prompt is empty"]),
    (
        "run-prompt-invalid-utf8",
        ["run", "{plan}", "--prompt", b"\xff\xfe", "--backend", "ort"],
        2,
        ["not valid UTF-8"],
    ),
    ("run-nothing-to-do", ["run", "{plan}", "--backend", "ort"], 2, ["nothing to do", "--prompt"]),
    (
        "run-tokens-and-prompt",
        ["run", "{plan}", "--tokens", "1", "--prompt", "hi", "--backend", "ort"],
        2,
        ["give one of them"],
    ),
    (
        "run-tokens-not-numbers",
        ["run", "{plan}", "--tokens", "1,x,3", "--backend", "ort"],
        2,
        ["not a comma-separated list", "--tokens 5,17,300"],
    ),
    (
        "run-tokens-words",
        ["run", "{plan}", "--tokens", "hello", "--backend", "ort"],
        2,
        ["not a comma-separated"],
    ),
    (
        "run-tokens-float",
        ["run", "{plan}", "--tokens", "1.5", "--backend", "ort"],
        2,
        ["not a comma-separated"],
    ),
    ("run-tokens-empty", ["run", "{plan}", "--tokens", "", "--backend", "ort"], 2, ["--tokens is empty"]),
    (
        "run-tokens-commas",
        ["run", "{plan}", "--tokens", " , ,", "--backend", "ort"],
        2,
        ["--tokens is empty"],
    ),
    (
        "run-token-at-vocab",
        ["run", "{plan}", "--tokens", "1,256", "--backend", "ort"],
        2,
        ["token id 256 is outside the vocabulary (0..255)"],
    ),
    (
        "run-token-negative",
        ["run", "{plan}", "--tokens", "-1", "--backend", "ort"],
        2,
        ["outside the vocabulary"],
    ),
    (
        "run-token-huge",
        ["run", "{plan}", "--tokens", "99999999999999999999999", "--backend", "ort"],
        2,
        ["outside the vocabulary"],
    ),
    (
        "run-max-tokens-zero",
        ["run", "{plan}", "--prompt", "hi", "--max-tokens", "0", "--backend", "ort"],
        2,
        ["--max-tokens 0", "1 to 65536"],
    ),
    (
        "run-max-tokens-negative",
        ["run", "{plan}", "--prompt", "hi", "--max-tokens", "-5", "--backend", "ort"],
        2,
        ["--max-tokens -5"],
    ),
    (
        "run-max-tokens-huge",
        ["run", "{plan}", "--prompt", "hi", "--max-tokens", str(10**12), "--backend", "ort"],
        2,
        ["out of range"],
    ),
    (
        "run-max-tokens-text",
        ["run", "{plan}", "--prompt", "hi", "--max-tokens", "many", "--backend", "ort"],
        2,
        ["--max-tokens", "many"],
    ),
    (
        "run-temperature-negative",
        ["run", "{plan}", "--prompt", "hi", "--temperature", "-1", "--backend", "ort"],
        2,
        ["--temperature"],
    ),
    (
        "run-unknown-backend",
        ["run", "{plan}", "--prompt", "hi", "--backend", "gpu"],
        2,
        ["--backend", "'gpu'"],
    ),
    (
        "run-logits-out-no-folder",
        ["run", "{plan}", "--tokens", "1", "--logits-out", "{missing}/l.npy", "--backend", "ort"],
        2,
        ["--logits-out", "does not exist"],
    ),
    (
        "run-logits-out-without-tokens",
        ["run", "{plan}", "--prompt", "hi", "--logits-out", "{out}.npy", "--backend", "ort"],
        2,
        ["--logits-out needs --tokens"],
    ),
    (
        "run-unknown-tokenizer",
        ["run", "{plan}", "--prompt", "hi", "--tokenizer", "nonsense", "--backend", "ort"],
        1,
        ["unknown tokenizer 'nonsense'"],
    ),
    (
        "run-rknn-lite-plan-only",
        ["run", "{plan}", "--prompt", "hi", "--backend", "rknn-lite"],
        1,
        ["--plan-only", "--backend ort"],
    ),
    # check
    ("check-missing", ["check", "{missing}", "--backend", "ort"], 1, ["is not a folder"]),
    ("check-no-manifest", ["check", "{art_no_manifest}", "--backend", "ort"], 1, ["no manifest.json"]),
    ("check-manifest-not-json", ["check", "{art_not_json}", "--backend", "ort"], 1, ["corrupt"]),
    ("check-segment-changed", ["check", "{art_changed_segment}", "--backend", "ort"], 1, ["checksum"]),
    ("check-source-moved", ["check", "{art_moved_source}", "--backend", "ort"], 1, ["pass --reference"]),
    (
        "check-reference-missing",
        ["check", "{plan}", "--backend", "ort", "--reference", "{missing}"],
        1,
        ["pass --reference"],
    ),
    (
        "check-reference-other-width",
        ["check", "{plan}", "--backend", "ort", "--reference", "{wide}"],
        1,
        ["not the model the artifact was compiled from"],
    ),
    (
        "check-reference-conv",
        ["check", "{plan}", "--backend", "ort", "--reference", "{conv_dir}"],
        1,
        ["not the per-layer RWKV ONNX layout"],
    ),
    (
        "check-reference-truncated",
        ["check", "{plan}", "--backend", "ort", "--reference", "{truncated}"],
        1,
        ["onnxruntime cannot load mixing_0.onnx", "not a valid ONNX model"],
    ),
    ("check-tokens-zero", ["check", "{plan}", "--backend", "ort", "--tokens", "0"], 2, ["--tokens"]),
    ("check-min-top1", ["check", "{plan}", "--backend", "ort", "--min-top1", "2"], 2, ["--min-top1"]),
    ("check-unknown-backend", ["check", "{plan}", "--backend", "cuda"], 2, ["--backend"]),
    # bench
    ("bench-layers-zero", ["bench", "--layers", "0"], 2, ["--layers"]),
    ("bench-version-eight", ["bench", "--version", "8"], 2, ["--version"]),
    ("bench-width-tiny", ["bench", "--width", "4"], 2, ["--width"]),
    ("bench-tokens-two", ["bench", "--tokens", "2"], 2, ["--tokens"]),
    ("bench-vocab-text", ["bench", "--vocab", "lots"], 2, ["--vocab"]),
    (
        "bench-json-out-no-folder",
        [
            "bench",
            "--layers",
            "1",
            "--width",
            "8",
            "--vocab",
            "4",
            "--tokens",
            "3",
            "--no-rwkv",
            "--json-out",
            "{missing}/b.json",
        ],
        2,
        ["--json-out", "does not exist"],
    ),
    # demo, and the group itself
    ("demo-prompt-empty", ["demo", "--prompt", ""], 2, ["prompt is empty"]),
    ("demo-prompt-invalid-utf8", ["demo", "--prompt", b"\xff\xfe"], 2, ["not valid UTF-8"]),
    ("demo-max-tokens-zero", ["demo", "--max-tokens", "0"], 2, ["--max-tokens"]),
    ("unknown-command", ["frobnicate"], 2, ["no such command"]),
]


@pytest.mark.slow
@pytest.mark.parametrize("args,code,words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(args, code, words, bad, model, plan, wide, pth, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("keep me")
    paths = {
        **bad,
        "model": model,
        "plan": plan,
        "wide": wide,
        "pth": pth,
        "missing": str(tmp_path / "missing"),
        "out": str(tmp_path / "out"),
        "foreign": str(foreign),
    }
    argv = [a if isinstance(a, bytes) else a.format(**paths) for a in args]
    before = {k: snapshot(v) for k, v in (("plan", plan), ("model", model))}
    r = cli(*argv)
    error_line(r, code, *words)
    # nothing written, nothing half-written, nothing lost
    assert not os.path.exists(tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["foreign"]
    assert snapshot(foreign) == {"mine.txt": b"keep me"}
    assert {k: snapshot(v) for k, v in (("plan", plan), ("model", model))} == before


@pytest.mark.slow
def test_debug_shows_the_traceback(bad, tmp_path):
    r = cli("--debug", "compile", bad["truncated"], "-o", tmp_path / "o", "--plan-only")
    assert r.returncode != 0 and "Traceback" in r.err and "BadInput" in r.err
