"""The artifact's plan: segments, state layout and model facts as frozen dataclasses.

``Manifest`` round-trips through ``manifest.json`` (``to_dict`` / ``from_dict``), which is the
only thing the runtime reads besides the segment files. ``from_dict`` checks everything it
reads and raises a one-line ``BadInput`` for anything missing, mistyped or of another format
version. ``table()`` prints the per-layer plan.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Dict, List, Optional, Tuple

from rwkv2rknn.errors import BadInput

FORMAT = "rwkv2rknn-artifact"
# 2: T-row builds in [C, T] columns (`seq_layout`); 3: such a build takes a state row [1, C] too;
# 4: NPU segments carry golden vectors (`golden`: the board's self-test); 5: the `.seq.onnx` of a
# T-row build in columns is itself the columns form it was built from (onnxruntime and the
# simulator run it with rows turned to columns; before 5 it held the rows form).
# An artifact is written as the lowest that holds it (``Manifest.format_version``), for old runtimes
FORMAT_VERSION = 5  # the newest this rwkv2rknn writes
READS_VERSIONS = (1, 2, 3, 4, 5)  # a version-1 artifact has row builds only and reads as it did
MANIFEST = "manifest.json"
PLAN = "plan.json"
BACKENDS = ("npu", "cpu")
PRECISIONS = ("fp16", "w8a8", "w16a16i")  # of an NPU segment's build (compile --quant)
# How a quantised build was quantised (``Build.quant``): rknn-toolkit2's quantized_algorithm and
# quantized_method, and any SmoothQuant alpha folded into the segment's ONNX ('smooth', absent:
# none). Artifacts written before the record was kept were all built this way; they read as it.
QUANT_BEFORE_RECORD = {"algorithm": "normal", "method": "channel"}


@dataclass(frozen=True)
class Build:
    """One variant of a segment: the per-token graph (``Segment.token``) or the T-row (prefill)
    one (``Segment.seq``, its ``onnx`` None when the segment runs per token only). Its ONNX file,
    its NPU build and what that build is. Paths are relative to the artifact."""

    onnx: Optional[str] = None
    sha256: str = ""  # of the ONNX file
    rknn: Optional[str] = None  # the NPU build; a T-row one holds one graph per count in ``rows``
    rknn_sha256: str = ""
    fallback: str = ""  # why it was not built (per token: the segment then runs on the CPU;
    # T rows: its prefill runs token by token)
    precision: str = "fp16"  # of the .rknn: fp16, w8a8, w16a16i
    calib: Optional[str] = None  # calibration dataset the simulator rebuilds a quantised build from
    rows: Tuple[int, ...] = ()  # T rows: the row counts built
    layout: str = ""  # T rows: 'columns' (the .seq.rknn takes and gives [C, T], not [T, C] rows)
    # a quantised build: how (QUANT_BEFORE_RECORD's keys); the simulator rebuilds with these
    # values, never with today's defaults. {} for fp16.
    quant: Dict[str, str] = field(default_factory=dict)


# The manifest's keys of a segment's two builds (its JSON is flat, as format 1 wrote it):
# the per-token build's plain, the T-row build's with "seq_" before them.
TOKEN_KEYS = ("onnx", "sha256", "rknn", "rknn_sha256", "fallback", "precision", "calib", "quant")
SEQ_KEYS = TOKEN_KEYS + ("rows", "layout")
FLAT_KEYS = {**{k: ("token", k) for k in TOKEN_KEYS}, **{"seq_" + k: ("seq", k) for k in SEQ_KEYS}}


@dataclass(frozen=True)
class Segment:
    name: str
    backend: str  # where it runs: "npu" (rknn, or ort standing in) or "cpu" (ort)
    inputs: Tuple[str, ...]
    outputs: Tuple[str, ...]
    shapes: Dict[str, Tuple[int, ...]]  # every input and output
    stages: Tuple[str, ...]  # loader stages it covers: embed, L0, ..., head
    token: Build  # the per-token graph and its build
    seq: Build = Build()  # the T-token (prefill) variant, rows symbolic, and its build
    ops: int = 0
    matmuls: int = 0
    flops: int = 0  # MatMul FLOPs per call
    est_ms: float = 0.0  # estimated ms per call from the device profile
    est_prefill_ms: float = 0.0  # estimated ms per token of prefill (T-row calls shared by T tokens)
    accuracy: Dict[str, float] = field(default_factory=dict)  # quantised build vs fp32, held-out rows
    precision_note: str = ""  # why it is fp16 in a quantised compile

    def precision_label(self) -> str:
        """'fp32' on the CPU; 'w8a8 cos .9972'; 'fp16!' for one kept fp16 in a quantised compile."""
        if self.backend != "npu":
            return "fp32"
        if self.token.precision != "fp16" and self.accuracy:
            return f"{self.token.precision} cos {float(self.accuracy.get('min_cos', 0)):.4f}"
        return "fp16" + ("!" if self.precision_note else "")

    # > 0: the segment has no per-token .rknn; a token step runs its T-row build (``token.rknn`` is
    # the same file as ``seq.rknn``) with this many rows, the token in row 0 and padding after it:
    # one copy of the weights for decode and prefill
    decode_rows: int = 0
    # golden vectors (rwkv2rknn.golden): an .npz of real inputs and their fp32 onnxruntime outputs,
    # for a token step and for a few rows (checked at every built row count), and its checksum
    golden: Optional[str] = None
    golden_sha256: str = ""

    def to_dict(self) -> dict:
        """The manifest's flat record: the builds' fields under their keys (``FLAT_KEYS``)."""
        d = asdict(self)
        builds = {"token": d.pop("token"), "seq": d.pop("seq")}
        d.update((key, builds[v][k]) for key, (v, k) in FLAT_KEYS.items())
        return d


# every key of a segment in manifest.json
SEGMENT_KEYS = frozenset(f.name for f in fields(Segment) if f.name not in ("token", "seq")) | set(FLAT_KEYS)


@dataclass(frozen=True)
class StateSlot:
    """One piece of one layer's recurrent state: a row [C] of RWKV-4's [rows, C] tensor, or a
    named slot of its own shape (the ``wkv`` [H, N, N] of RWKV-5.2/6/7); ``shape`` () means [width]."""

    layer: int
    row: str
    input: str
    output: str
    accumulator: bool = False
    shape: Tuple[int, ...] = ()
    init: float = 0.0  # the value every element starts from (RWKV-4's pp: -1e30 in some files)

    def dims(self, width: int) -> Tuple[int, ...]:
        return tuple(self.shape) or (width,)


@dataclass(frozen=True)
class Manifest:
    model: Dict[str, object]  # arch, layers, width, vocab, source, source_dtype
    segments: Tuple[Segment, ...]
    state: Tuple[StateSlot, ...]
    token_input: str
    logits_output: str
    tokenizer: Optional[str] = None
    target: str = "rk3588"
    toolkit: str = ""
    generator: str = ""
    report: Tuple[str, ...] = field(default_factory=tuple)
    profile: Dict[str, object] = field(default_factory=dict)
    prefill_rows: int = 32  # the chunk length the prefill estimate assumes
    packed: bool = False  # `rwkv2rknn pack`: NPU segments as .rknn only (no ONNX), for the board

    # ---------------------------------------------------------------- JSON

    def to_dict(self) -> dict:
        d = asdict(self)
        d["segments"] = tuple(s.to_dict() for s in self.segments)
        return {"format": FORMAT, "format_version": self.format_version, **d}

    @property
    def format_version(self) -> int:
        """5 if a T-row build in columns keeps its ONNX (not packed: that file is the columns form),
        4 if segments carry golden vectors, 3 if a T-row build in columns takes a state slot
        [1, C] beside its rows, else 2."""
        if any(seg.seq.layout == "columns" and seg.seq.onnx for seg in self.segments):
            return 5
        if any(seg.golden for seg in self.segments):
            return 4
        two_d = {s.input for s in self.state if len(s.shape) == 2}
        return (
            3
            if any(seg.seq.layout == "columns" and two_d.intersection(seg.inputs) for seg in self.segments)
            else 2
        )

    @classmethod
    def from_dict(cls, d, where: str = MANIFEST) -> "Manifest":
        fix = "compile the model again with this version of rwkv2rknn"
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise BadInput(f"{where} is not an rwkv2rknn manifest", fix)
        if d.get("format_version") not in READS_VERSIONS or isinstance(d.get("format_version"), bool):
            raise BadInput(
                f"{where} has format version {repr(d.get('format_version'))[:40]}, this rwkv2rknn "
                f"reads versions {', '.join(map(str, READS_VERSIONS))}",
                fix,
            )
        try:
            segs = tuple(_segment(s) for s in _list(d, "segments"))
            state = tuple(
                StateSlot(
                    int(_get(s, "layer", int)),
                    _get(s, "row", str),
                    _get(s, "input", str),
                    _get(s, "output", str),
                    bool(s.get("accumulator", False)),
                    tuple(int(x) for x in s.get("shape", []) or []),
                    float(s.get("init", 0.0)),
                )
                for s in _list(d, "state")
            )
            m = cls(
                model=_get(d, "model", dict),
                segments=segs,
                state=state,
                token_input=_get(d, "token_input", str),
                logits_output=_get(d, "logits_output", str),
                tokenizer=d.get("tokenizer") if isinstance(d.get("tokenizer"), str) else None,
                target=str(d.get("target", "")),
                toolkit=str(d.get("toolkit", "")),
                generator=str(d.get("generator", "")),
                report=tuple(str(x) for x in d.get("report", []) or []),
                profile=d.get("profile") if isinstance(d.get("profile"), dict) else {},
                prefill_rows=max(1, int(d.get("prefill_rows", 32))),
                packed=d.get("packed", False) is True,
            )
            for k in ("layers", "width", "vocab"):  # read by the runtime as whole numbers
                v = m.model.get(k)
                if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                    raise TypeError(f"'model.{k}' should be a whole number")
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            raise BadInput(f"{where} is corrupt ({str(e)[:120]})", fix) from e
        m.check_bindings(where)
        return m

    def check_bindings(self, where: str = MANIFEST) -> None:
        """Every segment input is made by an earlier segment or is a graph input."""
        if not self.segments:
            raise BadInput(f"{where} lists no segments", "compile the model again")
        known = {s.input for s in self.state}
        if self.token_input:
            known.add(self.token_input)
        names = set()
        for seg in self.segments:
            if seg.name in names:
                raise BadInput(f"{where}: segment name '{seg.name}' appears twice", "compile again")
            names.add(seg.name)
            missing = [t for t in seg.inputs if t not in known]
            if missing and self.token_input:
                raise BadInput(
                    f"{where}: segment {seg.name} reads '{missing[0]}', which nothing before it makes",
                    "the manifest is corrupt; compile again",
                )
            known.update(seg.outputs)
        wanted = [s.output for s in self.state] + ([self.logits_output] if self.logits_output else [])
        lost = [t for t in wanted if t not in known]
        if lost:
            raise BadInput(f"{where}: no segment makes '{lost[0]}'", "the manifest is corrupt; compile again")

    # ---------------------------------------------------------------- facts

    @property
    def layers(self) -> int:
        return int(self.model.get("layers", 0) or 0)

    @property
    def vocab(self) -> int:
        return int(self.model.get("vocab", 0) or 0)

    def per_layer(self) -> List[dict]:
        """For each stage: segments touching it by backend, NPU share of its MatMul FLOPs."""
        rows = []
        stages = []
        for s in self.segments:
            for st in s.stages:
                if st not in stages:
                    stages.append(st)
        for st in stages:
            segs = [s for s in self.segments if st in s.stages]
            rows.append(
                {
                    "stage": st,
                    "npu": [s.name for s in segs if s.backend == "npu"],
                    "cpu": [s.name for s in segs if s.backend == "cpu"],
                }
            )
        return rows

    def npu_flop_share(self) -> float:
        total = sum(s.flops for s in self.segments)
        return sum(s.flops for s in self.segments if s.backend == "npu") / total if total else 0.0

    def boundaries(self) -> int:
        """NPU<->CPU switches per token when segments run in order."""
        return sum(1 for a, b in zip(self.segments, self.segments[1:]) if a.backend != b.backend)

    def state_bytes(self) -> int:
        """Bytes of the recurrent state (float32)."""
        width = int(self.model.get("width", 0) or 0)
        return sum(4 * math.prod(s.dims(width)) for s in self.state)

    def executor_token_ms(self) -> float:
        """The executor's own cost per token beyond its runs under the plan's profile
        (``DeviceProfile.executor_token_ms``); a term the profile lacks is 0 (older profiles
        held one figure, ``exec_token_ms``, or none)."""
        p = self.profile
        gbs = float(p.get("exec_state_gbs", 0.0) or 0.0)
        return (
            float(p.get("exec_token_ms", 0.0))
            + float(p.get("exec_segment_ms", 0.0)) * len(self.segments)
            + float(p.get("exec_slot_ms", 0.0)) * len(self.state)
            + (self.state_bytes() / (gbs * 1e6) if gbs > 0 else 0.0)
        )

    def estimate_ms(self, phase: str = "decode") -> Optional[dict]:
        """Estimated ms/token of ``phase`` ('decode' or 'prefill') from the device profile
        (None without one): the segments' calls (each with the executor's own cost of it), the
        hand-offs and the executor's own cost per token beyond its calls (``executor``). In
        prefill a T-row call, its hand-offs and the per-call cost are shared by T tokens."""
        if not self.profile:
            return None
        per = (lambda s: s.est_prefill_ms) if phase == "prefill" else (lambda s: s.est_ms)
        npu = sum(per(s) for s in self.segments if s.backend == "npu")
        cpu = sum(per(s) for s in self.segments if s.backend == "cpu")
        try:
            hand = self.boundaries() * float(self.profile.get("handoff_ms", 0.0))
            own = self.executor_token_ms()
        except (TypeError, ValueError):
            return None
        if phase == "prefill":
            hand /= self.prefill_rows
            own /= self.prefill_rows
        return {"npu": npu, "cpu": cpu, "handoffs": hand, "executor": own, "total": npu + cpu + hand + own}

    def warnings(self) -> List[str]:
        """One line per NPU segment whose T-row build failed: its name and the toolkit's reason."""
        return [
            f"{s.name}: its T-row build failed ({s.seq.fallback}); its prefill runs token by token"
            for s in self.segments
            if s.seq.fallback
        ]

    def table(self) -> str:
        lines = [
            f"{'segment':<28} {'runs on':<7} {'ops':>5} {'MatMuls':>7} {'MFLOP':>8}  {'precision':<16} stages"
        ]
        for s in self.segments:
            where = s.backend + ("*" if s.token.fallback else "") + ("~" if s.seq.fallback else "")
            stages = s.stages[0] if len(s.stages) == 1 else f"{s.stages[0]}..{s.stages[-1]}"
            lines.append(
                f"{s.name:<28} {where:<7} {s.ops:>5} {s.matmuls:>7} "
                f"{s.flops / 1e6:>8.2f}  {s.precision_label():<16} {stages}"
            )
        n_npu = sum(s.backend == "npu" for s in self.segments)
        lines.append(
            f"{len(self.segments)} segments ({n_npu} NPU, {len(self.segments) - n_npu} CPU), "
            f"{self.boundaries()} NPU<->CPU boundaries per token, "
            f"{100 * self.npu_flop_share():.1f}% of MatMul FLOPs on the NPU"
        )
        layer_rows = [r for r in self.per_layer() if r["stage"].startswith("L")]
        if layer_rows:
            most_npu = max(len(r["npu"]) for r in layer_rows)
            most_cpu = max(len(r["cpu"]) for r in layer_rows)
            lines.append(f"per layer: at most {most_npu} NPU and {most_cpu} CPU segment(s) per token")
        for phase, label in (("decode", "decode"), ("prefill", f"prefill (T={self.prefill_rows})")):
            est = self.estimate_ms(phase)
            if est is not None:
                lines.append(
                    f"estimated {label}: {est['total']:.2f} ms/token (NPU {est['npu']:.2f} + "
                    f"CPU {est['cpu']:.2f} + {est['handoffs']:.2f} hand-offs + "
                    f"{est['executor']:.2f} executor), an "
                    f"estimate from device profile '{self.profile.get('name', '?')}', "
                    f"not a measurement"
                )
        acc = [s for s in self.segments if s.accuracy]
        if acc:
            lines.append(
                "precision: cos = smallest cosine of the quantised build's outputs against "
                "fp32 onnxruntime on held-out calibration rows"
            )
        kept = [s for s in self.segments if s.precision_note]
        if kept:
            lines.append(
                "! kept fp16 in a quantised compile: "
                + "; ".join(f"{s.name}: {s.precision_note}" for s in kept)
            )
        if any(s.token.fallback for s in self.segments):
            lines.append(
                "* NPU candidate that fell back to the CPU: "
                + "; ".join(f"{s.name}: {s.token.fallback}" for s in self.segments if s.token.fallback)
            )
        if any(s.seq.fallback for s in self.segments):
            lines.append(
                "~ T-row build failed, prefill runs token by token: "
                + "; ".join(f"{s.name}: {s.seq.fallback}" for s in self.segments if s.seq.fallback)
            )
        return "\n".join(lines)


