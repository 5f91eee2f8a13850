"""The one place that loads and saves ONNX files, writes folders atomically, and cleans up what
killed processes left (``pid_alive``, ``remove_stale``).

``onnx`` is imported lazily: the board reads only the manifest and segment files through
onnxruntime / rknnlite and never needs it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import tempfile
from typing import Iterator, Optional, Tuple

from rwkv2rknn.errors import BadInput, MissingDependency


def _onnx():
    try:
        import onnx
    except ImportError as e:
        raise MissingDependency(
            "this command needs the onnx package", "pip install 'rwkv2rknn[compile]' (or: make install)"
        ) from e
    return onnx


def cache_root(explicit: Optional[str] = None) -> str:
    """The user's rwkv2rknn cache: ``explicit``, else $RWKV2RKNN_CACHE, else
    $XDG_CACHE_HOME/rwkv2rknn (~/.cache/rwkv2rknn)."""
    root = explicit or os.environ.get("RWKV2RKNN_CACHE")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "rwkv2rknn")
    return root


@contextlib.contextmanager
def as_bad_input(problem: str, fix: str, detail: int = 0) -> Iterator[None]:
    """A reader's failure inside the block as one BadInput line: ``problem (ErrorType)``, with
    the first ``detail`` characters of its message when ``detail`` is given."""
    try:
        yield
    except Exception as e:
        said = f": {str(e)[:detail]}" if detail else ""
        raise BadInput(f"{problem} ({type(e).__name__}{said})", fix) from e


def load_onnx(path: str):
    """An ONNX ModelProto, with a one-line error for a missing, truncated or non-ONNX file.
    Weights kept as external data (beside the file) are read in."""
    onnx = _onnx()
    if not os.path.isfile(path):
        raise BadInput(f"'{path}' does not exist", "check the path")
    if os.path.getsize(path) == 0:
        raise BadInput(f"'{path}' is empty", "the file was not written completely; export it again")
    with as_bad_input(
        f"'{path}' is not a readable ONNX model", "the file is truncated or not ONNX; export it again"
    ):
        model = onnx.load(path)
    if len(model.graph.node) == 0:
        raise BadInput(
            f"'{path}' is not a readable ONNX model (no nodes)",
            "the file is truncated or not ONNX; export it again",
        )
    return model


# Tensor bytes above which a model is saved with its weights in a side file (``NAME.onnx.data``):
# one protobuf message cannot pass 2 GB (ONNX's own limit), so every model near it goes external.
EXTERNAL_ABOVE = 1 << 30


def tensor_bytes(model) -> int:
    """Bytes of a model's initializers and Constant tensors, from their shapes and types
    (without serialising or copying them)."""
    from onnx import helper

    def size(t) -> int:
        n = 1
        for d in t.dims:
            n *= int(d)
        try:
            item = helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        except (KeyError, TypeError, ValueError):
            item = 8
        return n * item

    total = sum(size(t) for t in model.graph.initializer)
    for node in model.graph.node:
        total += sum(size(a.t) for a in node.attribute if a.HasField("t"))
    return total


def save_onnx(model, path: str, external_above: Optional[int] = None, keep: bool = True) -> str:
    """Save atomically (write to a temporary name in the same folder, then rename). A model whose
    tensors pass ``external_above`` bytes (default ``EXTERNAL_ABOVE``) keeps them in
    ``PATH.data`` beside it (ONNX external data, read back by ``load_onnx`` and onnxruntime).
    Saving that way empties the model's tensors; ``keep`` reads them back (False: the caller
    is done with the model and would rather not hold it twice). Returns the SHA-256 of the
    bytes written, hashed as they are written (the manifest's checksum without reading the file
    back), or '' for a model saved with external data."""
    _onnx()  # the missing package said before anything is written
    limit = EXTERNAL_ABOVE if external_above is None else external_above
    tmp = f"{path}.tmp{os.getpid()}"
    data = path + ".data"
    digest = ""
    try:
        if tensor_bytes(model) > limit:
            remove_quietly(data)  # onnx appends to an existing data file
            _save_external(model, tmp, data)
            if keep:
                from onnx.external_data_helper import load_external_data_for_model

                load_external_data_for_model(model, os.path.dirname(os.path.abspath(path)))
        else:
            remove_quietly(data)
            import hashlib

            blob = model.SerializeToString()  # what onnx.save writes
            digest = hashlib.sha256(blob).hexdigest()
            with open(tmp, "wb") as f:
                f.write(blob)
            del blob
        os.replace(tmp, path)
    finally:
        remove_quietly(tmp)
    return digest


def model_bytes(model) -> bytes:
    return model.SerializeToString()


def write_text(path: str, text: str) -> None:
    """Write atomically: a temporary name in the same folder, renamed into place when whole."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str, data) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: str, what: str = "file", fix: str = "compile the model again"):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError as e:
        raise BadInput(f"{what} '{path}' is missing", fix) from e
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise BadInput(f"{what} '{path}' is corrupt ({type(e).__name__})", fix) from e


