"""What the board has and what an artifact needs from it: librknnrt (where, which version), the
NPU driver's version, the SoC's NPU cores, free memory, and the artifact's memory need.

Every reader takes ``root`` (default ``/``) so tests can point it at a fake sysfs tree. Nothing
here needs a board: a missing file reads as "unknown".
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from typing import Dict, List, Optional, Tuple

from rwkv2rknn.errors import BadInput

log = logging.getLogger(__name__)

LIBRKNNRT_ENV = "RWKV2RKNN_LIBRKNNRT"
LIBRKNNRT_PATHS = (
    "usr/lib/librknnrt.so",
    "usr/lib64/librknnrt.so",
    "usr/local/lib/librknnrt.so",
    "usr/lib/aarch64-linux-gnu/librknnrt.so",
)
# The newest librknnrt Rockchip publishes (checked 2026-12): 2.3.2, in its rknn-toolkit2 repository
# on GitHub (the same file is in rknn_model_zoo 2.3.2 and rknn-llm 1.3.0). The package registry's
# rknn-toolkit2 and rknn-toolkit-lite2 go to 2.5.0, but no 2.5.0 librknnrt is published and the
# lite2 wheels bundle none (they send users to that repository). rknn-toolkit2 2.3.2 and 2.5.0
# both write RKNN format version 6, the version that runtime reads; librknnrt 1.x refuses it.
NEWEST_PUBLIC_RUNTIME = "2.3.2"
RUNTIME_FORMAT = 6  # the RKNN file format version rknn-toolkit2 2.3.x-2.5.0 write
LIBRKNNRT_URL = (
    "https://github.com/airockchip/rknn-toolkit2/raw/master/"
    "rknpu2/runtime/Linux/librknn_api/aarch64/librknnrt.so"
)
LIBRKNNRT_INSTALL = (
    f"download librknnrt.so {NEWEST_PUBLIC_RUNTIME} (the newest Rockchip publishes) from "
    f"{LIBRKNNRT_URL} to /usr/lib/, or point ${LIBRKNNRT_ENV} at it"
)
# debugfs (root only) on Rockchip's vendor kernels; the module's own version where it is a module
DRIVER_VERSION_PATHS = ("sys/kernel/debug/rknpu/version", "sys/module/rknpu/version")
DRIVER_NODES = ("dev/rknpu", "sys/kernel/debug/rknpu", "sys/module/rknpu", "sys/class/misc/rknpu")
# what librknnrt opens: the misc device of older vendor kernels, the DRM render node of newer ones
# (renderD129 on RK3588, after the GPU's renderD128), and the driver's debugfs
DEVICE_NODES = ("dev/rknpu", "dev/dri/renderD129", "sys/kernel/debug/rknpu")
DMESG = "`sudo dmesg | grep -i rknpu` says whether the driver probed"
NPU_CORES = {"rk3588": 3, "rk3576": 2, "rk356x": 1, "rk3566": 1, "rk3568": 1, "rk3562": 1}
# how librknnrt states its version (its startup log and rknn_query's api_version):
# "2.3.0 (c949ad889d@2024-11-07T11:35:33)" and, in newer builds, "2.5.0 (620b20d build@2025-...)"
_LIB_VERSION = re.compile(rb"(\d+\.\d+\.\d+)(?:b\d+)? \([0-9a-f]{6,}(?:@| build@)\d{4}-\d\d-\d\dT")


def _at(root: str, rel: str) -> str:
    return os.path.join(root, rel)


def _read(path: str, limit: int = 4096) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(limit).decode("ascii", "replace")
    except OSError:
        return ""


def parse_version(text: str) -> Tuple[int, ...]:
    """(2, 5, 0) from '2.5.0', 'v2.5.0', '2.5.0b1 (abc@...)'; () if there is none."""
    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text or "")
    return tuple(int(g) for g in m.groups(default="0")) if m else ()


def librknnrt_path(root: str = "/", environ=None) -> str:
    """The librknnrt.so this machine would load: ``$RWKV2RKNN_LIBRKNNRT`` or the usual places."""
    env = (os.environ if environ is None else environ).get(LIBRKNNRT_ENV, "")
    if env:
        return env
    return next((_at(root, p) for p in LIBRKNNRT_PATHS if os.path.isfile(_at(root, p))), "")


def librknnrt_missing(root: str = "/", environ=None) -> str:
    """Why no librknnrt.so can be loaded from where it is looked for ('' when a file is there):
    ``$RWKV2RKNN_LIBRKNNRT`` naming no file, or none of the usual places holding one."""
    env = (os.environ if environ is None else environ).get(LIBRKNNRT_ENV, "")
    if env:
        return "" if os.path.isfile(env) else f"${LIBRKNNRT_ENV} names {env}, which does not exist"
    if librknnrt_path(root, environ):
        return ""
    return (
        "librknnrt.so not found (looked in $"
        + LIBRKNNRT_ENV
        + ", "
        + ", ".join("/" + p for p in LIBRKNNRT_PATHS)
        + ")"
    )


def version_in(text: str) -> str:
    """The librknnrt version in a text ('2.5.0' from '2.5.0 (620b20d build@2025-...)'), or ''."""
    m = _LIB_VERSION.search(text.encode(errors="replace")) or re.search(
        rb"^\s*v?(\d+\.\d+\.\d+)", text.encode(errors="replace")
    )
    return m.group(1).decode() if m else ""


def librknnrt_version(path: str) -> str:
    """The version string a librknnrt.so carries ('2.3.0'), or '' if it cannot be read."""
    try:
        with open(path, "rb") as f:
            m = _LIB_VERSION.search(f.read())
    except OSError:
        return ""
    return m.group(1).decode() if m else ""


def older(have: str, need: str) -> bool:
    """``have`` is a known version older than the known version ``need``."""
    a, b = parse_version(have), parse_version(need)
    return bool(a and b) and a < b


def runtime_wanted(toolkit: str) -> str:
    """The librknnrt a board should have for files built by rknn-toolkit2 ``toolkit``: that
    version, or the newest one published where the toolkit is newer than any published runtime."""
    return NEWEST_PUBLIC_RUNTIME if older(NEWEST_PUBLIC_RUNTIME, toolkit) else toolkit


def runtime_too_old(have: str, toolkit: str) -> bool:
    """``have`` (a librknnrt version) is older than what the files need and than what can be had."""
    return older(have, runtime_wanted(toolkit))


def runtime_hint(lib_path: str, toolkit: str) -> str:
    """Why the board's runtime likely refused a .rknn, and the fix."""
    have = librknnrt_version(lib_path) if lib_path else ""
    need = toolkit or "the toolkit version in manifest.json"
    if runtime_too_old(have, toolkit):
        return (
            f"this board's librknnrt is {have}, older than rknn-toolkit2 {toolkit} that built "
            f"the files: {LIBRKNNRT_INSTALL}"
        )
    return (
        f"the likeliest cause is a librknnrt.so older than rknn-toolkit2 {need} that built the "
        f"files (this board's: {have or 'version unknown'}; `rwkv2rknn doctor` checks it), "
        f"else the files were compiled for another --target"
    )