def _get(d, key, typ):
    if not isinstance(d, dict) or key not in d:
        raise KeyError(f"'{key}' missing")
    v = d[key]
    if typ is int and isinstance(v, bool):
        raise TypeError(f"'{key}' should be {typ.__name__}")
    if not isinstance(v, (list, tuple) if typ is list else typ):  # to_dict() keeps tuples
        raise TypeError(f"'{key}' should be {typ.__name__}")
    return v


def _list(d, key):
    v = _get(d, key, list)
    return v


def _names(d, key) -> Tuple[str, ...]:
    v = _get(d, key, list)
    if not all(isinstance(x, str) for x in v):
        raise TypeError(f"'{key}' should list names")
    return tuple(v)


def _accuracy(s) -> Dict[str, float]:
    v = s.get("accuracy") or {}
    if not isinstance(v, dict):
        raise TypeError("'accuracy' should be dict")
    return {str(k): float(x) for k, x in v.items()}


def _quant(v, precision: str) -> Dict[str, str]:
    """A build's quantisation record; a quantised build without one (written before it was
    kept) was built with QUANT_BEFORE_RECORD."""
    if v is None:
        return dict(QUANT_BEFORE_RECORD) if precision != "fp16" else {}
    if not isinstance(v, dict):
        raise TypeError("'quant' should be dict")
    return {str(k): str(x) for k, x in v.items()}


