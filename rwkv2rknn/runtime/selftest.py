"""The self-test: every NPU segment run on the chosen runner against its golden vectors
(rwkv2rknn.compiler.golden), so a wrong layout, a wrong io path, an fp16 overflow on the real NPU or a
runtime that does not match the files is caught before the user reads what it computes.

Each check feeds a segment's recorded inputs and compares every output with the recorded fp32
onnxruntime output: cosine similarity and the largest error relative to the output's largest
value, against the tolerance of the segment's precision (a quantised build's own held-out
accuracy widens it). A T-row build is checked at every row count it was built for.

On ``rknn-rt`` with ``--rknn-io auto`` each segment is checked on both io paths (copy and
zero-copy) and the fastest that passes is chosen. The verdict (and those choices) is recorded in
``ARTIFACT/selftest.json`` keyed by the runtime (its version and the library file's checksum, the
NPU driver's version), so the first ``run`` on a board tests once and later runs read it.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import logging
import os
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from rwkv2rknn.errors import BadInput, NumericalError

log = logging.getLogger(__name__)

VERDICT_FILE = "selftest.json"
# (smallest cosine about the mean, largest error relative to the output's largest |value|)
TOLERANCE = {"fp16": (0.999, 0.05), "w16a16i": (0.999, 0.05), "w8a8": (0.98, 0.25)}
REPEAT = 3  # runs per check; the fastest is its time


@dataclasses.dataclass
class Check:
    segment: str
    shape: str  # 'token' or 'N rows'
    io: str  # rknn-rt's io path ('' for other runners)
    ok: bool
    cos: float
    rel: float
    output: str  # the worst output
    want: tuple  # (min cos, max rel) of the precision
    ms: float

    def line(self) -> str:
        where = f"{self.segment} ({self.shape}{', ' + self.io if self.io else ''})"
        got = f"cos {self.cos:.5f}, rel err {self.rel:.3g}"
        if self.ok:
            return f"ok   {where}: {got}, {self.ms:.2f} ms"
        return (
            f"FAIL {where}: output '{self.output}' {got}, tolerance cos >= {self.want[0]} and "
            f"rel err <= {self.want[1]}"
        )


@dataclasses.dataclass
class Report:
    key: str
    checks: List[Check]
    io: Dict[str, str]  # segment -> the io path chosen (rknn-rt)
    untested: List[str]  # NPU segments without golden vectors

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks if not self.io or c.io in ("", self.io.get(c.segment, c.io)))

    def failures(self) -> List[Check]:
        return [c for c in self.checks if not c.ok]

    def to_dict(self) -> dict:
        return {
            "ok": self.ok,
            "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "io": dict(self.io),
            "untested": list(self.untested),
            "checks": [dataclasses.asdict(c) for c in self.checks],
        }


def tolerance(seg, precision: str) -> tuple:
    cos, rel = TOLERANCE.get(precision, TOLERANCE["w8a8"])
    if precision != "fp16" and seg.accuracy:
        cos = min(cos, float(seg.accuracy.get("min_cos", cos)) - 0.01)
        rel = max(rel, 2 * float(seg.accuracy.get("max_rel", rel)))
    return cos, rel


def compare(got: np.ndarray, want: np.ndarray) -> tuple:
    """(cosine, max|got - want| / max|want|); a non-finite or wrongly sized output scores
    (-1, inf). The cosine is taken about the golden output's mean (a correlation), so that an
    output whose values share a large offset still shows a permutation of them."""
    a = np.asarray(got, np.float64).reshape(-1)
    b = np.asarray(want, np.float64).reshape(-1)
    if a.size != b.size or not np.isfinite(a).all():
        return -1.0, float("inf")
    rel = float(np.max(np.abs(a - b))) / max(float(np.max(np.abs(b))) if b.size else 0.0, 1e-30)
    mean = float(b.mean()) if b.size > 1 else 0.0
    a, b = a - mean, b - mean
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    cos = 1.0 if na == nb == 0.0 else float(np.dot(a, b)) / max(na * nb, 1e-30) if na and nb else 0.0
    return cos, rel


def runtime_key(backend: str) -> str:
    """What the verdict is recorded for: the runner and its runtime's version."""
    from rwkv2rknn.runtime import device

    if backend in ("rknn-rt", "rknn-lite"):
        path = device.librknnrt_path()
        sha = ""
        try:
            with open(path, "rb") as f:
                sha = hashlib.sha256(f.read()).hexdigest()[:12]
        except OSError:
            pass
        drv = device.npu_driver_version() or "unknown"
        lite = ""
        if backend == "rknn-lite":
            from importlib import metadata

            try:
                lite = f", rknn-toolkit-lite2 {metadata.version('rknn-toolkit-lite2')}"
            except metadata.PackageNotFoundError:
                lite = ", rknn-toolkit-lite2 (version unknown)"
        return (
            f"{backend}: librknnrt {device.librknnrt_version(path) or 'unknown'} (sha256 {sha}), "
            f"RKNPU driver {drv}{lite}"
        )
    if backend == "rknn-sim":
        from importlib import metadata

        try:
            return f"rknn-sim: rknn-toolkit2 {metadata.version('rknn-toolkit2')}"
        except metadata.PackageNotFoundError:
            return "rknn-sim"
    import onnxruntime

    return f"ort: onnxruntime {onnxruntime.__version__}"


