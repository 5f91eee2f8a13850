"""`rwkv2rknn export` and `rwkv2rknn compile`."""

from __future__ import annotations

import sys

import click

from rwkv2rknn.cli.app import cli, handle_errors
from rwkv2rknn.cli.options import (
    FILE,
    FOLDER,
    force_option,
    option,
    output_option,
    target_option,
    tokenizer_option,
)
from rwkv2rknn.artifact.plan import PRECISIONS
from rwkv2rknn.compiler.ir import Options
from rwkv2rknn.errors import UsageError

DEFAULTS = Options()  # the compile flags' defaults are the compiler's own


@cli.command()
@click.argument("checkpoint", type=click.Path())
@output_option(
    "out",
    "Folder to write embed.onnx, mixing_N.onnx and head.onnx into, or a file name "
    "ending in .onnx for one whole-model file.",
    required=True,
    type=click.Path(),
)
@click.option("--fp32", is_flag=True, help="Keep float32 (default: float16, like the public files).")
@tokenizer_option(
    "Tokenizer to record for the model: bytes, world, or a tokenizer.json path "
    "(default: the model folder's tokenizer.json, else chosen from the vocabulary "
    "size)."
)
@force_option("Replace an output folder that holds other files (or an existing file).")
@handle_errors
def export(checkpoint: str, out: str, fp32: bool, tokenizer, force: bool) -> None:
    """Export an RWKV-4, 5.2, 6 or 7 CHECKPOINT to per-layer ONNX files or one .onnx file.

    \b
    CHECKPOINT is one of (bf16, fp16 or fp32; docs/formats.md):
      an official .pth (BlinkDL's RWKV-LM layout, or the same keys as .safetensors)
      a Hugging Face model folder, its model.safetensors, pytorch_model.bin or
        *.index.json (shards): transformers RwkvForCausalLM (RWKV-4),
        Rwkv5ForCausalLM / Rwkv6ForCausalLM, fla-hub RWKV7ForCausalLM
    A folder's tokenizer.json becomes the model's tokenizer."""
    import os

    from rwkv2rknn.models.checkpoint import load_model
    from rwkv2rknn.models.export import arch_of, export as do_export
    from rwkv2rknn.runtime.tokenizer import check_fits, load_tokenizer, tokenizer_for_vocab

    if tokenizer:
        tok_obj = load_tokenizer(tokenizer)  # a file that is not a tokenizer fails here, before any work
    sd, folder_tok, what = load_model(checkpoint)
    arch, shape = arch_of(sd)
    if tokenizer:
        check_fits(tok_obj, shape.vocab, tokenizer)
    elif folder_tok:
        check_fits(load_tokenizer(folder_tok), shape.vocab, folder_tok)
    tok = tokenizer or (os.path.abspath(folder_tok) if folder_tok else tokenizer_for_vocab(shape.vocab))
    if out.endswith(".onnx"):
        do_export(sd, out, fp32=fp32, tokenizer=tok, force=force)
    else:
        with click.progressbar(length=shape.layers + 2, label="exporting", file=sys.stderr) as bar:
            do_export(
                sd,
                out,
                fp32=fp32,
                tokenizer=tok,
                force=force,
                progress=lambda name: bar.update(1),  # the folder's tokenizer.json goes along
                tokenizer_file=folder_tok if folder_tok and not tokenizer else None,
            )
    click.echo(
        f"exported RWKV-{arch.ARCH[4:]} {shape.layers} x {shape.width}, vocab {shape.vocab} "
        f"({'fp32' if fp32 else 'fp16'}{'' if what == 'official layout' else ', from ' + what})"
        f" to {out}"
    )
    if tok is None:
        click.echo(
            f"warning: no tokenizer recorded: none of the built-in ones (bytes 256, world "
            f"65536) has {shape.vocab} tokens; export again with --tokenizer "
            f"PATH/tokenizer.json to `run` or `chat` it (compile and check need none)",
            err=True,
        )


def _options(**kw):
    return Options(**{k: v for k, v in kw.items() if v is not None})