def npu_driver_version(root: str = "/") -> str:
    """The RKNPU driver's version ('0.9.8'), '' if no readable source has it."""
    for rel in DRIVER_VERSION_PATHS:
        text = _read(_at(root, rel))
        if parse_version(text):
            return ".".join(map(str, parse_version(text)))
    return ""


def npu_driver_present(root: str = "/") -> bool:
    return any(os.path.exists(_at(root, p)) for p in DRIVER_NODES + DRIVER_VERSION_PATHS)


def npu_device_present(root: str = "/") -> bool:
    """A node librknnrt opens to reach the NPU exists (/dev/rknpu, /dev/dri/renderD129) or the
    driver's debugfs does."""
    return any(os.path.exists(_at(root, p)) for p in DEVICE_NODES)


NO_DRIVER_FIX = (
    "boot a kernel with Rockchip's RKNPU driver (the board vendor's image, or a "
    f"vendor-kernel Armbian/Ubuntu image); {DMESG}"
)


def diagnose_init(
    ret: int, messages, lib_path: str, toolkit: str, target: str = "", root: str = "/"
) -> Tuple[str, str]:
    """(cause, fix) of a refused ``rknn_init`` from what the runtime said (its ``E RKNN:``
    lines), its return code and what this machine has: no NPU driver, a runtime older than the
    files, a file for another target, else the likeliest of those."""
    said = " ".join(messages).lower()
    have = librknnrt_version(lib_path) if lib_path else ""
    lib = f"librknnrt {have}" if have else "this librknnrt"
    upgrade = LIBRKNNRT_INSTALL
    if "rknpu" in said and ("open" in said or "insmod" in said) or "device" in said and "open" in said:
        return "no NPU driver: the runtime cannot open the RKNPU device", NO_DRIVER_FIX
    if "model version" in said or "invalid rknn model" in said or "rknn_api version" in said:
        if have and not older(have, NEWEST_PUBLIC_RUNTIME):  # no newer runtime to be had
            upgrade = (
                f"compile the model again with rknn-toolkit2 {have}, this runtime's version "
                f"(`pip install --no-deps rknn-toolkit2=={have}` on the compile machine)"
            )
        return (f"{lib} is too old for these files (built by rknn-toolkit2 {toolkit or '?'})", upgrade)
    if ret == -13 or "target platform" in said or "platform" in said and "mismatch" in said:
        return (
            "the files were compiled for another SoC" + (f" ({target})" if target else ""),
            "compile the model again with --target for this board (`rwkv2rknn doctor` names it)",
        )
    if not npu_device_present(root):
        return (
            "no NPU driver: none of /dev/rknpu, /dev/dri/renderD129, /sys/kernel/debug/rknpu exists",
            NO_DRIVER_FIX,
        )
    if runtime_too_old(have, toolkit):
        return f"{lib} is older than rknn-toolkit2 {toolkit} that built the files", upgrade
    return ("the runtime refused the file", runtime_hint(lib_path, toolkit))


