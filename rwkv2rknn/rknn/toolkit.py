"""rknn-toolkit2 on the compile machine: import it quietly, build ONNX into RKNN, say what is installed.

The compiler's build pass and the ``rknn-sim`` runner use this module; the board never imports it
(rknn-toolkit2 and torch do not exist there). The toolkit itself is imported only when a build
starts.
"""

from __future__ import annotations

import contextlib
import io as _io
import logging
import os
import re
import sys
import tempfile

from rwkv2rknn.errors import MissingDependency, ToolkitError
from rwkv2rknn.fileio import scratch_prefix
from rwkv2rknn.artifact.plan import PRECISIONS
from rwkv2rknn.runtime.board import has_module


# rknn-toolkit2's quantized_dtype for each quantised precision of ``artifact.plan.PRECISIONS``
# (the one list; fp16: none). A precision added there without a dtype here fails on import.
_TOOLKIT_DTYPE = {"w8a8": "w8a8", "w16a16i": "w16a16i_dfp"}
QUANT_DTYPE = {p: _TOOLKIT_DTYPE[p] for p in PRECISIONS if p != "fp16"}
# Chosen by measurement on the bundled model (docs/quality.md, "Making w8a8 better"): 'normal'
# calibration (min/max) with per-channel weight scales. 'kl_divergence' measured ~20% lower KL
# mean on text (0.0054 against 0.0067) but lowers the worst held-out cosine, so the
# --quant-min-cos rule keeps more segments fp16 (1 of 6 at 256 calibration tokens, 3 at 1024);
# 'mmse' and per-layer weight scales were no better. A compile records them in each quantised
# build (plan.Build.quant); the simulator rebuilds an artifact's builds with its recorded values.
QUANT_ALGORITHM = "normal"
QUANT_METHOD = "channel"
# ``compile --quant-float``: tensors of a quantised per-token build kept float16 through the
# toolkit's hybrid quantisation (their names in its quantised graph, after
# hybrid_quantization_step1; recorded as ``plan.Build.quant['float']``). 'residual': the residual
# stream, each residual Add and the segment's residual input conversion and output (bundled
# model: w8a8 KL 0.0060 -> 0.0049 at 1.01x the bytes, docs/benchmarks.md). The hybrid flow
# builds one shape only (it drops ``dynamic_input``): T-row builds cannot have it.
FLOAT_TENSORS = {
    "residual": r"(^embed/output_int8$|^L\d+/output_int8$|^L\d+/output$|residual_out(-rs)*$|/output(-rs)+$)",
}

TOOLKIT_INSTALL = (
    "pip install --no-deps rknn-toolkit2==2.5.0 (its other dependencies are in "
    "requirements.txt; or: make install)"
)


def quiet_toolkit() -> None:
    os.environ.setdefault("TQDM_DISABLE", "1")
    logging.getLogger("rknnLogger").setLevel(logging.ERROR)


def import_toolkit():
    quiet_toolkit()
    try:
        with contextlib.redirect_stdout(_io.StringIO()):
            from rknn.api import RKNN
    except ImportError as e:
        raise MissingDependency("rknn-toolkit2 is not installed", TOOLKIT_INSTALL) from e
    logging.getLogger("rknnLogger").setLevel(logging.ERROR)
    return RKNN


def toolkit_version() -> str:
    try:
        from importlib.metadata import version

        return version("rknn-toolkit2")
    except Exception:  # noqa: BLE001 - not installed
        return ""