def _build(s, prefix: str, **given) -> Build:
    """One build of a segment from the manifest's keys with ``prefix`` ('' or 'seq_')."""

    def path(k):
        v = s.get(prefix + k)
        return v if isinstance(v, str) else None

    found = dict(
        onnx=path("onnx"),
        sha256=str(s.get(prefix + "sha256", "")),
        rknn=path("rknn"),
        rknn_sha256=str(s.get(prefix + "rknn_sha256", "")),
        fallback=str(s.get(prefix + "fallback", "")),
        precision=str(s.get(prefix + "precision", "fp16")),
        calib=path("calib"),
    )
    found["quant"] = _quant(s.get(prefix + "quant"), found["precision"])
    if prefix:
        found.update(
            rows=tuple(int(r) for r in s.get(prefix + "rows", []) or []),
            layout=str(s.get(prefix + "layout", "") or ""),
        )
    found.update(given)
    return Build(**found)


def _segment(s) -> Segment:
    backend = _get(s, "backend", str)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend '{backend}'")
    shapes = _get(s, "shapes", dict)
    shapes = {str(k): tuple(int(x) for x in v) for k, v in shapes.items()}
    seg = Segment(
        name=_get(s, "name", str),
        backend=backend,
        inputs=_names(s, "inputs"),
        outputs=_names(s, "outputs"),
        shapes=shapes,
        stages=_names(s, "stages"),
        token=_build(s, "", onnx=_get(s, "onnx", str)),
        seq=_build(s, "seq_"),
        ops=int(s.get("ops", 0)),
        matmuls=int(s.get("matmuls", 0)),
        flops=int(s.get("flops", 0)),
        est_ms=float(s.get("est_ms", 0.0)),
        est_prefill_ms=float(s.get("est_prefill_ms", 0.0)),
        accuracy=_accuracy(s),
        precision_note=str(s.get("precision_note", "")),
        decode_rows=int(s.get("decode_rows", 0)),
        golden=s.get("golden") if isinstance(s.get("golden"), str) else None,
        golden_sha256=str(s.get("golden_sha256", "")),
    )
    if not seg.stages:
        raise ValueError(f"segment '{seg.name}' covers no stages")
    token, seq = seg.token, seg.seq
    if not token.precision or not seq.precision:
        raise ValueError(f"segment '{seg.name}' has an empty precision")
    if seq.layout not in ("", "columns"):
        raise ValueError(f"segment '{seg.name}' has an unknown T-row layout '{seq.layout}'")
    if seg.decode_rows and (seg.decode_rows not in seq.rows or token.rknn != seq.rknn):
        raise ValueError(f"segment '{seg.name}' decodes on a T-row build it does not have")
    if min(seg.ops, seg.matmuls, seg.flops, seg.decode_rows) < 0:
        raise ValueError(f"segment '{seg.name}' has a negative op count")
    for p in [token.onnx] + [
        x for x in (token.rknn, seq.onnx, seq.rknn, token.calib, seq.calib, seg.golden) if x
    ]:
        if os.path.isabs(p) or ".." in p.replace("\\", "/").split("/"):
            raise ValueError(f"segment file '{p}' is outside the artifact")
    for t in seg.inputs + seg.outputs:
        if t not in shapes:
            raise ValueError(f"no shape for '{t}'")
    return seg


def token_file_bytes(artifact: str, manifest: "Manifest") -> int:
    """Bytes of the segments' per-token ONNX files and their external data: their weights as
    the CPU reads them each token (fp32), near enough."""
    paths = [os.path.join(artifact, seg.token.onnx) for seg in manifest.segments if seg.token.onnx]
    return sum(os.path.getsize(p) for path in paths for p in (path, path + ".data") if os.path.isfile(p))


def sha256_file(path: str) -> str:
    """SHA-256 of a file; an ONNX file's covers its external data too (``NAME.onnx.data``
    beside it, where a model above the protobuf limit keeps its weights)."""
    h = hashlib.sha256()
    data = path + ".data"
    for part in (path, data) if path.endswith(".onnx") and os.path.isfile(data) else (path,):
        with open(part, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