@cli.command(name="compile")
@click.argument("model", type=click.Path())
@output_option(
    "out_dir", "Artifact folder to write (manifest.json, plan.json, segments/).", required=True, type=FOLDER
)
@target_option("Rockchip SoC to build the .rknn files for.")
@click.option("--plan-only", is_flag=True, help="Partition and cut only: no .rknn (needs no rknn-toolkit2).")
@click.option(
    "--strict",
    is_flag=True,
    help="Fail if any NPU segment or its T-row (prefill) variant fails to build "
    "(default: fall back to the CPU, or to token-by-token prefill).",
)
@click.option(
    "--dump-after", metavar="PASS", help="Also write the graph after PASS to OUT/dump/after_PASS.onnx."
)
@option(
    "--range-tokens",
    type=click.IntRange(1, 4096),
    default=DEFAULTS.range_tokens,
    help="Seeded sample tokens the fp16 range guard runs.",
)
@option(
    "--quant",
    type=click.Choice(PRECISIONS),
    default=DEFAULTS.quant,
    help="Precision of the NPU segments: w8a8 and w16a16i are "
    "calibrated on real text and measured per segment.",
)
@click.option(
    "--calib-text",
    type=FILE,
    help="UTF-8 calibration text for --quant (default: a built-in sample that suits the model's tokenizer).",
)
@option(
    "--calib-tokens",
    type=click.IntRange(16, 4096),
    default=DEFAULTS.calib_tokens,
    help="Tokens of calibration text for the --quant dataset (a quarter more are held "
    "out to measure each segment).",
)
@option(
    "--quant-min-cos",
    type=click.FloatRange(-1, 1),
    default=None,
    help="A quantised segment whose smallest cosine against fp32 on held-out rows is "
    f"lower is built fp16 instead (default {DEFAULTS.quant_min_cos}; with --quant-kl: -1, off).",
)
@click.option(
    "--quant-kl",
    type=click.FloatRange(0, min_open=True),
    default=None,
    metavar="KL",
    help="Keep NPU segments fp16, most KL saved per byte added first, until the "
    "artifact's mean KL divergence on the held-out calibration tokens (rknn-sim against "
    "fp32) is at most KL, e.g. 0.002; prints what it kept, the KL and the bytes.",
)
@click.option(
    "--quant-keep",
    default="",
    metavar="STAGES",
    help="NPU segments (by name, or by a loader stage they hold: embed, L0, ..., head; "
    "comma-separated) that stay fp16 in a quantised compile: mixed precision where "
    "a segment costs the most KL (python bench/quant_search.py ART --alone measures it).",
)
@click.option(
    "--quant-float",
    default="",
    metavar="GROUPS",
    help="Tensors kept float16 in w8a8 builds: 'residual' (the residual stream; "
    "needs --prefill-rows none, docs/quality.md).",
)
@click.option(
    "--cache-dir", type=FOLDER, help="Build cache (default: $RWKV2RKNN_CACHE or ~/.cache/rwkv2rknn)."
)
@option(
    "--prefill-rows",
    default="16,64",
    help="Row counts T of the NPU builds for prefill (comma-separated), or 'none'.",
)
@option(
    "--placement",
    type=click.Choice(["npu", "cost"]),
    default=DEFAULTS.placement,
    help="npu: every constant-weight MatMul on the NPU; cost: only where the device "
    "profile says the NPU wins.",
)
@click.option(
    "--profile",
    type=FILE,
    help="Device profile JSON for --placement cost and the plan's estimates "
    "(default: published RK3588 figures).",
)
@click.option(
    "--whole-graph",
    is_flag=True,
    help="Load the whole model as one graph instead of one stage at a time (needs about "
    "6x the fp32 weights in memory; --dump-after implies it).",
)
@option(
    "--jobs",
    "build_jobs",
    type=click.IntRange(0, 64),
    default=DEFAULTS.build_jobs,
    help="rknn-toolkit2 builds side by side (0: as many as the cores and memory allow).",
)
@click.option(
    "--verify-passes",
    is_flag=True,
    help="Also compare the model with its source after every graph-rewriting pass "
    "(loads the whole model as one graph; each compile already compares the cut "
    "model with its source, and names the failing pass when they differ).",
)
@force_option()
@click.option("--verbose", is_flag=True, help="Show rknn-toolkit2's own output.")
@click.option(
    "--report",
    "with_report",
    is_flag=True,
    help="Also draw the plan as one offline HTML page, OUT/report.html.",
)
@handle_errors
def compile_cmd(
    model,
    out_dir,
    dump_after,
    quant_min_cos,
    quant_kl,
    quant_keep,
    quant_float,
    prefill_rows,
    whole_graph,
    force,
    with_report,
    **same,
):
    """Compile MODEL (a folder of per-layer RWKV ONNX files, or one .onnx) into a hybrid
    NPU/CPU artifact."""
    # ``same``: the flags named as the compiler's Options fields, passed on as they are
    keep = _parse_stages(quant_keep)
    if keep and same["quant"] == "fp16":
        raise UsageError("--quant-keep is for quantised builds", "add --quant w8a8 (or drop --quant-keep)")
    if same["calib_text"] and same["quant"] == "fp16":
        raise UsageError("--calib-text is for quantised builds", "add --quant w8a8 (or drop --calib-text)")
    if quant_kl is not None and (same["quant"] == "fp16" or same["plan_only"]):
        raise UsageError(
            "--quant-kl is for quantised builds", "add --quant w8a8 (without --plan-only), or drop --quant-kl"
        )
    if quant_min_cos is None:  # with --quant-kl the KL decides, not the per-row cosine
        quant_min_cos = -1.0 if quant_kl is not None else DEFAULTS.quant_min_cos
    opts = _options(
        **same,
        quant_min_cos=quant_min_cos,
        quant_keep=keep,
        quant_float=tuple(dict.fromkeys(g.strip() for g in quant_float.split(",") if g.strip())),
        prefill_rows=_parse_rows(prefill_rows),
        stream=not whole_graph,
    )
    _show_compiled(_compile_with_progress(model, out_dir, opts, force, dump_after), out_dir, opts)
    click.echo(f"artifact written to {out_dir}")
    if quant_kl is not None:
        _choose_by_kl(model, out_dir, opts, quant_kl)
    elif opts.quant != "fp16" and not opts.plan_only:
        _print_heldout_quality(model, out_dir, opts)
    if with_report:
        from rwkv2rknn.tools.report_html import write_report

        click.echo(f"report written to {write_report(out_dir)}")


