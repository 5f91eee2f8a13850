"""The rwkv2rknn command line: thin click commands over the library.

Only this module prints and chooses exit codes: 0 done, 1 a failed job, 2 bad usage.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import sys

import click

from rwkv2rknn import __version__
from rwkv2rknn.errors import Rwkv2RknnError

log = logging.getLogger("rwkv2rknn")


class _Ctx:
    debug = False


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(message)s", stream=sys.stderr)


def handle_errors(fn):
    """Turn library errors into one line on stderr and an exit code (a traceback with --debug)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Rwkv2RknnError as e:
            if _Ctx.debug:
                raise
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except OSError as e:  # a full disk, a folder not writable, ...: the system's own words
            if _Ctx.debug:
                raise
            where = f" ({e.filename})" if e.filename else ""
            fix = ("free some space or write elsewhere" if e.errno == errno.ENOSPC else
                   "check the path and its permissions")
            click.echo(f"error: {e.strerror or type(e).__name__}{where}: {fix}", err=True)
            sys.exit(1)
        except Exception as e:  # noqa: BLE001 - the last line of defence, still one line
            if _Ctx.debug:
                raise
            msg = str(e).splitlines()[0][:200] if str(e) else ""
            click.echo(f"error: internal error {type(e).__name__}: {msg} "
                       f"(run again with --debug for the traceback and report it)", err=True)
            sys.exit(1)

    return wrapper


