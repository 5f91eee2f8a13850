"""`rwkv2rknn run`, `check`, `eval` and `demo`: the last runs the same functions as the others."""

from __future__ import annotations

import sys

import click

from rwkv2rknn.cli.app import check_out_file, cli, handle_errors, model_path, say
from rwkv2rknn.cli.options import (
    FILE,
    artifact_argument,
    backend_option,
    core_mask_option,
    option,
    reference_option,
    rknn_io_option,
    seed_option,
    temperature_option,
    text_option,
    tokenizer_option,
)
from rwkv2rknn.errors import UsageError


def _parse_tokens(text: str, vocab: int):
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise UsageError(
            f"--tokens '{text[:40]}' is not a comma-separated list of token ids",
            "write it like --tokens 5,17,300",
        )
    if not ids:
        raise UsageError("--tokens is empty", "give at least one token id, like --tokens 5,17,300")
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise UsageError(
            f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", "give ids the model knows"
        )
    return ids


def _open(artifact, backend: str, core_mask: str = "auto", **options):
    """(model, tokenizer spec) of ARTIFACT; none given: the bundled model, compiled on first use.
    ``options``: open_model's (rknn_io, verify)."""
    from rwkv2rknn.runtime.loader import open_model

    return open_model(model_path(artifact), backend, core_mask, echo=say, **options)


def _check_prompt(prompt: str) -> None:
    if prompt is None or prompt == "":
        raise UsageError("the prompt is empty", 'give some text, like --prompt "Once upon a time"')
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError("the prompt is not valid UTF-8", "pass the prompt as UTF-8 text")


@cli.command()
@artifact_argument(required=False)
@click.option("--prompt", help="Text to continue.")
@option("--max-tokens", type=int, default=64, help="Tokens to generate (1..65536).")
@temperature_option(0.8)
@option("--top-p", type=click.FloatRange(0, 1), default=0.9, help="Nucleus sampling.")
@seed_option(help="Random seed for sampling.")
@backend_option("Where NPU segments run (CPU segments always use onnxruntime).")
@core_mask_option(
    "Board backends only: NPU cores (0, 1, 2, 0_1, 0_1_2; auto: 0_1_2 for large "
    "segments on an RK3588, the runtime's choice for the others)."
)
@tokenizer_option()
@click.option("--tokens", help="Evaluation: feed these comma-separated token ids instead of a prompt.")
@click.option(
    "--logits-out", type=FILE, help="With --tokens: save float32 logits [T, vocab] to this .npy file."
)
@click.option(
    "--verify",
    is_flag=True,
    help="Self-test first: run every NPU segment on its golden vectors and print the error "
    "against the tolerance of its precision (the first run on a board does it once).",
)
@rknn_io_option(
    "rknn-rt only: copy (rknn_inputs_set/rknn_outputs_get), zero-copy "
    "(rknn_set_io_mem), or auto: per segment what the self-test chose, else copy."
)
@handle_errors
def run(
    artifact,
    prompt,
    max_tokens,
    temperature,
    top_p,
    seed,
    backend,
    core_mask,
    tokenizer,
    tokens,
    logits_out,
    verify,
    rknn_io,
):
    """Generate text with a compiled ARTIFACT (default: the bundled model, compiled on first use).

    ARTIFACT may also be an uncompiled folder of per-layer files with --backend ort: that is the
    pure ONNX Runtime reference.
    """
    if tokens is None and prompt is None:
        raise UsageError("nothing to do", 'give --prompt "text" (or --tokens ids --logits-out file.npy)')
    if tokens is not None and prompt is not None:
        raise UsageError("--tokens and --prompt go separately", "give one of them")
    if logits_out and tokens is None:
        raise UsageError("--logits-out needs --tokens", "give --tokens 5,17,300")
    check_out_file(logits_out, "--logits-out")
    if tokens is None:
        _check_prompt(prompt)
        if not 1 <= max_tokens <= 65536:
            raise UsageError(f"--max-tokens {max_tokens} is out of range", "give 1 to 65536")
    model, tok_spec = _open(artifact, backend, core_mask, rknn_io=rknn_io, verify=verify)
    if tokens is not None:
        import numpy as np

        ids = _parse_tokens(tokens, model.vocab)
        logits = model.logits(ids)
        if logits_out:
            np.save(logits_out, logits.astype(np.float32))
            say(f"saved logits {list(logits.shape)} to {logits_out}")
        else:
            click.echo(" ".join(str(int(i)) for i in logits.argmax(1)))
        return
    _print_generation(model, tokenizer or tok_spec, prompt, max_tokens, temperature, top_p, seed)


