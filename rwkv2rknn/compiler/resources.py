"""Memory and disk a compile needs, estimated from the model's file sizes before any work starts.

A compile that would run out of memory is killed by the kernel (or segfaults inside protobuf or
onnxruntime) with no word; one that runs out of disk fails half way. Both are refused up front
in one line that says what is needed, what is free, and what to do. The figures are estimates
with headroom, measured on RWKV-4 models (see ``bench/compile_size.py``).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from dataclasses import dataclass
from typing import Iterable

from rwkv2rknn.errors import ResourceError

log = logging.getLogger(__name__)

GB = 1024**3
# one rknn-toolkit2 build child (a T-row build, 2 to 4 row counts): the toolkit's own footprint,
# plus a multiple of the segment ONNX (measured peak RSS, width 1024: 0.47 GiB for a 12.6 MB
# segment, 0.79 GiB for a 55 MB layer, 2.44 GiB for the 248 MB last layer with the head)
BUILD_BASE = int(0.35 * GB)
BUILD_PER_BYTE = 9
# the compile process: the interpreter with onnx, onnxruntime and onnx-graphsurgeon loaded
PROCESS_BASE = int(0.6 * GB)


@dataclass(frozen=True)
class ModelSize:
    total: int  # fp32 bytes of every weight (the files' bytes, doubled for fp16 files)
    largest: int  # fp32 bytes of the largest single file (a layer, the embedding or the head)
    files: int


def model_size(path: str) -> ModelSize:
    """Weight bytes of a per-layer folder (or one .onnx), as fp32, from the file sizes.
    External data files (``*.data``, ``*.onnx_data``, ...) count with their model."""
    if os.path.isdir(path):
        names = [os.path.join(path, n) for n in sorted(os.listdir(path))]
        names = [n for n in names if os.path.isfile(n) and not n.endswith((".json", ".txt"))]
    else:
        from rwkv2rknn.compiler import split

        one = split.stage_layout(path)
        if one is not None:  # compiled stage by stage like a folder (compiler/split.py)
            scale = 2 if one.metadata.get("rwkv2rknn.dtype", "float16") != "float32" else 1
            per = one.stage_bytes()
            return ModelSize(sum(per.values()) * scale, max(per.values(), default=0) * scale, len(per))
        names = [path]
    scale = 2 if _fp16(path) else 1
    sizes = [os.path.getsize(n) * scale for n in names]
    return ModelSize(sum(sizes), max(sizes, default=0), len(sizes))


def _fp16(path: str) -> bool:
    from rwkv2rknn.fileio import model_facts

    dtype = model_facts(path).get("dtype")
    return dtype in ("fp16", "float16") if dtype else True  # unknown: assume the larger need


def give_back_memory() -> None:
    """Return freed heap to the system (glibc keeps it otherwise): a streaming compile frees a
    stage's weights before it loads the next one, and the build children need the room."""
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


# glibc's allocator backs its heap with transparent huge pages (the glibc.malloc.hugetlb tunable,
# glibc 2.35 and later; other C libraries ignore it). A compile copies weights many times: with
# 4 KB pages its process made 5.2 million page faults and a 1024-wide layer's toolkit build 1.9
# million, with more than half of the CPU time in the kernel; with huge pages 0.3 million and
# 0.08 million, a quarter to a third less CPU, the same peak memory (430M --plan-only compile;
# bench/build_profile.py on one layer)
HUGE_PAGES = "glibc.malloc.hugetlb=1"


def huge_page_env(env: dict) -> dict:
    """``env`` with ``HUGE_PAGES`` added to GLIBC_TUNABLES, unless it says how to use huge
    pages already (the setting is read when a process starts: children get it this way)."""
    tunables = env.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" not in tunables:
        env = dict(env, GLIBC_TUNABLES=f"{tunables}:{HUGE_PAGES}" if tunables else HUGE_PAGES)
    return env


def memory_available() -> int:
    """Bytes of memory available to new work (MemAvailable), or a large number if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 1 << 50


def disk_free(path: str) -> int:
    """Free bytes on the file system that holds ``path`` (or its nearest existing parent)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return shutil.disk_usage(path).free


def build_memory(onnx_bytes: int) -> int:
    return BUILD_BASE + BUILD_PER_BYTE * onnx_bytes


def build_jobs(biggest_onnx: int, n: int) -> int:
    """Builds to run side by side: one per core, as far as the available memory allows."""
    fit = int(memory_available() * 0.8) // max(build_memory(biggest_onnx), 1)
    return max(1, min(os.cpu_count() or 1, n, fit))


def compile_memory(size: ModelSize, plan_only: bool, stream: bool = True) -> int:
    """Estimated peak of the compile's process tree. Streaming (a per-layer folder): a window of
    about two stages, the stage being passed and its trace session (a few times the largest
    file as fp32; measured 1.7 GiB for a 1024-wide model of any depth); a one-file model in our
    exporter's layout streams the same way after it is split (one stage in memory). The whole-graph compile
    holds the graph, its fp32 weights, the range trace's session and the cut segments (about 6x
    the fp32 weights, measured at 430M). One build child beside it."""
    need = PROCESS_BASE + (8 * size.largest if stream else 6 * size.total)
    if not plan_only:
        need += build_memory(size.largest)
    return need