MODEL_JSON = "rwkv2rknn-model.json"  # what the exporter (models.export) writes beside its files


def model_facts(path: str) -> dict:
    """What our exporter recorded beside a folder of per-layer files (arch, shape, dtype,
    tokenizer, state rows); {} for a single file or a folder without a readable record (public
    per-layer folders have none)."""
    meta = os.path.join(path, MODEL_JSON) if os.path.isdir(path) else ""
    if meta and os.path.exists(meta):
        try:
            facts = read_json(meta, "model description")
        except Exception:  # noqa: BLE001 - optional extra facts only
            return {}
        return facts if isinstance(facts, dict) else {}
    return {}


def check_out_dir(final: str, marker: str, force: bool = False) -> None:
    """Refuse an output folder ``atomic_dir`` would refuse: one that is not a folder, or holds
    other files (no ``marker`` of an earlier output) without ``force``. Commands call it before
    any work, so a long job does not fail at its end."""
    if os.path.exists(final):
        if not os.path.isdir(final):
            raise BadInput(f"'{final}' exists and is not a folder", "choose another output path")
        if os.listdir(final) and not os.path.exists(os.path.join(final, marker)) and not force:
            raise BadInput(
                f"output folder '{final}' holds other files",
                "choose an empty or new folder, or pass --force to replace it",
            )


@contextlib.contextmanager
def atomic_dir(final: str, marker: str, force: bool = False) -> Iterator[str]:
    """Yield a temporary folder beside ``final``; move it into place only if the body succeeds.

    ``final`` may be missing, empty, or an earlier output of ours (it holds ``marker``), which is
    replaced only once the new one is whole. Any other non-empty folder is refused unless
    ``force``. On any error or interruption the temporary folder is removed and ``final`` is
    left as it was; one left by a process that was killed (``.NAME.partial-PID-*``, PID no longer
    running) is removed by the next call for the same ``final``.
    """
    final = os.path.abspath(final)
    _restore_interrupted(final)
    check_out_dir(final, marker, force)
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    prefix = f".{os.path.basename(final)}.partial-"
    remove_stale(parent, prefix, at_start=True)
    # Named before it exists and made inside the try: an interrupt that lands the moment the
    # folder exists (a Ctrl-C right as the compile starts) still reaches the cleanup below.
    tmp = os.path.join(parent, f"{prefix}{os.getpid()}-{secrets.token_hex(4)}")
    try:
        os.mkdir(tmp)  # the usual mode (0o777 less the umask), like the output it becomes
        yield tmp
        if os.path.exists(final):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.old-{os.getpid()}-", dir=parent)
            os.replace(final, os.path.join(old, "x"))
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def _restore_interrupted(final: str) -> None:
    """Replacing an output is two renames (old aside, new in). A process killed between them
    leaves ``final`` missing and the old output in ``.NAME.old-PID-*/x``: put it back. Old
    copies of dead processes that are no longer needed are removed."""
    parent, base = os.path.dirname(final), os.path.basename(final)
    prefix = f".{base}.old-"
    try:
        names = sorted(n for n in os.listdir(parent) if n.startswith(prefix))
    except OSError:
        return
    for name in names:
        pid = name[len(prefix) :].split("-", 1)[0]
        if not pid.isdigit() or pid_alive(int(pid)):
            continue
        kept = os.path.join(parent, name, "x")
        if not os.path.exists(final) and os.path.isdir(kept):
            os.replace(kept, final)
        shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def pid_alive(pid: int) -> bool:
    """Does process ``pid`` still run (ours or another user's)?"""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, not ours
        return True
    return True


