"""`rwkv2rknn report`."""

from __future__ import annotations

import click

from rwkv2rknn.cli.app import cli, handle_errors


@cli.command()
@click.argument("artifact", type=click.Path())
@click.option(
    "-o",
    "--output",
    "out",
    type=click.Path(dir_okay=False),
    default=None,
    help="HTML file to write (default: ARTIFACT/report.html).",
)
@click.option(
    "--bench",
    "bench_json",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also chart these figures from `rwkv2rknn bench --json-out FILE`.",
)
@click.option(
    "--size",
    "size_by",
    type=click.Choice(["flops", "bytes"]),
    default="flops",
    show_default=True,
    help="What the widths of the segments follow: MatMul FLOPs, or bytes of their files.",
)
@handle_errors
def report(artifact, out, bench_json, size_by):
    """Draw ARTIFACT's partition, estimates and last check as one offline HTML page."""
    from rwkv2rknn.tools.report_html import write_report

    click.echo(f"report written to {write_report(artifact, out, bench_json, size_by)}")