RKNN_OVERHEAD = 4 << 20  # a .rknn and its T-row build hold about this much besides the weights


def artifact_bytes(size: ModelSize, plan_only: bool) -> int:
    """Segment ONNX (fp32) and their T-row variants hold the weights twice; the .rknn builds
    (fp16, per-token and T-row) once more, plus a few MB each (one NPU segment per layer)."""
    if plan_only:
        return int(2.05 * size.total)
    return int(3.05 * size.total) + RKNN_OVERHEAD * max(size.files - 1, 1)


def _gb(n: int) -> str:
    return f"{n / GB:.1f} GB" if n >= GB / 10 else f"{n / 2**20:.1f} MB"


def check_compile(
    model_path: str, out_dir: str, cache_dir: str, plan_only: bool, stream: bool = True
) -> ModelSize:
    """Refuse (ResourceError, one line) a compile that would not fit in memory or on disk."""
    size = model_size(model_path)
    need, free = compile_memory(size, plan_only, stream), memory_available()
    log.info(
        "estimated need: %s of memory (%s available), model %s as fp32", _gb(need), _gb(free), _gb(size.total)
    )
    if need > free:
        raise ResourceError(
            f"compiling this model needs about {_gb(need)} of memory and {_gb(free)} is available",
            "close other programs or run fewer compiles at once, try --plan-only, or use a machine "
            "with more memory",
        )
    checks = [(os.path.dirname(os.path.abspath(out_dir)), artifact_bytes(size, plan_only), "the artifact")]
    if stream and os.path.isfile(model_path):  # a one-file model split into stage files first
        checks.append((os.path.dirname(os.path.abspath(out_dir)), size.total, "its stage files"))
    if not plan_only:
        checks.append(
            (
                os.path.abspath(cache_dir),
                size.total + RKNN_OVERHEAD * max(size.files - 1, 1),
                "the build cache",
            )
        )
    _check_disk(checks)
    return size


def _check_disk(checks: Iterable) -> None:
    """Sum the needs of folders on one file system and compare with its free space."""
    by_dev = {}
    for folder, need, what in checks:
        probe = folder
        while not os.path.exists(probe):
            probe = os.path.dirname(probe)
        dev = os.stat(probe).st_dev
        old = by_dev.get(dev, (folder, 0, []))
        by_dev[dev] = (old[0], old[1] + need, old[2] + [what])
    for folder, need, whats in by_dev.values():
        free = disk_free(folder)
        if need > free:
            raise ResourceError(
                f"{' and '.join(whats)} {'need' if len(whats) > 1 else 'needs'} about {_gb(need)} "
                f"of disk in {folder} and {_gb(free)} is free",
                "free some space there or write elsewhere (-o, --cache-dir)",
            )


def disk_full(e: BaseException, where: str, size: ModelSize) -> ResourceError:
    """A ResourceError for an ENOSPC met while writing (the estimate was too low)."""
    return ResourceError(
        f"the disk holding {where} ran full while writing the compile "
        f"(the artifact needs about {_gb(artifact_bytes(size, False))})",
        "free some space there or write the artifact elsewhere (-o)",
    )


def is_disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


def tree_rss(pid: int = 0) -> int:
    """Resident bytes of a process (default: this one) and all its children, now."""
    import psutil

    try:
        proc = psutil.Process(pid or os.getpid())
        tree = [proc] + proc.children(recursive=True)
    except psutil.Error:  # it just ended
        return 0
    total = 0
    for p in tree:
        try:
            total += p.memory_info().rss
        except psutil.Error:  # a child that just ended
            pass
    return total


class PeakRss:
    """Peak resident memory of this process tree, overall and per phase (``mark(name)`` starts a
    phase); use as a context manager. A thread samples ``tree_rss`` every ``every`` seconds (it
    sees the children); this process's own exact peak (``ru_maxrss``, which a sampling thread
    misses while a long C call holds the GIL) is read at every mark and counts for the phase in
    which it rose."""

    def __init__(self, every: float = 0.2):
        import threading

        self.every, self.peak, self.phases, self._phase = every, 0, {}, "start"
        self._self_peak = self._own_peak()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _own_peak() -> int:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux

    def _note(self, rss: int) -> None:
        self.peak = max(self.peak, rss)
        self.phases[self._phase] = max(self.phases.get(self._phase, 0), rss)

    def _sample(self) -> None:
        self._note(tree_rss())

    def _close_phase(self) -> None:
        own = self._own_peak()
        if own > self._self_peak:
            self._self_peak = own
            self._note(own)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._sample()

    def mark(self, phase: str) -> None:
        self._sample()
        self._close_phase()
        self._phase = phase
        self._sample()

    def __enter__(self) -> "PeakRss":
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self._close_phase()