def remove_stale(folder: str, marker: str, at_start: bool = False) -> None:
    """Remove files and folders in ``folder`` named ``...MARKER<pid>`` or ``...MARKER<pid>-...``
    (``MARKER<pid>...`` with ``at_start``) whose pid no longer runs: what a killed process left.
    Those of running processes are left alone."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        if at_start:
            sep, tail = name.startswith(marker), name[len(marker) :]
        else:
            _, sep, tail = name.rpartition(marker)
        pid = tail.split("-", 1)[0]
        if sep and pid.isdigit() and not pid_alive(int(pid)):
            path = os.path.join(folder, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                remove_quietly(path)


# Private temporary folders (in $TMPDIR) are named rwkv2rknn-KIND-PID-*: each is removed by the
# process that made it (on success, on an error, on Ctrl-C or SIGTERM); one left by a process that
# was killed outright (SIGKILL, or the toolkit ending its own process) is removed by the next
# compile (``remove_stale_scratch``).
SCRATCH_KINDS = ("build", "worker", "ds", "rwkvpkg", "bench", "columns", "ortshare")


def scratch_prefix(kind: str) -> str:
    """The name prefix of a private temporary folder of ``kind`` (one of SCRATCH_KINDS) made by
    this process, for ``tempfile.mkdtemp`` / ``TemporaryDirectory``."""
    return f"rwkv2rknn-{kind}-{os.getpid()}-"


def remove_stale_scratch(folder: str = "") -> None:
    """Remove the private temporary folders in ``folder`` (default: the system's temporary
    folder) whose process no longer runs."""
    folder = folder or tempfile.gettempdir()
    for kind in SCRATCH_KINDS:
        remove_stale(folder, f"rwkv2rknn-{kind}-", at_start=True)


def end_kept_child(proc, log, folder: str, timeout: float = 5.0) -> None:
    """End a child process that serves requests read from its stdin: close its stdin (it ends
    by itself), kill it if it has not ended within ``timeout`` s; then close its ``log`` file
    and remove its private temporary ``folder``."""
    import subprocess

    if proc.poll() is None:
        try:
            proc.stdin.close()
            proc.wait(timeout=timeout)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()
    for f in (proc.stdout, log):
        if f is not None:
            f.close()
    shutil.rmtree(folder, ignore_errors=True)


def remove_quietly(path: str) -> None:
    """Remove a file if it is there."""
    try:
        os.unlink(path)
    except OSError:
        pass


def partial_folder(path: str, force: bool = False) -> Tuple[str, str]:
    """(absolute path, a new temporary folder beside it) for an ONNX file about to be written
    under a temporary name and renamed into place; refuses a folder, or an existing file
    without ``force``. The caller removes the temporary folder."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        raise BadInput(f"'{path}' is a folder", "give a file name ending in .onnx")
    if os.path.exists(path) and not force:
        raise BadInput(f"'{path}' exists", "choose another name, or pass --force to replace it")
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    return path, tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.partial-{os.getpid()}-", dir=folder)


def _save_external(model, path: str, data: str) -> None:
    """Save ``model`` as ``path`` with every weight above 1 KiB in the one file ``data`` beside it."""
    _onnx().save_model(
        model,
        path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=os.path.basename(data),
        size_threshold=1024,
    )


def save_onnx_file(model, path: str, external: bool = False, force: bool = False) -> None:
    """Save a model as ``path`` (with ``external``: its weights in ``PATH.data`` beside it),
    written under temporary names and renamed into place, so a failed or interrupted save
    leaves nothing half-written. An existing file is replaced only with ``force``."""
    onnx = _onnx()
    path, tmp = partial_folder(path, force)
    data = path + ".data"
    try:
        tmp_path = os.path.join(tmp, os.path.basename(path))
        if external:
            _save_external(model, tmp_path, data)
            os.replace(tmp_path + ".data", data)
        else:
            onnx.save_model(model, tmp_path)
            if os.path.exists(data) and force:
                os.unlink(data)  # an older export's weights, no longer read
        os.replace(tmp_path, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
