"""`rwkv2rknn report`: the artifact as one self-contained HTML page.

What it reads: ``manifest.json`` (through ``plan.Manifest``), ``plan.json`` (why ops are on the
CPU), and where present ``check.json`` (the last ``rwkv2rknn check``) and a ``bench --json-out``
file. Fields a manifest segment has beyond ``plan.Segment`` (a per-segment ``precision``,
accuracy figures) are shown as they are. The page itself is assembled and written in ``report_html``
(``write_report``); the charts are plain SVG from ``svg``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from rwkv2rknn import fileio
from rwkv2rknn.tools.check import CHECK_JSON
from rwkv2rknn.errors import BadInput, UsageError
from rwkv2rknn.artifact.plan import MANIFEST, PLAN, SEGMENT_KEYS, Manifest, Segment, sha256_file
from rwkv2rknn.tools.svg import Svg, fmt

SIZES = ("flops", "bytes")
REPORT_HTML = "report.html"
SEGMENT_FIELDS = SEGMENT_KEYS
ACCURACY_WORDS = ("accura", "error", "max_rel", "cosine", "quant", "calib", "int8")  # shown even as fields
COLOURS = {
    "npu-fp16": "#2c7bb6",
    "npu-int8": "#7b3294",
    "npu-w8a8": "#7b3294",
    "cpu": "#f29e4c",
    "fallback": "#d7191c",
}
OTHER_NPU = ("#1a9850", "#66a61e", "#1b7837")  # NPU precisions other than fp16 and int8
HANDOFF = "#222222"
EXECUTOR = "#9e9e9e"  # the executor's own time per token, in the estimate


@dataclass
class SegView:
    """One segment as the page shows it."""

    seg: Segment
    kind: str  # colour key: npu-<precision>, cpu, fallback
    where: str  # what the legend calls it
    precision: str
    size: float  # FLOPs or bytes: what the strip's widths follow
    reasons: Dict[str, int] = field(default_factory=dict)  # why its ops are on the CPU
    extras: Dict[str, object] = field(default_factory=dict)  # manifest fields beyond plan.Segment
    check_rel: Optional[float] = None  # per-segment error of the last check
    check_seq_rel: Optional[float] = None  # and of its T-row variant


@dataclass
class ReportData:
    artifact: str
    manifest: Manifest
    plan: dict
    segs: List[SegView]
    size_by: str
    check: Optional[dict] = None
    check_stale: bool = False
    bench: Optional[dict] = None

    def colour(self, kind: str) -> str:
        return colour_of(kind, [v.kind for v in self.segs])


def colour_of(kind: str, kinds: List[str]) -> str:
    if kind in COLOURS:
        return COLOURS[kind]
    others = sorted({k for k in kinds if k not in COLOURS})
    return OTHER_NPU[others.index(kind) % len(OTHER_NPU)] if kind in others else OTHER_NPU[0]


def kind_of(backend: str, fallback: str, precision: str) -> tuple:
    """(colour key, legend label) of a segment."""
    if backend == "cpu":
        return (
            ("fallback", "NPU candidate that fell back to the CPU")
            if fallback
            else ("cpu", "CPU (onnxruntime, fp32)")
        )
    return f"npu-{precision}", f"NPU, {precision}"


def load(artifact: str, bench: Optional[str] = None, size_by: str = "flops") -> ReportData:
    from rwkv2rknn.runtime.hybrid import load_manifest

    if size_by not in SIZES:
        raise UsageError(f"cannot size segments by '{size_by}'", f"use one of {', '.join(SIZES)}")
    manifest = load_manifest(artifact)
    raw = fileio.read_json(os.path.join(artifact, MANIFEST), "manifest")
    plan_path = os.path.join(artifact, PLAN)
    plan = fileio.read_json(plan_path, "plan") if os.path.exists(plan_path) else {}
    if not isinstance(plan, dict):
        raise BadInput(f"'{plan_path}' is not a compile report", "compile the model again")
    plan_segs = {s.get("name"): s for s in plan.get("segments", []) if isinstance(s, dict)}
    data = ReportData(artifact, manifest, plan, [], size_by)
    _read_check(data)
    checked: Dict[bool, dict] = {False: {}, True: {}}  # per token, T rows
    for s in (data.check or {}).get("per_segment", []):
        if isinstance(s, dict) and _number(s.get("max_rel")):
            checked[bool(s.get("rows"))][s.get("segment")] = float(s["max_rel"])
    for seg, rawseg in zip(manifest.segments, raw["segments"]):
        extras = {
            k: v
            for k, v in rawseg.items()
            if k != "precision" and (k not in SEGMENT_FIELDS or any(w in k for w in ACCURACY_WORDS))
        }
        planned = plan_segs.get(seg.name, {})
        precision = str(
            rawseg.get("precision")
            or planned.get("precision")
            or ("fp16" if seg.backend == "npu" else "fp32")
        )
        kind, where = kind_of(seg.backend, seg.token.fallback, precision)
        reasons = planned.get("cpu_reasons") or {}
        data.segs.append(
            SegView(
                seg,
                kind,
                where,
                precision,
                _size(artifact, seg, size_by),
                reasons if isinstance(reasons, dict) else {},
                extras,
                checked[False].get(seg.name),
                checked[True].get(seg.name),
            )
        )
    if bench:
        data.bench = read_bench(bench)
    return data


def _size(artifact: str, seg: Segment, size_by: str) -> float:
    if size_by == "flops":
        return float(seg.flops)
    path = os.path.join(artifact, seg.token.rknn or seg.seq.rknn or seg.token.onnx)
    return float(os.path.getsize(path)) if os.path.exists(path) else 0.0


def _read_check(data: ReportData) -> None:
    path = os.path.join(data.artifact, CHECK_JSON)
    if not os.path.exists(path):
        return
    fix = f"run rwkv2rknn check {data.artifact} again"
    rep = fileio.read_json(path, "check report", fix)
    if not isinstance(rep, dict) or not isinstance(rep.get("steps"), list):
        raise BadInput(f"'{path}' is not a check report", fix)
    data.check = rep
    data.check_stale = rep.get("manifest_sha256") != sha256_file(os.path.join(data.artifact, MANIFEST))


def read_bench(path: str) -> dict:
    fix = "give the file written by rwkv2rknn bench --json-out FILE"
    res = fileio.read_json(path, "bench figures", fix)
    rows = res.get("rows") if isinstance(res, dict) else None
    ok = (
        isinstance(rows, list)
        and rows
        and all(
            isinstance(r, dict) and isinstance(r.get("runner"), str) and _number(r.get("ms_per_token"))
            for r in rows
        )
    )
    if not ok:
        raise BadInput(f"'{path}' is not a bench result (no runners with ms/token)", fix)
    return res


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# ------------------------------------------------------------------ the strip

WIDTH, PER_LINE, SEG_H, GAP, MIN_W, TOP, LANES, PAD = 960, 20, 36, 2, 12, 14, 32, 6


def layout(sizes: List[float]) -> List[tuple]:
    """(line, x, width) per segment: widths follow the sizes (at least MIN_W), lines break
    between segments, about PER_LINE segments a line."""
    n = len(sizes)
    lines = max(1, math.ceil(n / PER_LINE))
    room = lines * (WIDTH - PAD) * (1.0 if lines == 1 else 0.94) - n * (MIN_W + GAP)
    total = sum(sizes)
    widths = [MIN_W + (s * room / total if total > 0 else room / n) for s in sizes]
    out, line, x = [], 0, float(PAD)
    for w in widths:
        w = min(w, WIDTH - PAD)
        if x > PAD and x + w > WIDTH:
            line, x = line + 1, float(PAD)
        out.append((line, x, w))
        x += w + GAP
    return out


def handoffs(segs: List[Segment]) -> List[tuple]:
    """(index, tensors, bytes) for every segment that starts on the other side of the one before."""
    out = []
    for i in range(1, len(segs)):
        a, b = segs[i - 1], segs[i]
        if a.backend != b.backend:
            names = [t for t in b.inputs if t in a.outputs]
            nbytes = sum(4 * math.prod(max(d, 1) for d in b.shapes.get(t, ())) for t in names)
            out.append((i, names, nbytes))
    return out


def stage_range(seg: Segment) -> str:
    return seg.stages[0] if len(seg.stages) == 1 else f"{seg.stages[0]}..{seg.stages[-1]}"


def show_value(v) -> str:
    """A manifest figure as text: floats to 4 digits, dicts as 'key value, ...'."""
    if v is None:
        return ""
    if isinstance(v, float):
        return fmt(v, 4)
    if isinstance(v, dict):
        return ", ".join(f"{k} {show_value(x)}" for k, x in v.items())
    return str(v)


def hover(v: SegView, m: Manifest) -> str:
    s = v.seg
    lines = [
        f"{s.name}: {v.where}",
        f"stages {stage_range(s)}",
        f"{s.ops} ops, {s.matmuls} MatMuls, {s.flops / 1e6:.2f} MFLOP per token",
    ]
    if m.profile:
        lines.append(
            f"estimated {s.est_ms:.3f} ms per call (decode), {s.est_prefill_ms:.3f} ms per "
            f"token of prefill (profile '{m.profile.get('name', '?')}', an estimate)"
        )
    if s.token.fallback:
        lines.append(f"fell back to the CPU: {s.token.fallback}")
    lines += [f"on the CPU: {r} ({n} ops)" for r, n in v.reasons.items()]
    if s.backend == "cpu" and not v.reasons:
        lines.append("why on the CPU: see 'Why ops are on the CPU' (no per-segment reasons in plan.json)")
    lines += [f"{k}: {show_value(val)}" for k, val in v.extras.items()]
    if v.check_rel is not None:
        lines.append(f"last check, this segment alone vs onnxruntime: max rel error {v.check_rel:.3g}")
    if v.check_seq_rel is not None:
        lines.append(
            f"last check, its T-row variant vs the per-token ONNX: max rel error {v.check_seq_rel:.3g}"
        )
    return "\n".join(lines)


def strip_svg(data: ReportData) -> str:
    segs = [v.seg for v in data.segs]
    pos = layout([v.size for v in data.segs])
    block = TOP + SEG_H + LANES + 10
    svg = Svg(
        WIDTH,
        (pos[-1][0] + 1) * block if pos else block,
        f"{len(segs)} segments in run order, coloured by where they run",
        cls="strip",
    )
    for v, (line, x, w) in zip(data.segs, pos):
        y = line * block + TOP
        svg.rect(
            x,
            y,
            w,
            SEG_H,
            data.colour(v.kind),
            title=hover(v, data.manifest),
            class_="seg",
            data_name=v.seg.name,
            data_backend=v.seg.backend,
            data_kind=v.kind,
            data_flops=v.seg.flops,
            data_size=repr(v.size),
        )
        label = stage_range(v.seg)
        if w >= 6.2 * len(label) + 6:
            svg.text(
                x + w / 2,
                y + SEG_H / 2 + 4,
                label,
                anchor="middle",
                size=10,
                fill="#000000" if v.kind == "cpu" else "#ffffff",
            )
    for i, names, nbytes in handoffs(segs):
        line, x, _ = pos[i]
        x, y = x - GAP / 2, line * block + TOP
        title = (
            f"hand-off {segs[i - 1].backend.upper()} -> {segs[i].backend.upper()} between "
            f"{segs[i - 1].name} and {segs[i].name}: {len(names)} tensor(s), {nbytes} bytes"
        )
        svg.add(
            "path",
            title,
            d=f"M{x - 4:.1f},{y - 11} L{x + 4:.1f},{y - 11} L{x:.1f},{y - 3} Z "
            f"M{x - 1:.1f},{y} h2 v{SEG_H} h-2 Z",
            fill=HANDOFF,
            class_="handoff",
            data_after=segs[i - 1].name,
            data_before=segs[i].name,
        )
    _brackets(svg, data.manifest, pos, block)
    return svg.render()


def _brackets(svg: Svg, m: Manifest, pos: List[tuple], block: int) -> None:
    """Under the strip, a bracket per stage (layer) over the segments that cover it; stages that
    share a fused segment overlap, so they alternate between two lanes."""
    for j, row in enumerate(m.per_layer()):
        members = [i for i, s in enumerate(m.segments) if row["stage"] in s.stages]
        for line in sorted({pos[i][0] for i in members}):
            on = [i for i in members if pos[i][0] == line]
            x0, x1 = pos[on[0]][1] + 1, pos[on[-1]][1] + pos[on[-1]][2] - 1
            y = line * block + TOP + SEG_H + 5 + (j % 2) * 15
            title = f"{row['stage']}: " + ", ".join(m.segments[i].name for i in members)
            svg.add(
                "path",
                title,
                d=f"M{x0:.1f},{y - 3} V{y} H{x1:.1f} V{y - 3}",
                fill="none",
                stroke="#555555",
                class_="stage",
                data_stage=row["stage"],
            )
            svg.text((x0 + x1) / 2, y + 10, row["stage"], anchor="middle", size=9, fill="#333333")
