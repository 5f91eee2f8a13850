"""`rwkv2rknn pack` (on the compile machine, for the board) and `rwkv2rknn doctor` (on the board)."""

from __future__ import annotations

import sys

import click

from rwkv2rknn.cli.app import cli, handle_errors
from rwkv2rknn.cli.options import (
    FOLDER,
    artifact_argument,
    backend_option,
    force_option,
    output_option,
    rknn_io_option,
)


@cli.command(name="pack")
@artifact_argument()
@output_option("out_dir", "Folder to write the board's copy into.", required=True, type=FOLDER)
@force_option()
@handle_errors
def pack_cmd(artifact, out_dir, force):
    """Copy exactly what the board runs (NPU segments as .rknn, CPU segments as ONNX, the
    tokenizer, the manifest) from a compiled ARTIFACT into a new folder."""
    from rwkv2rknn.artifact.pack import pack

    res = pack(artifact, out_dir, force=force)
    per = f", {res['bytes'] / res['parameters']:.2f} bytes per parameter" if res["parameters"] else ""
    click.echo(f"packed {out_dir}: {res['bytes']:,} bytes for {res['parameters']:,} parameters{per}")
    click.echo(f"board memory need: {res['need']}")


@cli.command()
@artifact_argument(required=False)
@backend_option("The runner the self-test uses for NPU segments.")
@rknn_io_option("rknn-rt's io path to test (auto: both, the fastest that passes is recorded per segment).")
@handle_errors
def doctor(artifact, backend, rknn_io):
    """Check that this board can run ARTIFACT: architecture, SoC and NPU cores, RKNPU driver,
    librknnrt version (and the runtime's own report of it), free memory; then the self-test: every
    NPU segment against its golden vectors (recorded beside the artifact). Exit 1 if anything
    needs fixing."""
    from rwkv2rknn.tools.doctor import doctor as run_doctor
    from rwkv2rknn.tools.doctor import selftest

    verdicts = run_doctor(artifact)
    for v in verdicts:
        click.echo(v.line())
    if artifact:
        tested = selftest(artifact, backend, rknn_io, echo=click.echo)
        for v in tested:
            click.echo(v.line())
        verdicts += tested
    sys.exit(0 if all(v.ok for v in verdicts) else 1)