def _golden(model, seg) -> Dict[str, np.ndarray]:
    path = os.path.join(model.artifact, seg.golden)
    if not os.path.isfile(path):
        raise BadInput(f"golden vectors '{path}' are missing", "compile (or pack) the model again")
    from rwkv2rknn.artifact.plan import sha256_file

    if seg.golden_sha256 and sha256_file(path) != seg.golden_sha256:
        raise BadInput(
            f"golden vectors '{path}' changed since they were compiled (checksum mismatch)",
            "compile (or pack) the model again",
        )
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _timed(runner, feed) -> tuple:
    best, outs = float("inf"), None
    for _ in range(REPEAT):
        t0 = time.perf_counter()
        outs = runner.infer(feed)
        best = min(best, time.perf_counter() - t0)
    return outs, 1000 * best


def _check(seg, name, io, runner, feed, wants: Dict[str, np.ndarray], precision, rows=0) -> Check:
    want = tolerance(seg, precision)
    try:
        outs, ms = _timed(runner, feed)
    except Exception as e:  # noqa: BLE001 - a runner that fails a check fails it, named
        log.info("self-test %s %s: %s", seg.name, name, e)
        return Check(
            seg.name, name, io, False, -1.0, float("inf"), f"(run failed: {str(e)[:120]})", want, 0.0
        )
    worst = None
    for k, w in wants.items():
        got = np.asarray(outs[k], np.float32)
        if rows:
            got = got.reshape(-1, w.reshape(rows, -1).shape[1])[:rows]
        cos, rel = compare(got, w)
        if worst is None or (cos, -rel) < (worst[0], -worst[1]):
            worst = (cos, rel, k)
    cos, rel, k = worst
    ok = cos >= want[0] and rel <= want[1]
    return Check(seg.name, name, io, ok, cos, rel, k, want, ms)


def check_segment(
    seg, golden: Dict[str, np.ndarray], slots, paths: Sequence[str], token_runner, seq_runner, progress=None
) -> tuple:
    """One NPU segment's checks on every io path in ``paths`` ('' where the runner has one):
    ``token_runner(io)`` / ``seq_runner(io)`` give (runner, close it after?) or (None, False).
    Returns (checks, the fastest path that passes, else the first)."""
    from rwkv2rknn.runtime.rows import pad

    checks: List[Check] = []
    for io in paths:
        made = []
        try:
            if "token_in_0" in golden:
                runner, own = token_runner(io)
                if own:
                    made.append(runner)
                feed = {k: golden[f"token_in_{j}"] for j, k in enumerate(seg.inputs)}
                wants = {k: golden[f"token_out_{j}"] for j, k in enumerate(seg.outputs)}
                checks.append(_check(seg, "token", io, runner, feed, wants, seg.token.precision))
            if "rows_in_0" in golden:
                seq, own = seq_runner(io)
                if own:
                    made.append(seq)
                n = golden["rows_out_0"].shape[0]
                for t in (getattr(seq, "rows", ()) or (n,)) if seq is not None else ():
                    use = min(n, t)
                    feed = {
                        k: (golden[f"rows_in_{j}"] if k in slots else pad(golden[f"rows_in_{j}"][:use], t))
                        for j, k in enumerate(seg.inputs)
                    }
                    wants = {k: golden[f"rows_out_{j}"][:use] for j, k in enumerate(seg.outputs)}
                    checks.append(_check(seg, f"{t} rows", io, seq, feed, wants, seg.seq.precision, rows=use))
        finally:
            for r in made:
                r.close()
    for c in checks:
        if progress:
            progress(c)
    passing = [io for io in paths if all(c.ok for c in checks if c.io == io)]
    best = min(passing, key=lambda io: sum(c.ms for c in checks if c.io == io)) if passing else paths[0]
    return checks, best


