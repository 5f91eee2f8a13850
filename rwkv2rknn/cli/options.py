"""The options several commands take, each written once: a command names them by decorator
(``@backend_option()``, ``@output_option("out_dir", "...")``) with its own help text where its
meaning differs. ``option`` is click.option with the defaults shown in the help."""

from __future__ import annotations

from typing import Optional

import click

from rwkv2rknn.runtime.board import BACKENDS
from rwkv2rknn.runtime.soc import TARGETS

BACKEND = click.Choice(list(BACKENDS))
SEED = click.IntRange(0, 2**63 - 1)  # numpy's generators take no negative seed
RKNN_IO = click.Choice(["auto", "copy", "zero-copy"])
FILE = click.Path(dir_okay=False)  # a file's path (existing or to write)
FOLDER = click.Path(file_okay=False)  # a folder's path
TOKENIZER_HELP = "bytes, world, or a tokenizer.json path (default: the model's)."


def option(*decls: str, **kw):
    """click.option that shows its default in the help (a flag's aside)."""
    if "default" in kw and not kw.get("is_flag"):
        kw.setdefault("show_default", True)
    return click.option(*decls, **kw)


def options(*decorators):
    """One decorator that applies ``decorators`` in the order the help lists them."""

    def apply(fn):
        for d in reversed(decorators):
            fn = d(fn)
        return fn

    return apply


def artifact_argument(required: bool = True):
    return click.argument("artifact", required=required, type=click.Path())


def backend_option(help: Optional[str] = None, choices=BACKEND, default: str = "auto"):
    return option("--backend", type=choices, default=default, help=help)


def core_mask_option(help: Optional[str] = None):
    return option("--core-mask", default="auto", help=help)


def target_option(help: Optional[str] = None):
    return option("--target", default="rk3588", type=click.Choice(TARGETS), help=help)


def tokenizer_option(help: str = TOKENIZER_HELP):
    return click.option("--tokenizer", help=help)


def seed_option(default: Optional[int] = None, help: Optional[str] = None):
    return option("--seed", type=SEED, default=default, help=help)


def rknn_io_option(help: str):
    return option("--rknn-io", type=RKNN_IO, default="auto", help=help)


def force_option(help: str = "Replace an output folder that holds other files."):
    return click.option("--force", is_flag=True, help=help)


def output_option(dest: str, help: str, **kw):
    """-o/--output into the parameter ``dest``."""
    return option("-o", "--output", dest, help=help, **kw)


def temperature_option(default: float):
    return option(
        "--temperature",
        type=click.FloatRange(0, 100),
        default=default,
        help="Sampling temperature (0: greedy).",
    )


def text_option(help: str):
    return click.option("--text", "text_file", type=FILE, help=help)


def reference_option(help: str):
    return click.option("--reference", type=click.Path(), help=help)


def probes_option(help: str):
    return click.option("--probes", "probe_dir", type=FOLDER, help=help)
