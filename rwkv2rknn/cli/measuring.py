"""`rwkv2rknn bench` and `rwkv2rknn profile`: figures measured on this machine."""

from __future__ import annotations

import click

from rwkv2rknn.cli.app import check_out_file, cli, handle_errors, say
from rwkv2rknn.cli.options import (
    FILE,
    FOLDER,
    backend_option,
    core_mask_option,
    option,
    output_option,
    probes_option,
    target_option,
)
from rwkv2rknn.errors import UsageError

NPU_RUNNERS = click.Choice(["rknn-rt", "rknn-lite", "rknn-sim"])


@cli.command()
@click.option(
    "--build-probes",
    "build_dir",
    type=FOLDER,
    help="Compile machine: write the probe models (.onnx and .rknn) into this folder.",
)
@probes_option("Board: the folder of probes built with --build-probes.")
@backend_option(
    "On the board: rknn-rt (librknnrt's C API) or rknn-lite; the call cost measured is that runner's.",
    NPU_RUNNERS,
    "rknn-rt",
)
@core_mask_option()
@target_option()
@output_option("out", "Where to write the measured profile (JSON).", type=FILE, default="profile.json")
@handle_errors
def profile(build_dir, probe_dir, backend, core_mask, target, out):
    """Measure a device profile for `compile --placement cost --profile FILE`.

    \b
    On the compile machine:  rwkv2rknn profile --build-probes probes/
    On the board:            rwkv2rknn profile --probes probes/ -o rk3588.json
    """
    import json
    from rwkv2rknn.tools.measure import build_probes, measure

    if bool(build_dir) == bool(probe_dir):
        raise UsageError("give one of --build-probes DIR and --probes DIR", "see rwkv2rknn profile --help")
    if build_dir:
        build_probes(build_dir, target, echo=say)
        click.echo(
            f"probes written to {build_dir}; copy them to the board and run "
            f"rwkv2rknn profile --probes {build_dir}"
        )
        return
    check_out_file(out, "--output")
    prof = measure(probe_dir, backend, core_mask, echo=say)
    with open(out, "w") as f:
        json.dump(prof.to_dict(), f, indent=1)
    click.echo(f"profile '{prof.name}' written to {out}")


@cli.command()
@option(
    "--version",
    type=click.Choice(["4", "5", "6", "7"]),
    default="4",
    help="RWKV version of the random model.",
)
@option("--layers", type=click.IntRange(1, 256), default=24)
@option("--width", type=click.IntRange(8, 16384), default=1024)
@option("--vocab", type=click.IntRange(2, 1 << 20), default=50277)
@option(
    "--tokens",
    type=click.IntRange(3, 100000),
    default=32,
    help="Timed tokens per runner (the median is reported).",
)
@click.option(
    "--rounds",
    type=click.IntRange(1, 1000),
    default=None,
    help="Interleave the runners' timed tokens in this many rounds (with --backtest: the "
    "tokens and the probes).  [default: 4; 3 with --backtest]",
)
@click.option("--no-rwkv", is_flag=True, help="Skip the rwkv package (reference implementation).")
@probes_option(
    "Board: the folder of `rwkv2rknn profile --build-probes`, to time the NPU's "
    "per-call cost through rknn-rt and rknn-lite."
)
@core_mask_option("Board: NPU cores of the probe.")
@option(
    "--busy",
    type=click.IntRange(0, 64),
    default=0,
    help="Run this many single-core busy loops beside the timed phases (the loaded case, "
    "on purpose); they are stopped at the end.",
)
@click.option("--json-out", type=FILE, help="Also save the figures as JSON.")
@click.option(
    "--backtest",
    type=FOLDER,
    help="Instead: check the plan's estimator on this compiled artifact: measure this "
    "machine's profile, predict each segment's time on onnxruntime, run it and print "
    "predicted / measured per segment kind and per token.",
)
@handle_errors
def bench(
    version, layers, width, vocab, tokens, rounds, no_rwkv, probe_dir, core_mask, busy, json_out, backtest
):
    """Measure decode ms/token of the per-layer loop, the hybrid executor, a fused session and
    the rwkv package on a random model (default: 430M-sized), prefill tokens/s, the peak memory,
    the plan's board estimate and, on a board, the NPU's per-call cost of both board runners.

    \b
    With --backtest ARTIFACT: the estimator against this machine, on that artifact.
    """
    import json
    from rwkv2rknn.tools.bench import run_bench

    check_out_file(json_out, "--json-out")
    if backtest:
        from rwkv2rknn.tools.backtest import run_backtest
        from rwkv2rknn.tools.busy import BusyLoops

        with BusyLoops(busy):
            res = run_backtest(backtest, tokens=tokens, rounds=rounds or 3, echo=click.echo)
        if json_out:
            with open(json_out, "w") as f:
                json.dump(res, f, indent=1)
        return
    res = run_bench(
        layers=layers,
        width=width,
        vocab=vocab,
        tokens=tokens,
        with_rwkv=not no_rwkv,
        echo=click.echo,
        version=version,
        probes=probe_dir,
        core_mask=core_mask,
        busy=busy,
        rounds=rounds or 4,
    )
    if json_out:
        with open(json_out, "w") as f:
            json.dump(res, f, indent=1)