def _show_compiled(manifest, out_dir, opts) -> None:
    """A compile's plan table, its warnings and (for a built one) the board memory it needs."""
    click.echo(manifest.table())
    for line in manifest.warnings():
        click.echo(f"warning: {line}", err=True)
    if not opts.plan_only:
        from rwkv2rknn.runtime.device import describe_need, memory_need

        click.echo(f"board memory need: {describe_need(memory_need(manifest, out_dir))}")


def _choose_by_kl(model, out_dir, opts, target: float) -> None:
    """--quant-kl: keep segments fp16 by measured KL (tools.quant_kl), compiling again with them
    kept; prints the choice and the chosen artifact's held-out KL."""
    import dataclasses
    import json
    import os

    from rwkv2rknn.rknn.calibrate import calibration_ids
    from rwkv2rknn.tools import quant_kl

    _, hold, where = calibration_ids(model, opts.calib_text, opts.calib_tokens)

    def recompile(keep):
        again = dataclasses.replace(opts, quant_keep=tuple(opts.quant_keep) + tuple(keep))
        click.echo(f"--quant-kl: compiling again with --quant-keep {','.join(again.quant_keep)}", err=True)
        manifest = _compile_with_progress(model, out_dir, again, force=True)
        _show_compiled(manifest, out_dir, again)
        return manifest

    choice = quant_kl.choose(
        out_dir, hold, where, target, recompile, say=lambda ln: click.echo(f"--quant-kl: {ln}", err=True)
    )
    for line in choice.lines():
        click.echo(line)
    with open(os.path.join(out_dir, "plan.json")) as f:
        _echo_heldout(json.load(f)["heldout_quality"], where, opts)


def _print_heldout_quality(model, out_dir, opts) -> None:
    """The quantised artifact's KL divergence against its fp32 segments on the calibration
    text's held-out tokens (run on rknn-sim), printed and saved into plan.json."""
    from rwkv2rknn.rknn.calibrate import calibration_ids
    from rwkv2rknn.tools.evaluate import heldout_quality

    _, hold, where = calibration_ids(model, opts.calib_text, opts.calib_tokens)
    _echo_heldout(heldout_quality(out_dir, hold, where), where, opts)


def _echo_heldout(q: dict, where: str, opts) -> None:
    for path in ("decode", "prefill"):
        f = q.get(path)
        if f and f.get("kl"):
            k = f["kl"]
            click.echo(
                f"{opts.quant} {path:7s} on {q['tokens']} held-out tokens of {where}, against "
                f"fp32 on onnxruntime: KL mean {k['mean']:.3g}, median {k['median']:.3g}, p99 "
                f"{k['p99']:.3g}, max {k['max']:.3g}; same top token {100 * f['same_top']:.1f}%"
            )


def _parse_stages(text: str) -> tuple:
    import re

    stages = tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    bad = [t for t in stages if not re.fullmatch(r"embed|head|L\d+|s\d+_npu_[\w.-]+", t)]
    if bad:
        raise UsageError(
            f"--quant-keep '{bad[0]}' is not a loader stage or NPU segment name",
            "name stages or segments like --quant-keep head,L0,s003_npu_L0-L1",
        )
    return stages


def _parse_rows(text: str):
    if text.strip().lower() in ("none", ""):
        return ()
    try:
        rows = tuple(sorted({int(r) for r in text.split(",")}))
    except ValueError:
        rows = ()
    if not rows or min(rows) < 2 or max(rows) > 4096:
        raise UsageError(
            f"--prefill-rows '{text}' is not a list of row counts from 2 to 4096",
            "write it like --prefill-rows 16,64 (or none)",
        )
    return rows


def _compile_with_progress(model, out_dir, opts, force=False, dump_after=None):
    from rwkv2rknn.compiler.driver import compile_model, segment_line

    def on_pass(name, notes):
        for note in notes or ["done"]:
            click.echo(f"  {name}: {note}", err=True)

    def on_segment(seg, status, i, n):
        click.echo(segment_line(seg, status, i, n), err=True)

    return compile_model(
        model, out_dir, opts, force=force, dump_after=dump_after, progress=on_segment, on_pass=on_pass
    )
