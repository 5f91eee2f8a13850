"""The rwkv2rknn command line: thin click commands over the library.

Only this module prints and chooses exit codes: 0 done, 1 a failed job, 2 bad usage.
"""

from __future__ import annotations

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
        except Exception as e:  # noqa: BLE001 - the last line of defence, still one line
            if _Ctx.debug:
                raise
            msg = str(e).splitlines()[0][:200] if str(e) else ""
            click.echo(f"error: internal error {type(e).__name__}: {msg} "
                       f"(run again with --debug for the traceback and report it)", err=True)
            sys.exit(1)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder to write embed.onnx, mixing_N.onnx and head.onnx into.")
@click.option("--fp32", is_flag=True, help="Keep float32 (default: float16, like the public files).")
@click.option("--tokenizer", default=None,
              help="Tokenizer to record for the model: bytes, world, or a tokenizer.json path "
                   "(default: chosen from the vocabulary size).")
@click.option("--force", is_flag=True, help="Replace an output folder that holds other files.")
@handle_errors
def export(checkpoint: str, out_dir: str, fp32: bool, tokenizer, force: bool) -> None:
    """Export an RWKV-4 CHECKPOINT (.pth) to per-layer ONNX files."""
    from rwkv2rknn.models.checkpoint import load_checkpoint
    from rwkv2rknn.models.export import export as do_export
    from rwkv2rknn.tokenizer import tokenizer_for_vocab

    sd = load_checkpoint(checkpoint)
    from rwkv2rknn.models import rwkv4
    shape = rwkv4.check_state_dict(sd)
    tok = tokenizer or tokenizer_for_vocab(shape.vocab)
    with click.progressbar(length=shape.layers + 2, label="exporting", file=sys.stderr) as bar:
        do_export(sd, out_dir, fp32=fp32, tokenizer=tok, force=force,
                  progress=lambda name: bar.update(1))
    click.echo(f"exported RWKV-4 {shape.layers} x {shape.width}, vocab {shape.vocab} "
               f"({'fp32' if fp32 else 'fp16'}) to {out_dir}")


def main() -> None:
    os.environ.setdefault("TQDM_DISABLE", "1")
    cli(prog_name="rwkv2rknn")


if __name__ == "__main__":
    main()