@contextlib.contextmanager
def quiet_fds(into: str = os.devnull):
    """Silence stdout and stderr at the file-descriptor level (the toolkit's C++ side prints),
    or send both into the file ``into`` (appended)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(into, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        with contextlib.redirect_stdout(_io.StringIO()):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved + [devnull]:
            os.close(fd)


@contextlib.contextmanager
def _maybe_quiet(verbose: bool, log_to: str = ""):
    if verbose:
        yield
        return
    with quiet_fds(log_to or os.devnull):
        yield


def build_in_process(
    onnx_path: str,
    target: str = "rk3588",
    rknn_out: str = "",
    runtime: bool = False,
    verbose: bool = False,
    float_dtype: str = "",
    rows=(),
    precision: str = "fp16",
    dataset: str = "",
    log_to: str = "",
    config=None,
    settings=None,
):
    """Build an ONNX model with rknn-toolkit2; optionally export the .rknn and/or start the
    simulator. Returns the RKNN object. Raises ToolkitError on a refused build.
    ``precision`` other than fp16 quantises with ``dataset`` (``calibrate.write_dataset``: file
    names relative to its folder); a T-row build's samples have the largest row count. The
    toolkit's own output is dropped (``verbose``: shown; ``log_to``: appended to that file).
    ``rows``: a T-row segment, built for each of these row counts (``dynamic_input``).
    ``settings``: how to quantise (``plan.Build.quant``: algorithm, method; default: this version's
    QUANT_ALGORITHM and QUANT_METHOD; 'float': comma-separated FLOAT_TENSORS groups kept float16,
    a per-token build only, through ``_hybrid_steps``). The file is built as written: a columns form
    (``rwkv2rknn.rknn.columns``, marked in the file) takes the dataset's row samples turned to
    [C, T] here. ``config``: more ``RKNN.config`` options, over the quantisation defaults (measurements only;
    its ``auto_hybrid`` goes to ``RKNN.build``).
    The toolkit works in a private folder (it writes fixed-name scratch files such as
    ``check_dynshape0.onnx`` into the working folder: two simulators started in one folder
    broke each other's builds).
    (The toolkit may also kill the whole process: the compiler calls this in a child.)"""
    RKNN = import_toolkit()
    quant = precision != "fp16"
    onnx_path, rknn_out = os.path.abspath(onnx_path), rknn_out and os.path.abspath(rknn_out)
    if quant and (precision not in QUANT_DTYPE or not dataset):
        raise ToolkitError(
            f"cannot build {os.path.basename(onnx_path)} as {precision}",
            f"use one of {', '.join(PRECISIONS)}, with a calibration dataset",
        )
    with _maybe_quiet(verbose, log_to), tempfile.TemporaryDirectory(prefix=scratch_prefix("ds")) as tmp:
        rk = RKNN(verbose=verbose)
        config = dict(config or {})
        build_kw = {"auto_hybrid": config.pop("auto_hybrid")} if "auto_hybrid" in config else {}
        cfg = {"target_platform": target}
        if float_dtype:
            cfg["float_dtype"] = float_dtype
        if rows:
            cfg["dynamic_input"] = dynamic_shapes(onnx_path, rows)
        how = settings or {}
        floating = [g for g in str(how.get("float", "")).split(",") if g] if quant else []
        if floating and (rows or any(g not in FLOAT_TENSORS for g in floating)):
            rk.release()
            raise ToolkitError(
                f"cannot keep '{how['float']}' float16 in "
                f"{'a T-row build' if rows else 'a build'} of {os.path.basename(onnx_path)}",
                f"float16 tensors ({', '.join(FLOAT_TENSORS)}) need a per-token build (--prefill-rows none)",
            )
        if quant:
            cfg.update(
                quantized_dtype=QUANT_DTYPE[precision],
                quantized_algorithm=how.get("algorithm", QUANT_ALGORITHM),
                quantized_method=how.get("method", QUANT_METHOD),
            )
        cfg.update(config)  # measurements: other algorithms, methods, hybrid levels
        if quant:
            dataset = _absolute_dataset(dataset, tmp)
            from rwkv2rknn.rknn.columns import columns_dataset, in_columns

            if in_columns(onnx_path):
                dataset = columns_dataset(dataset, tmp)
        steps = [
            ("config", lambda: rk.config(**cfg)),
            ("load_onnx", lambda: rk.load_onnx(onnx_path)),
            ("build", lambda: rk.build(do_quantization=quant, dataset=dataset or None, **build_kw)),
        ]
        if floating:
            built = {}
            step1, step2 = _hybrid_steps(rk, RKNN, onnx_path, dataset, floating, verbose, built)
            steps[2:] = [("hybrid_quantization_step1", step1), ("hybrid_quantization_step2", step2)]
        else:
            built = {"rk": rk}
        if rknn_out:
            steps.append(("export_rknn", lambda: built["rk"].export_rknn(rknn_out)))
        if runtime:
            steps.append(("init_runtime", lambda: built["rk"].init_runtime()))
        for step, call in steps:
            try:
                with _working_in(tmp):
                    ret = call()
            except Exception as e:  # the toolkit reports some failures as exceptions
                built.get("rk", rk).release()
                raise ToolkitError(
                    f"rknn-toolkit2 {step} failed on {os.path.basename(onnx_path)} ({error_line(e)})",
                    "the segment stays on the CPU; run with --verbose for the toolkit's log",
                ) from e
            if ret not in (0, None) and step != "config":
                built.get("rk", rk).release()
                raise ToolkitError(
                    f"rknn-toolkit2 {step} returned {ret} on {os.path.basename(onnx_path)}",
                    "the segment stays on the CPU; run with --verbose for the toolkit's log",
                )
    return built["rk"]


def _hybrid_steps(rk, RKNN, onnx_path: str, dataset: str, groups, verbose: bool, built: dict):
    """The two calls of a quantised build with the FLOAT_TENSORS ``groups`` kept float16 (in
    place of ``RKNN.build``): hybrid_quantization_step1 writes the quantised graph and its
    quantisation config into the working folder; the second lists the matching tensors as
    float16 in that config (``custom_quantize_layers``) and runs hybrid_quantization_step2 on a
    new RKNN object, which it puts in ``built['rk']``. Both run in the working folder."""
    import onnx

    base = os.path.splitext(os.path.basename(onnx_path))[0]
    pattern = re.compile("|".join(FLOAT_TENSORS[g] for g in groups))

    def step1():
        ret = rk.hybrid_quantization_step1(dataset=dataset)
        rk.release()
        return ret

    def step2():
        graph = onnx.load(base + ".model", load_external_data=False).graph
        names = [o for n in graph.node for o in n.output if pattern.search(o)]
        with open(base + ".quantization.cfg") as f:
            cfg = f.read()
        if "custom_quantize_layers: {}" not in cfg:
            raise ToolkitError("the toolkit's quantisation config has no empty custom_quantize_layers")
        listed = "".join(f"    {n}: float16\n" for n in names)
        with open(base + ".quantization.cfg", "w") as f:
            f.write(cfg.replace("custom_quantize_layers: {}", "custom_quantize_layers:\n" + listed, 1))
        logging.getLogger(__name__).info("%s: %d tensor(s) kept float16", base, len(names))
        built["rk"] = RKNN(verbose=verbose)
        return built["rk"].hybrid_quantization_step2(
            base + ".model", base + ".data", base + ".quantization.cfg"
        )

    return step1, step2


@contextlib.contextmanager
def _working_in(folder: str):
    back = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(back)


def error_line(e: BaseException) -> str:
    """The line of a toolkit exception that says what went wrong. rknn-toolkit2 puts a whole
    traceback in the message of the ValueError it raises; the reason is its last
    ``SomeError: ...`` line (with the lines that continue it)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for k in range(len(lines) - 1, -1, -1):
        if re.match(r"[A-Za-z_][\w.]*(Error|Exception): ", lines[k]):
            return " ".join(lines[k:])[:240]
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__


def _absolute_dataset(dataset: str, folder: str) -> str:
    """A copy of a dataset file whose .npy names are absolute (the toolkit reads them from its
    working directory; the artifact's dataset names them relative to its own folder)."""
    base = os.path.dirname(os.path.abspath(dataset))
    try:
        with open(dataset) as f:
            lines = [" ".join(os.path.join(base, p) for p in ln.split()) for ln in f if ln.strip()]
    except OSError as e:
        raise ToolkitError(
            f"cannot read calibration dataset '{dataset}' ({e.strerror})", "compile the model again"
        ) from e
    path = os.path.join(folder, "dataset.txt")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def dynamic_shapes(onnx_path: str, rows) -> list:
    """rknn-toolkit2 ``dynamic_input`` for a T-row segment: its input shapes with T = each of rows."""
    import onnx

    model = onnx.load(onnx_path, load_external_data=False)
    dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input]
    return [[[t if isinstance(d, str) else d for d in shape] for shape in dims] for t in rows]


def toolkit_installed() -> bool:
    """rknn-toolkit2 is installed (its metadata) and importable here (not hidden or broken)."""
    return bool(toolkit_version()) and has_module("rknn.api")


def require_toolkit() -> str:
    """rknn-toolkit2's version, or a MissingDependency that says how to install it."""
    if not toolkit_installed():
        raise MissingDependency(
            "building .rknn files needs rknn-toolkit2", f"{TOOLKIT_INSTALL}; or compile with --plan-only"
        )
    return toolkit_version()