def _print_generation(model, tok_spec, prompt, max_tokens, temperature, top_p, seed):
    """Stream the prompt and its continuation to stdout, then the timing line to stderr."""
    from rwkv2rknn.runtime.generate import generate_text

    def on_text(text):
        click.echo(text, nl=False)
        sys.stdout.flush()

    res = generate_text(model, tok_spec, prompt, max_tokens, temperature, top_p, seed, on_text=on_text)
    click.echo()
    ttft = f"{1000 * res.ttft_s:.0f} ms" if res.ttft_s is not None else "n/a"
    click.echo(
        f"[{res.prompt_tokens} prompt tokens, {len(res.ids)} generated; time to first token {ttft}, "
        f"{res.decode_tokens_per_s:.1f} tokens/s]",
        err=True,
    )


@cli.command()
@artifact_argument()
@click.option(
    "--tokens",
    "n_tokens",
    type=click.IntRange(1, 100000),
    help="Tokens to teacher-force (default: 256 of text, 32 random ids).",
)
@text_option(
    "Teacher-force this UTF-8 text (default: the built-in sample: English for "
    "byte-level models, a dozen languages for the others)."
)
@click.option(
    "--random",
    "random_ids",
    is_flag=True,
    help="Seeded random ids instead of text (covers states and ranges text does not "
    "reach; the end state is then gated too).",
)
@seed_option(0, "Of --random.")
@backend_option()
@reference_option(
    "The source to compare against: per-layer folder or whole-model .onnx (default: "
    "the one the artifact was compiled from)."
)
@click.option(
    "--per-segment",
    is_flag=True,
    help="Also compare every NPU segment and T-row variant alone against its ONNX on onnxruntime.",
)
@click.option(
    "--max-kl-mean",
    type=click.FloatRange(0, None),
    help="Largest mean KL divergence per token, nats (default: per precision, see docs/quality.md).",
)
@click.option(
    "--max-kl-p99",
    type=click.FloatRange(0, None),
    help="Largest 99th percentile of the KL divergence per token, nats.",
)
@click.option(
    "--min-top1",
    type=click.FloatRange(0, 1),
    help="Also gate the share of tokens whose top token is the reference's (default: reported, not gated).",
)
@click.option(
    "--max-rel",
    type=click.FloatRange(0, None),
    help="Max logit error relative to the logit scale (default: 1e-4 for ort on fp32 "
    "files, 0.05 for fp16 NPU segments, 0.25 with w8a8 ones).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@handle_errors
def check(
    artifact,
    n_tokens,
    text_file,
    random_ids,
    seed,
    backend,
    reference,
    per_segment,
    max_kl_mean,
    max_kl_p99,
    min_top1,
    max_rel,
    as_json,
):
    """Run ARTIFACT and pure ONNX Runtime on the same tokens and compare; exit 1 outside tolerance.

    \b
    Gates, on the decode path (token by token) and the prefill path (the
    same tokens in chunks through the T-row variants): the KL divergence
    of the next-token distribution (mean and 99th percentile, per
    precision), the logit error and, with --random, the end state. Also
    reported: the share of tokens with the same top token and the bits
    per token (per byte) of both. With --per-segment every NPU segment
    and T-row variant against its ONNX."""
    from rwkv2rknn.rknn.calibrate import read_text
    from rwkv2rknn.tools.check import run_check, save_report

    if random_ids and text_file:
        raise UsageError("--random and --text go separately", "give one of them")
    text = read_text(text_file, "--text") if text_file else None
    rep, chosen = run_check(
        artifact,
        n_tokens or 0,
        seed,
        backend,
        reference,
        per_segment,
        min_top1,
        max_rel,
        text=text,
        random_ids=random_ids,
        max_kl_mean=max_kl_mean,
        max_kl_p99=max_kl_p99,
    )
    saved = save_report(artifact, rep, chosen, len(rep.steps), seed)
    if saved:
        say(f"check report saved to {saved} (rwkv2rknn report shows it)")
    _print_check(rep, chosen, as_json)


def _print_check(rep, chosen: str, as_json: bool = False) -> None:
    """Print a check report and exit: 0 inside tolerance, 1 outside."""
    import json

    if as_json:
        click.echo(json.dumps({"backend": chosen, **rep.to_dict()}, indent=1))
    else:
        click.echo(f"backend {chosen}: {rep.summary()}")
        for s in rep.per_segment:
            rows = f" ({s['rows']}-row build)" if s.get("rows") else ""
            click.echo(f"  {s['segment']}{rows}: max rel error {s['max_rel']:.3g}")
    for w in rep.warnings:  # also in the JSON and check.json ("warnings")
        click.echo(f"warning: {w}", err=True)
    sys.exit(0 if rep.passed else 1)


@cli.command(name="eval")
@artifact_argument()
@text_option("UTF-8 text file to score (default: the built-in sample for the model's tokenizer).")
@option(
    "--max-bytes",
    type=click.IntRange(16, 10**8),
    default=20000,
    help="Score at most this many bytes from the start of the file.",
)
@backend_option()
@tokenizer_option()
@reference_option("The source to compare against (default: the one the artifact was compiled from).")
@click.option("--no-reference", is_flag=True, help="Score the artifact alone (no KL, no reference run).")
@handle_errors
def eval_cmd(artifact, text_file, max_bytes, backend, tokenizer, reference, no_reference):
    """Quality of ARTIFACT on a text, teacher-forced: bits per byte (per token for subword
    tokenizers) and, against pure onnxruntime on the source files, the KL divergence per token
    (mean, median, p99, max) and the share of tokens with the same top token, on the decode and
    the prefill path. A per-layer folder (with --backend ort) is scored alone."""
    from rwkv2rknn.tools.evaluate import bits_per_byte, compare_on_text, read_text
    from rwkv2rknn.runtime.generate import model_tokenizer
    from rwkv2rknn.runtime.loader import is_per_layer_folder

    text = read_text(text_file, max_bytes) if text_file else None
    if artifact and not no_reference and not is_per_layer_folder(artifact):
        res = compare_on_text(artifact, text, backend, reference, tokenizer, echo=say)
        click.echo(res.summary())
        return
    model, tok_spec = _open(artifact, backend)
    tok = model_tokenizer(tokenizer or tok_spec)
    if text is None:
        from rwkv2rknn.tools.check import sample_text
        from rwkv2rknn.runtime.tokenizer import ByteTokenizer

        text = sample_text("en" if isinstance(tok, ByteTokenizer) else "world")
    score = bits_per_byte(model, tok, text)
    click.echo(
        f"{score.bits_per_byte:.4f} bits per byte over {score.bytes} bytes "
        f"({score.tokens} tokens, next-token top-1 {100 * score.top1:.1f}%)"
    )


@cli.command()
@option("--prompt", default="The", help="Text to continue.")
@option("--max-tokens", type=click.IntRange(1, 65536), default=200)
@seed_option(0)
@backend_option()
@handle_errors
def demo(prompt, max_tokens, seed, backend):
    """The whole flow on the bundled model: export, compile (plan table), generate, check, report."""
    from rwkv2rknn.tools.check import run_check, save_report
    from rwkv2rknn.compiler import bundled
    from rwkv2rknn.tools.report_html import write_report
    from rwkv2rknn.runtime.hybrid import load_manifest
    from rwkv2rknn.runtime.loader import open_model

    _check_prompt(prompt)
    say("== 1. export and compile the bundled model (cached after the first run)")
    artifact = bundled.ensure_compiled(echo=say)
    click.echo(f"artifact: {artifact}\n")
    click.echo(load_manifest(artifact).table())
    say("\n== 2. generate")
    model, tok_spec = open_model(artifact, backend, echo=say)
    _print_generation(model, tok_spec, prompt, max_tokens, 0.8, 0.9, seed)
    say("\n== 3. check against pure onnxruntime over the per-layer files")
    rep, chosen = run_check(artifact, backend=backend)
    save_report(artifact, rep, chosen, len(rep.steps), 0)
    say(f"report: {write_report(artifact)}")
    _print_check(rep, chosen)