class _Group(click.Group):
    """Click's own usage errors (a bad flag value, a missing option) as one `error:` line, exit 2."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as e:
            if type(e).__name__ == "NoArgsIsHelpError":  # bare `rwkv2rknn`: click shows the help
                e.show()
                sys.exit(e.exit_code)
            where = e.ctx.command_path if e.ctx is not None else (prog_name or "rwkv2rknn")
            msg = " ".join(e.format_message().split()).rstrip(".")
            click.echo(f"error: {msg}; see '{where} --help'", err=True)
            sys.exit(2)
        except click.Abort:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except click.ClickException as e:
            e.show()
            sys.exit(e.exit_code)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="rwkv2rknn")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.option("-v", "--verbose", is_flag=True, help="Log what each step does.")
def cli(debug: bool, verbose: bool) -> None:
    """Compile RWKV language models for the Rockchip RK3588 NPU and run them.

    \b
    Typical flow:
      rwkv2rknn export model.pth -o model/        # checkpoint -> per-layer ONNX
      rwkv2rknn compile model/ -o model.rknn.d/   # ONNX -> hybrid NPU/CPU artifact
      rwkv2rknn run model.rknn.d/ --prompt "Hi"   # generate text
      rwkv2rknn check model.rknn.d/               # hybrid vs pure ONNX Runtime
    """
    _Ctx.debug = debug
    _setup_logging(verbose)


@cli.command()
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "out", required=True, type=click.Path(),
              help="Folder to write embed.onnx, mixing_N.onnx and head.onnx into, or a file name "
                   "ending in .onnx for one whole-model file.")
@click.option("--fp32", is_flag=True, help="Keep float32 (default: float16, like the public files).")
@click.option("--tokenizer", default=None,
              help="Tokenizer to record for the model: bytes, world, or a tokenizer.json path "
                   "(default: chosen from the vocabulary size).")
@click.option("--force", is_flag=True, help="Replace an output folder that holds other files (or an existing file).")
@handle_errors
def export(checkpoint: str, out: str, fp32: bool, tokenizer, force: bool) -> None:
    """Export an RWKV-4 CHECKPOINT (.pth) to per-layer ONNX files, or to one .onnx file."""
    from rwkv2rknn.models import rwkv4
    from rwkv2rknn.models.checkpoint import load_checkpoint
    from rwkv2rknn.models.export import export as do_export
    from rwkv2rknn.models.export import export_file
    from rwkv2rknn.tokenizer import load_tokenizer, tokenizer_for_vocab

    if tokenizer:
        load_tokenizer(tokenizer)  # a file that is not a tokenizer fails here, before any work
    sd = load_checkpoint(checkpoint)
    shape = rwkv4.check_state_dict(sd)
    tok = tokenizer or tokenizer_for_vocab(shape.vocab)
    if out.endswith(".onnx"):
        export_file(sd, out, fp32=fp32, tokenizer=tok, force=force)
    else:
        with click.progressbar(length=shape.layers + 2, label="exporting", file=sys.stderr) as bar:
            do_export(sd, out, fp32=fp32, tokenizer=tok, force=force,
                      progress=lambda name: bar.update(1))
    click.echo(f"exported RWKV-4 {shape.layers} x {shape.width}, vocab {shape.vocab} "
               f"({'fp32' if fp32 else 'fp16'}) to {out}")


def _options(**kw):
    from rwkv2rknn.ir import Options
    return Options(**{k: v for k, v in kw.items() if v is not None})


@cli.command(name="compile")
@click.argument("model", type=click.Path())
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Artifact folder to write (manifest.json, plan.json, segments/).")
@click.option("--target", default="rk3588", show_default=True,
              type=click.Choice(["rk3588", "rk3576", "rk3568", "rk3566", "rk3562"]),
              help="Rockchip SoC to build the .rknn files for.")
@click.option("--plan-only", is_flag=True, help="Partition and cut only: no .rknn (needs no rknn-toolkit2).")
@click.option("--strict", is_flag=True, help="Fail if any NPU segment fails to build (default: fall back to the CPU).")
@click.option("--dump-after", metavar="PASS", default=None,
              help="Also write the graph after PASS to OUT/dump/after_PASS.onnx.")
@click.option("--calib-tokens", type=click.IntRange(1, 4096), default=8, show_default=True,
              help="Sample tokens the fp16 range guard runs.")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Build cache (default: $RWKV2RKNN_CACHE or ~/.cache/rwkv2rknn).")
@click.option("--prefill-rows", default="16,32,64", show_default=True,
              help="Row counts T of the NPU builds for prefill (comma-separated), or 'none'.")
@click.option("--placement", type=click.Choice(["npu", "cost"]), default="npu", show_default=True,
              help="npu: every constant-weight MatMul on the NPU; cost: only where the device "
                   "profile says the NPU wins.")
@click.option("--profile", "profile_path", type=click.Path(dir_okay=False), default=None,
              help="Device profile JSON for --placement cost and the plan's estimates "
                   "(default: published RK3588 figures).")
@click.option("--force", is_flag=True, help="Replace an output folder that holds other files.")
@click.option("--verbose", "tool_verbose", is_flag=True, help="Show rknn-toolkit2's own output.")
@handle_errors
def compile_cmd(model, out_dir, target, plan_only, strict, dump_after, calib_tokens, cache_dir,
                prefill_rows, placement, profile_path, force, tool_verbose):
    """Compile MODEL (a folder of per-layer RWKV ONNX files, or one .onnx) into a hybrid
    NPU/CPU artifact."""
    opts = _options(target=target, strict=strict, plan_only=plan_only, calib_tokens=calib_tokens,
                    cache_dir=cache_dir, verbose=tool_verbose, placement=placement,
                    profile=profile_path, prefill_rows=_parse_rows(prefill_rows))
    manifest = _compile_with_progress(model, out_dir, opts, force, dump_after)
    click.echo(manifest.table())
    click.echo(f"artifact written to {out_dir}")


def _parse_rows(text: str):
    from rwkv2rknn.errors import UsageError
    if text.strip().lower() in ("none", ""):
        return ()
    try:
        rows = tuple(sorted({int(r) for r in text.split(",")}))
    except ValueError:
        rows = ()
    if not rows or min(rows) < 2 or max(rows) > 4096:
        raise UsageError(f"--prefill-rows '{text}' is not a list of row counts from 2 to 4096",
                         "write it like --prefill-rows 16,32,64 (or none)")
    return rows


def _compile_with_progress(model, out_dir, opts, force=False, dump_after=None):
    from rwkv2rknn.compiler import compile_model, segment_line

    def on_pass(name, notes):
        for note in notes or ["done"]:
            click.echo(f"  {name}: {note}", err=True)

    def on_segment(seg, status, i, n):
        click.echo(segment_line(seg, status, i, n), err=True)

    return compile_model(model, out_dir, opts, force=force, dump_after=dump_after,
                         progress=on_segment, on_pass=on_pass)


def _parse_tokens(text: str, vocab: int):
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        from rwkv2rknn.errors import UsageError
        raise UsageError(f"--tokens '{text[:40]}' is not a comma-separated list of token ids",
                         "write it like --tokens 5,17,300")
    from rwkv2rknn.errors import UsageError
    if not ids:
        raise UsageError("--tokens is empty", "give at least one token id, like --tokens 5,17,300")
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise UsageError(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})",
                         "give ids the model knows")
    return ids


def _check_prompt(prompt: str) -> None:
    from rwkv2rknn.errors import UsageError
    if prompt is None or prompt == "":
        raise UsageError("the prompt is empty", 'give some text, like --prompt "Once upon a time"')
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError("the prompt is not valid UTF-8", "pass the prompt as UTF-8 text")


def _check_out_file(path, flag: str) -> None:
    """Refuse an output file whose folder is missing or not writable before any work is done."""
    from rwkv2rknn.errors import UsageError
    if not path:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise UsageError(f"cannot write {flag} '{path}': folder '{folder}' does not exist or is not writable",
                         "give a path in an existing, writable folder")


@cli.command()
@click.argument("artifact", required=False, type=click.Path())
@click.option("--prompt", default=None, help="Text to continue.")
@click.option("--max-tokens", type=int, default=64, show_default=True, help="Tokens to generate (1..65536).")
@click.option("--temperature", type=click.FloatRange(0, 100), default=0.8, show_default=True,
              help="Sampling temperature (0: greedy).")
@click.option("--top-p", type=click.FloatRange(0, 1), default=0.9, show_default=True, help="Nucleus sampling.")
@click.option("--seed", type=click.IntRange(0, 2 ** 63 - 1), default=None, help="Random seed for sampling.")
@click.option("--backend", type=click.Choice(["auto", "ort", "rknn-sim", "rknn-lite"]), default="auto",
              show_default=True, help="Where NPU segments run (CPU segments always use onnxruntime).")
@click.option("--core-mask", default="auto", show_default=True,
              help="rknn-lite only: NPU cores (auto, 0, 1, 2, 0_1, 0_1_2).")
@click.option("--tokenizer", default=None, help="bytes, world, or a tokenizer.json path (default: the model's).")
@click.option("--tokens", default=None, help="Evaluation: feed these comma-separated token ids instead of a prompt.")
@click.option("--logits-out", type=click.Path(dir_okay=False), default=None,
              help="With --tokens: save float32 logits [T, vocab] to this .npy file.")
@handle_errors
def run(artifact, prompt, max_tokens, temperature, top_p, seed, backend, core_mask, tokenizer,
        tokens, logits_out):
    """Generate text with a compiled ARTIFACT (default: the bundled model, compiled on first use).

    ARTIFACT may also be an uncompiled folder of per-layer files with --backend ort: that is the
    pure ONNX Runtime reference.
    """
    from rwkv2rknn.errors import UsageError
    if tokens is None and prompt is None:
        raise UsageError("nothing to do", 'give --prompt "text" (or --tokens ids --logits-out file.npy)')
    if tokens is not None and prompt is not None:
        raise UsageError("--tokens and --prompt go separately", "give one of them")
    if logits_out and tokens is None:
        raise UsageError("--logits-out needs --tokens", "give --tokens 5,17,300")
    _check_out_file(logits_out, "--logits-out")
    if tokens is None:
        _check_prompt(prompt)
        if not 1 <= max_tokens <= 65536:
            raise UsageError(f"--max-tokens {max_tokens} is out of range", "give 1 to 65536")
    from rwkv2rknn.runtime.loader import open_model
    model, tok_spec = open_model(artifact, backend, core_mask, echo=_say)
    if tokens is not None:
        import numpy as np
        ids = _parse_tokens(tokens, model.vocab)
        logits = model.logits(ids)
        if logits_out:
            np.save(logits_out, logits.astype(np.float32))
            click.echo(f"saved logits {list(logits.shape)} to {logits_out}", err=True)
        else:
            click.echo(" ".join(str(int(i)) for i in logits.argmax(1)))
        return
    _print_generation(model, tokenizer or tok_spec, prompt, max_tokens, temperature, top_p, seed)


def _say(message: str) -> None:
    click.echo(message, err=True)


def _print_generation(model, tok_spec, prompt, max_tokens, temperature, top_p, seed):
    """Stream the prompt and its continuation to stdout, then the timing line to stderr."""
    from rwkv2rknn.generate import generate_text

    def on_text(text):
        click.echo(text, nl=False)
        sys.stdout.flush()

    res = generate_text(model, tok_spec, prompt, max_tokens, temperature, top_p, seed, on_text=on_text)
    click.echo()
    ttft = f"{1000 * res.ttft_s:.0f} ms" if res.ttft_s is not None else "n/a"
    click.echo(f"[{res.prompt_tokens} prompt tokens, {len(res.ids)} generated; time to first token {ttft}, "
               f"{res.decode_tokens_per_s:.1f} tokens/s]", err=True)


@cli.command()
@click.argument("artifact", type=click.Path())
@click.option("--tokens", "n_tokens", type=click.IntRange(1, 4096), default=32, show_default=True,
              help="Seeded random tokens to teacher-force.")
@click.option("--seed", type=click.IntRange(0, 2 ** 63 - 1), default=0, show_default=True)
@click.option("--backend", type=click.Choice(["auto", "ort", "rknn-sim", "rknn-lite"]), default="auto",
              show_default=True)
@click.option("--reference", type=click.Path(), default=None,
              help="The source to compare against: per-layer folder or whole-model .onnx (default: "
                   "the one the artifact was compiled from).")
@click.option("--per-segment", is_flag=True, help="Also compare every NPU segment alone against onnxruntime.")
@click.option("--min-top1", type=click.FloatRange(0, 1), default=0.99, show_default=True)
@click.option("--max-rel", type=click.FloatRange(0, None), default=None,
              help="Max logit error relative to the logit scale (default: 1e-4 for ort on fp32 files, else 0.05).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@handle_errors
def check(artifact, n_tokens, seed, backend, reference, per_segment, min_top1, max_rel, as_json):
    """Run ARTIFACT and pure ONNX Runtime on the same tokens and compare; exit 1 outside tolerance."""
    from rwkv2rknn.check import run_check
    rep, chosen = run_check(artifact, n_tokens, seed, backend, reference, per_segment, min_top1, max_rel)
    _print_check(rep, chosen, as_json)


def _print_check(rep, chosen: str, as_json: bool = False) -> None:
    """Print a check report and exit: 0 inside tolerance, 1 outside."""
    import json
    if as_json:
        click.echo(json.dumps({"backend": chosen, **rep.to_dict()}, indent=1))
    else:
        click.echo(f"backend {chosen}: {rep.summary()}")
        for s in rep.per_segment:
            click.echo(f"  {s['segment']}: max rel error {s['max_rel']:.3g}")
    sys.exit(0 if rep.passed else 1)


@cli.command()
@click.option("--build-probes", "build_dir", type=click.Path(file_okay=False), default=None,
              help="Compile machine: write the probe models (.onnx and .rknn) into this folder.")
@click.option("--probes", "probe_dir", type=click.Path(file_okay=False), default=None,
              help="Board: the folder of probes built with --build-probes.")
@click.option("--backend", type=click.Choice(["rknn-lite", "rknn-sim"]), default="rknn-lite", show_default=True)
@click.option("--core-mask", default="auto", show_default=True)
@click.option("--target", default="rk3588", show_default=True)
@click.option("-o", "--output", "out", type=click.Path(dir_okay=False), default="profile.json",
              show_default=True, help="Where to write the measured profile (JSON).")
@handle_errors
def profile(build_dir, probe_dir, backend, core_mask, target, out):
    """Measure a device profile for `compile --placement cost --profile FILE`.

    \b
    On the compile machine:  rwkv2rknn profile --build-probes probes/
    On the board:            rwkv2rknn profile --probes probes/ -o rk3588.json
    """
    import json
    from rwkv2rknn.errors import UsageError
    from rwkv2rknn.measure import build_probes, measure
    if bool(build_dir) == bool(probe_dir):
        raise UsageError("give one of --build-probes DIR and --probes DIR", "see rwkv2rknn profile --help")
    if build_dir:
        build_probes(build_dir, target, echo=_say)
        click.echo(f"probes written to {build_dir}; copy them to the board and run "
                   f"rwkv2rknn profile --probes {build_dir}")
        return
    _check_out_file(out, "--output")
    prof = measure(probe_dir, backend, core_mask, echo=_say)
    with open(out, "w") as f:
        json.dump(prof.to_dict(), f, indent=1)
    click.echo(f"profile '{prof.name}' written to {out}")


@cli.command(name="eval")
@click.argument("artifact", type=click.Path())
@click.option("--text", "text_file", required=True, type=click.Path(dir_okay=False),
              help="UTF-8 text file to score.")
@click.option("--max-bytes", type=click.IntRange(16, 10 ** 8), default=20000, show_default=True,
              help="Score at most this many bytes from the start of the file.")
@click.option("--backend", type=click.Choice(["auto", "ort", "rknn-sim", "rknn-lite"]), default="auto",
              show_default=True)
@click.option("--tokenizer", default=None, help="bytes, world, or a tokenizer.json path (default: the model's).")
@handle_errors
def eval_cmd(artifact, text_file, max_bytes, backend, tokenizer):
    """Bits per byte of ARTIFACT (or a per-layer folder with --backend ort) on a text file."""
    from rwkv2rknn.evaluate import bits_per_byte, read_text
    from rwkv2rknn.generate import model_tokenizer
    from rwkv2rknn.runtime.loader import open_model
    text = read_text(text_file, max_bytes)
    model, tok_spec = open_model(artifact, backend, echo=_say)
    score = bits_per_byte(model, model_tokenizer(tokenizer or tok_spec), text)
    click.echo(f"{score.bits_per_byte:.4f} bits per byte over {score.bytes} bytes "
               f"({score.tokens} tokens, next-token top-1 {100 * score.top1:.1f}%)")


@cli.command()
@click.option("--layers", type=click.IntRange(1, 256), default=24, show_default=True)
@click.option("--width", type=click.IntRange(8, 16384), default=1024, show_default=True)
@click.option("--vocab", type=click.IntRange(2, 1 << 20), default=50277, show_default=True)
@click.option("--tokens", type=click.IntRange(3, 100000), default=32, show_default=True,
              help="Timed tokens per runner (the median is reported).")
@click.option("--no-rwkv", is_flag=True, help="Skip the rwkv package (reference implementation).")
@click.option("--json-out", type=click.Path(dir_okay=False), default=None, help="Also save the figures as JSON.")
@handle_errors
def bench(layers, width, vocab, tokens, no_rwkv, json_out):
    """Measure decode ms/token of the per-layer loop, the hybrid executor, a fused session and
    the rwkv package on a random model (default: 430M-sized), with ratios and the bandwidth bound."""
    import json
    from rwkv2rknn.bench import run_bench
    _check_out_file(json_out, "--json-out")
    res = run_bench(layers=layers, width=width, vocab=vocab, tokens=tokens,
                    with_rwkv=not no_rwkv, echo=click.echo)
    if json_out:
        with open(json_out, "w") as f:
            json.dump(res, f, indent=1)


@cli.command()
@click.option("--prompt", default="The", show_default=True, help="Text to continue.")
@click.option("--max-tokens", type=click.IntRange(1, 65536), default=200, show_default=True)
@click.option("--seed", type=click.IntRange(0, 2 ** 63 - 1), default=0, show_default=True)
@click.option("--backend", type=click.Choice(["auto", "ort", "rknn-sim", "rknn-lite"]), default="auto",
              show_default=True)
@handle_errors
def demo(prompt, max_tokens, seed, backend):
    """The whole flow on the bundled model: export, compile (plan table), generate, check."""
    from rwkv2rknn.check import run_check
    from rwkv2rknn.models import bundled
    from rwkv2rknn.runtime.hybrid import load_manifest
    from rwkv2rknn.runtime.loader import open_model
    _check_prompt(prompt)
    _say("== 1. export and compile the bundled model (cached after the first run)")
    artifact = bundled.ensure_compiled(echo=_say)
    click.echo(f"artifact: {artifact}\n")
    click.echo(load_manifest(artifact).table())
    _say("\n== 2. generate")
    model, tok_spec = open_model(artifact, backend, echo=_say)
    _print_generation(model, tok_spec, prompt, max_tokens, 0.8, 0.9, seed)
    _say("\n== 3. check against pure onnxruntime over the per-layer files")
    _print_check(*run_check(artifact, 32, 0, backend))


def main() -> None:
    os.environ.setdefault("TQDM_DISABLE", "1")
    cli(prog_name="rwkv2rknn")


if __name__ == "__main__":
    main()
