"""`rwkv2rknn report`."""

from __future__ import annotations

import click

from rwkv2rknn.cli.app import cli, handle_errors
from rwkv2rknn.cli.options import FILE, artifact_argument, option, output_option


@cli.command()
@artifact_argument()
@output_option("out", "HTML file to write (default: ARTIFACT/report.html).", type=FILE)
@click.option(
    "--bench",
    "bench_json",
    type=FILE,
    help="Also chart these figures from `rwkv2rknn bench --json-out FILE`.",
)
@option(
    "--size",
    "size_by",
    type=click.Choice(["flops", "bytes"]),
    default="flops",
    help="What the widths of the segments follow: MatMul FLOPs, or bytes of their files.",
)
@handle_errors
def report(artifact, out, bench_json, size_by):
    """Draw ARTIFACT's partition, estimates and last check as one offline HTML page."""
    from rwkv2rknn.tools.report_html import write_report

    click.echo(f"report written to {write_report(artifact, out, bench_json, size_by)}")