def mem_available(root: str = "/") -> int:
    """MemAvailable from /proc/meminfo in bytes; -1 if unknown."""
    m = re.search(r"^MemAvailable:\s+(\d+)\s*kB", _read(_at(root, "proc/meminfo"), 1 << 16), re.M)
    return int(m.group(1)) * 1024 if m else -1


def _size(artifact: str, rel: Optional[str]) -> int:
    path = os.path.join(artifact, rel) if rel else ""
    return os.path.getsize(path) if path and os.path.isfile(path) else 0


def memory_need(manifest, artifact: str, backend: str = "rknn-rt") -> Dict[str, int]:
    """Bytes the board holds to run ``artifact``: the weights it loads (each NPU segment's .rknn
    and its T-row .seq.rknn, each CPU segment's ONNX), the float32 activations every bound
    input and output takes (T-row ones at the largest row count) and the recurrent state. Not
    counted: librknnrt's own internal buffers and onnxruntime's arenas (hence the margin in
    ``require_memory``)."""
    weights = acts = 0
    for seg in manifest.segments:
        per_token = sum(_elems(seg.shapes.get(k)) for k in tuple(seg.inputs) + tuple(seg.outputs))
        if seg.backend == "npu" and backend != "ort":
            weights += _size(artifact, seg.token.rknn) + (
                _size(artifact, seg.seq.rknn) if seg.seq.rknn != seg.token.rknn else 0
            )
        else:
            weights += _size(artifact, seg.token.onnx) + _size(artifact, seg.seq.onnx)
        acts += 4 * per_token * (1 + max(seg.seq.rows or (0,)))
    width = int(manifest.model.get("width") or 0)
    state = 4 * len(manifest.state) * width
    domains = len(domain_bytes(manifest, artifact)) if backend != "ort" else 0
    return {
        "weights": weights,
        "activations": acts,
        "state": state,
        "total": weights + acts + state,
        "npu_domains": domains,
    }


IOMMU_DOMAIN_BYTES = 4 << 30  # the RK3588 NPU maps memory in IOMMU domains of 4 GiB
# Why a model past one domain does not load: Rockchip's public rknn_api.h (2.3.2, the newest
# librknnrt published) gives rknn_init no way to choose a domain (rknn_init_extend holds ctx,
# real_model_offset, real_model_size, model_buffer_fd, model_buffer_flags and reserved bytes);
# only the matmul API (rknn_matmul_info.iommu_domain_id) and RKLLM (base_domain_id) have one.
NO_DOMAIN_CHOICE = (
    "librknnrt's rknn_init cannot place a context in another IOMMU domain (Rockchip's "
    "rknn_api.h 2.3.2 has no domain field for it), so every context shares domain 0"
)


def npu_weight_bytes(manifest, artifact: str) -> int:
    """Bytes of the .rknn files the NPU contexts load (each file once)."""
    files = {f for s in manifest.segments if s.backend == "npu" for f in (s.token.rknn, s.seq.rknn) if f}
    return sum(_size(artifact, f) for f in files)


def iommu_domains(manifest, artifact: str, domain_bytes: Optional[int] = None) -> Dict[str, int]:
    """The IOMMU domain each NPU context (one per .rknn file) would need so that no domain holds
    more than ``domain_bytes`` (4 GiB) of weights: greedy, the largest file first, each into the
    first domain with room (a file larger than a domain gets one of its own). Domain 0 holds
    everything when the weights fit in one domain."""
    limit = domain_bytes or IOMMU_DOMAIN_BYTES
    files = sorted(
        {f for s in manifest.segments if s.backend == "npu" for f in (s.token.rknn, s.seq.rknn) if f},
        key=lambda f: (-_size(artifact, f), f),
    )
    used: List[int] = []
    out: Dict[str, int] = {}
    for f in files:
        size = _size(artifact, f)
        d = next((i for i, u in enumerate(used) if u + size <= limit), len(used))
        if d == len(used):
            used.append(0)
        used[d] += size
        out[f] = d
    return out