def run(
    model, io_paths: Optional[Sequence[str]] = None, progress: Optional[Callable[[Check], None]] = None
) -> Report:
    """Check every NPU segment of a loaded ``HybridModel`` against its golden vectors on its
    runner. ``io_paths`` (rknn-rt only): the io paths to try; each segment gets the fastest
    that passes (none passing: its first)."""
    rt = model.backend == "rknn-rt"
    m = model.manifest
    slots = {s.input for s in m.state}
    checks: List[Check] = []
    chosen: Dict[str, str] = {}
    untested = []
    for i, seg in enumerate(m.segments):
        if seg.backend != "npu":
            continue
        if not seg.golden:
            untested.append(seg.name)
            continue
        paths = list(io_paths) if rt and io_paths else [model.io_for(seg)] if rt else [""]

        def token_runner(io, i=i, seg=seg):
            if not rt or io == model.io_for(seg):
                return model.runners[i], False
            return model.new_runner(seg, seq=False, io=io), True

        def seq_runner(io, seg=seg):
            if rt and io != model.io_for(seg):
                return model.new_runner(seg, seq=True, io=io), True
            return model.seq_runner(seg), False  # shared with prefill

        seg_checks, best = check_segment(
            seg, _golden(model, seg), slots, paths, token_runner, seq_runner, progress
        )
        checks.extend(seg_checks)
        if rt:
            chosen[seg.name] = best
    return Report(runtime_key(model.backend), checks, chosen, untested)


def recorded(artifact: str, key: str) -> Optional[dict]:
    from rwkv2rknn import fileio as io

    path = os.path.join(artifact, VERDICT_FILE)
    if not os.path.isfile(path):
        return None
    try:
        runs = io.read_json(path, "self-test record").get("runs", {})
    except Exception:  # noqa: BLE001 - an unreadable record is tested again
        return None
    got = runs.get(key) if isinstance(runs, dict) else None
    return got if isinstance(got, dict) else None


def record(artifact: str, report: Report) -> bool:
    """Keep the verdict beside the artifact (``selftest.json``); False if the folder is
    read-only (the self-test then runs again next time)."""
    from rwkv2rknn import fileio as io

    path = os.path.join(artifact, VERDICT_FILE)
    runs = {}
    if os.path.isfile(path):
        try:
            runs = dict(io.read_json(path, "self-test record").get("runs", {}))
        except Exception:  # noqa: BLE001 - replaced by a good one
            runs = {}
    runs[report.key] = report.to_dict()
    try:
        io.write_json(path, {"runs": runs})
        return True
    except OSError as e:
        log.warning("cannot record the self-test in %s (%s): it runs again next time", path, e)
        return False


def failure(report: Report) -> NumericalError:
    bad = report.failures()
    first = bad[0]
    more = f" (and {len(bad) - 1} more check(s))" if len(bad) > 1 else ""
    return NumericalError(
        f"self-test failed on {report.key}: segment {first.line()[5:]}{more}",
        "the runtime computes something other than the compiled model: check "
        "`rwkv2rknn doctor ARTIFACT`, try --rknn-io copy, or --backend rknn-lite",
    )


def ensure(model, echo: Callable[[str], None] = log.info, force: bool = False) -> Optional[Report]:
    """The first run of an artifact on a board runtime: run the self-test once and record it;
    later runs read the record (``force``: test again). Raises NumericalError naming the
    segment when it fails. Returns the report when one was made."""
    from rwkv2rknn.runtime.board import BOARD_BACKENDS

    if model.backend not in BOARD_BACKENDS and not force:
        return None
    if not any(s.golden for s in model.manifest.segments):
        if force:
            echo(
                "self-test: this artifact has no golden vectors (compiled with --plan-only or by "
                "an older rwkv2rknn): nothing to check"
            )
        return None
    key = runtime_key(model.backend)
    rec = None if force else recorded(model.artifact, key)
    if rec is not None:
        if not rec.get("ok"):
            raise NumericalError(
                f"the self-test recorded for {key} failed", "run `rwkv2rknn doctor ARTIFACT` to test again"
            )
        if model.backend == "rknn-rt" and isinstance(rec.get("io"), dict):
            model.use_io(rec["io"])
        return None
    echo(f"self-test of {model.artifact} on {key}")
    paths = ("copy", "zero-copy") if model.backend == "rknn-rt" and model.rknn_io == "auto" else None
    report = run(model, paths)
    record(model.artifact, report)
    if not report.ok:
        raise failure(report)
    if model.backend == "rknn-rt":
        model.use_io(report.io)
    echo(
        f"self-test passed: {len(report.checks)} check(s) of "
        f"{len({c.segment for c in report.checks})} NPU segment(s)"
    )
    return report