def domain_bytes(manifest, artifact: str, domains: Optional[Dict[str, int]] = None) -> List[int]:
    """Weight bytes per IOMMU domain of a placement (``iommu_domains`` by default)."""
    domains = iommu_domains(manifest, artifact) if domains is None else domains
    out = [0] * (max(domains.values()) + 1 if domains else 0)
    for f, d in domains.items():
        out[d] += _size(artifact, f)
    return out


def _elems(shape) -> int:
    n = 1
    for d in shape or ():
        n *= int(d) if isinstance(d, int) and d > 0 else 1
    return n


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def describe_need(need: Dict[str, int]) -> str:
    text = (
        f"about {gib(need['total'])} (weights {gib(need['weights'])}, activations "
        f"{gib(need['activations'])}, state {gib(need['state'])})"
    )
    if need.get("npu_domains", 0) > 1:
        text += (
            f"; its NPU weights need {need['npu_domains']} IOMMU domains of 4 GiB, which "
            f"librknnrt cannot give (`rwkv2rknn doctor`)"
        )
    return text


def require_memory(need: Dict[str, int], root: str = "/", margin: float = 1.1) -> None:
    """A one-line BadInput when MemAvailable is below the artifact's need (with a margin)."""
    have = mem_available(root)
    if have >= 0 and have < need["total"] * margin:
        raise BadInput(
            f"the board has {gib(have)} free (MemAvailable), this model needs about "
            f"{gib(need['total'])} (weights {gib(need['weights'])})",
            "close other programs, or pack a smaller model (`rwkv2rknn doctor ARTIFACT`)",
        )


def board_preflight(artifact: str, m, backend: str) -> None:
    """Before loading on the board: the SoC matches the target, enough memory is free, and the
    runtime is not older than the toolkit that built the files (a warning: it may still load)."""
    from rwkv2rknn.runtime import soc as socs

    soc = socs.board_soc()
    if soc and not socs.same_npu(soc, m.target):
        raise BadInput(
            f"'{artifact}' was compiled for {m.target or 'an unknown target'}, but this board is {soc}",
            f"compile it again with --target {soc}",
        )
    if not soc and m.target != "rk3588":
        log.warning("artifact was compiled for %s", m.target)
    need = memory_need(m, artifact, backend)
    require_memory(need)
    if need["npu_domains"] > 1:
        log.warning(
            "the NPU weights need %d IOMMU domains of 4 GiB; %s: loading is expected to fail "
            "(`rwkv2rknn doctor %s`)",
            need["npu_domains"],
            NO_DOMAIN_CHOICE,
            artifact,
        )
    have = librknnrt_version(librknnrt_path())
    if runtime_too_old(have, m.toolkit):
        log.warning(
            "librknnrt %s is older than rknn-toolkit2 %s that built the files; if loading fails: %s",
            have,
            m.toolkit,
            LIBRKNNRT_INSTALL,
        )


@contextlib.contextmanager
def native_output(lines: List[str]):
    """Catch what a native runtime writes to the process's stdout and stderr (librknnrt's
    ``I RKNN:`` / ``E RKNN:`` lines, RKNNLite's own log and traceback) into ``lines``, so it can
    be read and reported in one line instead of reaching the user's terminal."""
    import ctypes
    import io as _io
    import sys
    import tempfile

    def flush():
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - a closed or odd stream: nothing to flush
                pass
        try:
            ctypes.CDLL(None).fflush(None)  # C stdio buffers of the native code
        except (OSError, AttributeError):
            pass

    py_out, py_err = _io.StringIO(), _io.StringIO()
    flush()
    with tempfile.TemporaryFile() as tmp:
        saved = []
        try:
            saved = [os.dup(1), os.dup(2)]
            os.dup2(tmp.fileno(), 1)
            os.dup2(tmp.fileno(), 2)
        except OSError:  # no such descriptors (an embedded interpreter): catch Python's only
            for fd in saved:
                os.close(fd)
            saved = []
        try:
            with contextlib.redirect_stdout(py_out), contextlib.redirect_stderr(py_err):
                yield lines
        finally:
            flush()
            for fd, old in zip((1, 2), saved):
                os.dup2(old, fd)
                os.close(old)
            tmp.seek(0)
            text = tmp.read().decode("utf-8", "replace") + py_out.getvalue() + py_err.getvalue()
            lines.extend(x.rstrip() for x in text.splitlines() if x.strip())


def runtime_errors(lines: List[str]) -> List[str]:
    """The error lines among a runtime's output ('E RKNN: ...', RKNNLite's 'E ...')."""
    return [x.strip() for x in lines if re.match(r"\s*(E RKNN:|E \w|\[E\]|ERROR)", x)]
