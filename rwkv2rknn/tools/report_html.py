"""The report page: its style, its sections and the HTML around them, and ``write_report``
(the data it shows is read by ``report``)."""

from __future__ import annotations

import math
import os
from typing import List, Optional

from rwkv2rknn import __version__, fileio
from rwkv2rknn.errors import UsageError
from rwkv2rknn.tools.report import (
    EXECUTOR,
    HANDOFF,
    REPORT_HTML,
    ReportData,
    load,
    show_value,
    stage_range,
    strip_svg,
)
from rwkv2rknn.tools.svg import columns, esc, fmt, hbars, line_plot, stacked

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:#222;
 margin:24px auto;max-width:1000px;padding:0 16px;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 6px;border-bottom:1px solid #ddd}
.facts,.note{color:#555;margin:2px 0}.note{font-size:12px}
.legend{display:flex;flex-wrap:wrap;gap:6px 18px;margin:8px 0;font-size:13px}
.sw{display:inline-block;width:14px;height:14px;vertical-align:-2px;margin-right:5px;border-radius:2px}
table{border-collapse:collapse;font-size:12px;margin:6px 0}
td,th{border-bottom:1px solid #eee;padding:2px 8px;text-align:left;vertical-align:top}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
.pass{color:#1a7f37;font-weight:600}.fail{color:#b00020;font-weight:600}.warn{color:#b35900}
svg text{pointer-events:none;font-family:inherit}
svg .seg:hover,svg .bar:hover,svg .part:hover{stroke:#000;stroke-width:2}
.kpi{display:flex;gap:28px;flex-wrap:wrap;margin:8px 0}.kpi b{font-size:18px;display:block}
details summary{cursor:pointer;color:#2c7bb6}
"""


def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def header(d: ReportData) -> str:
    m = d.manifest
    mod = m.model
    built = any(s.token.rknn or s.seq.rknn for s in m.segments)
    n_npu = sum(s.backend == "npu" for s in m.segments)
    what = (
        (
            f"{mod.get('arch', 'model')} {m.layers} x {mod.get('width', '?')}, vocab {m.vocab}, "
            f"{mod.get('source_dtype', '?')} files"
        )
        if m.layers
        else f"one {mod.get('arch', 'ONNX')} graph"
    )
    kpis = [
        ("segments", f"{len(m.segments)}", f"{n_npu} NPU, {len(m.segments) - n_npu} CPU", len(m.segments)),
        ("boundaries", f"{m.boundaries()}", "NPU<->CPU hand-offs per token", m.boundaries()),
        ("npu-share", _pct(m.npu_flop_share()), "of MatMul FLOPs on the NPU", m.npu_flop_share()),
    ]
    k = "".join(
        f'<div data-kpi="{key}" data-value="{val!r}"><b>{esc(big)}</b>{esc(small)}</div>'
        for key, big, small, val in kpis
    )
    return (
        f"<h1>{esc(what)}</h1><p class=facts>target {esc(m.target)}, "
        f"{esc(m.toolkit or 'no rknn-toolkit2')}, {esc(m.generator)}"
        f"{'' if built else ' &mdash; plan only: no .rknn built, NPU segments are placements'}</p>"
        f"<p class=facts>artifact {esc(d.artifact)}</p><div class=kpi>{k}</div>"
    )


def partition(d: ReportData) -> str:
    order = {"cpu": 1, "fallback": 2}  # NPU precisions first
    kinds = sorted({v.kind for v in d.segs}, key=lambda k: (order.get(k, 0), k))
    total = sum(v.seg.flops for v in d.segs) or 1
    items = []
    for kind in kinds:
        vs = [v for v in d.segs if v.kind == kind]
        items.append(
            f'<span data-legend="{esc(kind)}"><span class=sw style="background:{d.colour(kind)}">'
            f"</span>{esc(vs[0].where)}: {len(vs)} segment(s), "
            f"{_pct(sum(v.seg.flops for v in vs) / total)} of MatMul FLOPs</span>"
        )
    items.append(
        f'<span><span class=sw style="background:{HANDOFF};width:4px"></span>'
        f"&#9660; NPU&lt;-&gt;CPU hand-off ({d.manifest.boundaries()} per token)</span>"
    )
    sized = (
        "MatMul FLOPs per token; segments with none (CPU) at the minimum width"
        if d.size_by == "flops"
        else "bytes of each segment's file (.rknn for NPU segments, else .onnx)"
    )
    return (
        f"<h2>Partition</h2><p class=note>Segments in run order, left to right; widths follow "
        f"{sized}. Brackets under the strip are the layers (stages) each segment covers: a fused "
        f"segment belongs to two. Hover a segment for its ops, MatMuls, precision and why it is "
        f"on the CPU.</p>{strip_svg(d)}<div class=legend>{''.join(items)}</div>" + cpu_reasons(d)
    )


def cpu_reasons(d: ReportData) -> str:
    reasons = d.plan.get("cpu_reasons") or {}
    if not isinstance(reasons, dict) or not reasons:
        return ""
    rows = "".join(
        f"<tr><td class=n>{esc(n)}</td><td>{esc(r)}</td></tr>"
        for r, n in sorted(reasons.items(), key=lambda kv: -_num(kv[1]))
    )
    falls = "".join(
        f"<tr><td class=n>1 segment</td><td>{esc(v.seg.name)} fell back: {esc(v.seg.token.fallback)}</td></tr>"
        for v in d.segs
        if v.seg.token.fallback
    )
    return (
        f"<h2>Why ops are on the CPU</h2><table><tr><th class=n>ops</th><th>reason (from the support "
        f"pass)</th></tr>{rows}{falls}</table>"
    )


def _num(v) -> float:
    return float(v) if isinstance(v, (int, float)) else 0.0


def estimates(d: ReportData) -> str:
    m = d.manifest
    rows = []
    for phase, label in (("decode", "decode"), ("prefill", f"prefill (T={m.prefill_rows})")):
        est = m.estimate_ms(phase)
        if est is not None:
            rows.append(
                (
                    label,
                    [
                        ("NPU", est["npu"], d.colour("npu-fp16")),
                        ("CPU segments", est["cpu"], d.colour("cpu")),
                        ("hand-offs", est["handoffs"], HANDOFF),
                        ("executor", est.get("executor", 0.0), EXECUTOR),
                    ],
                )
            )
    if not rows:
        return "<h2>Estimated time per token</h2><p class=note>The manifest has no device profile.</p>"
    name = m.profile.get("name", "?")
    keys = "".join(
        f'<span><span class=sw style="background:{c}"></span>{esc(p)}</span>' for p, _, c in rows[0][1]
    )
    return (
        f'<h2>Estimated time per token</h2><p class=note data-profile="{esc(name)}">An '
        f"<b>estimate</b> from device profile '{esc(name)}', not a measurement: NPU calls, CPU "
        f"segments, NPU&lt;-&gt;CPU hand-offs and the executor's own time per token beyond its "
        f"calls (in prefill a T-row call and its hand-offs are shared by T tokens).</p>"
        f"<div class=legend>{keys}</div>"
        + stacked(rows, "ms/token", f"estimated ms per token, profile {name}")
    )


def check(d: ReportData) -> str:
    c = d.check
    if not c:
        return (
            "<h2>Last check</h2><p class=note>No check.json in the artifact: run "
            "<code>rwkv2rknn check ARTIFACT</code>, then this report again.</p>"
        )
    tol = c.get("tolerance") or {}
    ok = bool(c.get("passed"))
    steps = [s.get("max_rel") for s in c["steps"] if isinstance(s, dict)]
    drift = c.get("state_drift")
    facts = [
        ("result", "PASS" if ok else "FAIL: " + "; ".join(map(str, c.get("failures", [])))),
        ("backend", c.get("backend", "?")),
        ("tokens", f"{len(steps)}" + (f" of {c['tokens_from']}" if c.get("tokens_from") else "")),
        ("decode path", _path(c)),
        ("same top token", _pct(_num(c.get("top1_agreement")))),
        ("max rel error", fmt(_num(c.get("max_rel")))),
        ("min cosine", f"{_num(c.get('min_cosine')):.6f}"),
        ("state drift", fmt(drift) if isinstance(drift, (int, float)) else "not measured"),
    ]
    for w in c.get("warnings") or []:
        facts.insert(1, ("warning", str(w)))
    pre = c.get("prefill")
    if isinstance(pre, dict):  # the same tokens as a prompt, through the T-row variants
        facts.insert(4, ("prefill path", _path(pre)))
    facts.append(("tolerances", ", ".join(f"{k} {v}" for k, v in tol.items())))
    facts.append(("written", c.get("written", "?")))
    rows = "".join(
        f'<tr><th>{esc(k)}</th><td data-check="{esc(k)}"'
        f"{' class=' + ('pass' if ok else 'fail') if k == 'result' else ''}>{esc(v)}</td></tr>"
        for k, v in facts
    )
    stale = (
        "<p class=warn>This check.json was written for another compile of this folder: run "
        "the check again.</p>"
        if d.check_stale
        else ""
    )
    ref = tol.get("max_rel")
    plot = line_plot(
        [_float(v) for v in steps],
        "max relative logit error per step",
        "max rel error",
        ref=(float(ref), f"tolerance {ref}") if isinstance(ref, (int, float)) else None,
    )
    return (
        f"<h2>Last check: hybrid executor vs pure onnxruntime</h2>{stale}<table>{rows}</table>"
        + kl_histogram(c)
        + f"<p class=note>Max |logit error| / max |reference logit| per step; dashed: the "
        f"tolerance.</p>{plot}"
    )


def _path(rep: dict) -> str:
    """'KL mean .., median .., p99 .., max ..; same top token ..; bits per byte .. (reference ..)'."""
    q = rep.get("quality") if isinstance(rep.get("quality"), dict) else {}
    k = q.get("kl") if isinstance(q.get("kl"), dict) else None
    parts = (
        [
            f"KL mean {fmt(_num(k.get('mean')))}, median {fmt(_num(k.get('median')))}, p99 "
            f"{fmt(_num(k.get('p99')))}, max {fmt(_num(k.get('max')))}"
        ]
        if k
        else ["no KL recorded"]
    )
    parts.append(f"same top token {_pct(_num(rep.get('top1_agreement')))}")
    b = q.get("bits")
    if isinstance(b, dict):
        parts.append(
            f"bits per {b.get('unit', 'token')} {_num(b.get('artifact')):.4f} (reference "
            f"{_num(b.get('reference')):.4f})"
        )
    parts.append(f"max rel error {fmt(_num(rep.get('max_rel')))}")
    return "; ".join(parts)


KL_COLOURS = {"decode": "#2c7bb6", "prefill": "#fdae61"}


def kl_histogram(c: dict) -> str:
    """Tokens per decade of KL divergence, decode and prefill side by side."""
    groups, edges = [], None
    for name, rep in (("decode", c), ("prefill", c.get("prefill"))):
        h = ((rep or {}).get("quality") or {}).get("histogram") if isinstance(rep, dict) else None
        if isinstance(h, dict) and isinstance(h.get("counts"), list) and isinstance(h.get("edges"), list):
            edges = edges or h["edges"]
            groups.append((name, KL_COLOURS[name], [int(_num(x)) for x in h["counts"]]))
    if not groups or not edges:
        return ""
    labels = (
        [f"< {fmt(edges[0], 1)}"]
        + [f"{fmt(a, 1)}..{fmt(b, 1)}" for a, b in zip(edges, edges[1:])]
        + [f">= {fmt(edges[-1], 1)}"]
    )
    return (
        "<p class=note>KL divergence of each token's next-token distribution from the reference's "
        "(nats): tokens per decade, decode and prefill paths.</p>"
        + columns(groups, labels, "tokens per decade of KL divergence")
    )


def _float(v):
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else float("nan")


def validation(d: ReportData) -> str:
    """The compile's own check of the cut model against its source (plan.json 'validation')."""
    v = d.plan.get("validation")
    if not isinstance(v, dict) or not v:
        return (
            "<h2>Compile's validation</h2><p class=note>This plan.json records none (compiled "
            "before the compiler checked itself).</p>"
        )

    def num(key):
        x = v.get(key)
        return fmt(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else "n/a"

    facts = [
        ("result", "PASS" if v.get("passed") else "FAIL"),
        ("source", f"{v.get('source_dtype', '?')}, {v.get('tokens', '?')} seeded tokens"),
        ("logits max rel error", num("max_rel")),
        ("state drift", num("state_drift")),
        ("one chunk (T-row variants)", f"{num('prefill_max_rel')}, state {num('prefill_state_drift')}"),
        ("tolerance", num("tolerance")),
        ("time", f"{num('seconds')} s"),
    ]
    facts += [
        (f"after {p.get('pass')}", fmt(p.get("max_rel")))
        for p in v.get("passes") or []
        if isinstance(p, dict) and isinstance(p.get("max_rel"), (int, float))
    ]
    rows = "".join(
        f'<tr><th>{esc(k)}</th><td data-validation="{esc(k)}">{esc(str(x))}</td></tr>' for k, x in facts
    )
    return f"<h2>Compile's validation: the cut model vs its source on onnxruntime</h2><table>{rows}</table>"


def accuracy(d: ReportData) -> str:
    shown = [
        v
        for v in d.segs
        if v.extras
        or v.check_rel is not None
        or v.check_seq_rel is not None
        or (v.seg.backend == "npu" and v.precision != "fp16")
    ]
    if not shown:
        return ""
    keys: List[str] = []
    for v in shown:
        keys += [k for k in v.extras if k not in keys]
    head = "".join(f"<th>{esc(k)}</th>" for k in keys)
    rows = "".join(
        f'<tr data-seg="{esc(v.seg.name)}"><td>{esc(v.seg.name)}</td><td>{esc(v.where)}</td>'
        f"<td>{esc(v.precision)}</td>"
        + "".join(f"<td>{esc(show_value(v.extras.get(k)))}</td>" for k in keys)
        + "".join(
            f"<td class=n>{esc(fmt(r) if r is not None else '')}</td>" for r in (v.check_rel, v.check_seq_rel)
        )
        + "</tr>"
        for v in shown
    )
    return (
        "<h2>Precision and accuracy per segment</h2><table><tr><th>segment</th><th>runs on</th>"
        f"<th>precision</th>{head}<th class=n>last check: alone vs onnxruntime, max rel</th>"
        f"<th class=n>its T-row variant, max rel</th></tr>"
        f"{rows}</table>"
    )


def bench(d: ReportData) -> str:
    b = d.bench
    if not b:
        return ""
    bound = b.get("bandwidth_bound_ms")
    rows = [
        (
            str(r["runner"])[:48],
            float(r["ms_per_token"]),
            "#4d4d4d" if "hybrid" in r["runner"] else "#a0a0a0",
            f"{r['runner']}: {r['ms_per_token']:.2f} ms/token (median)",
        )
        for r in b["rows"]
    ]
    ref = (
        (float(bound), f"memory-bandwidth bound {bound:.1f} ms/token")
        if isinstance(bound, (int, float)) and math.isfinite(bound)
        else None
    )
    pre = b.get("prefill") or {}
    pre_line = (
        f" Prefill (hybrid on ort, chunks of {pre.get('chunk')}): "
        f"{_num(pre.get('tokens_per_s')):.1f} tokens/s."
        if pre
        else ""
    )
    return (
        f"<h2>Bench: measured decode ms/token</h2><p class=note>{esc(b.get('model', ''))}, "
        f"median of {esc(b.get('tokens', '?'))} tokens, measured by <code>rwkv2rknn bench</code> "
        f"on the machine that ran it (CPU runners; not the NPU). Dashed: "
        f"{esc(ref[1] if ref else 'no bandwidth bound recorded')}.{esc(pre_line)}</p>"
        + hbars(rows, "ms/token", "decode ms per token by runner", ref=ref)
    )


def table(d: ReportData) -> str:
    head = (
        "<tr><th>#</th><th>segment</th><th>runs on</th><th>precision</th><th>stages</th>"
        "<th class=n>ops</th><th class=n>MatMuls</th><th class=n>MFLOP</th>"
        "<th class=n>est. ms decode</th><th class=n>est. ms prefill</th></tr>"
    )
    rows = "".join(
        f'<tr data-seg="{esc(v.seg.name)}"><td>{i}</td><td>{esc(v.seg.name)}</td><td>'
        f'<span class=sw style="background:{d.colour(v.kind)}"></span>{esc(v.where)}</td>'
        f"<td>{esc(v.precision)}</td><td>{esc(stage_range(v.seg))}</td><td class=n>{v.seg.ops}</td>"
        f"<td class=n>{v.seg.matmuls}</td><td class=n>{v.seg.flops / 1e6:.2f}</td>"
        f"<td class=n>{v.seg.est_ms:.3f}</td><td class=n>{v.seg.est_prefill_ms:.3f}</td></tr>"
        for i, v in enumerate(d.segs)
    )
    return f"<details><summary>All segments ({len(d.segs)})</summary><table>{head}{rows}</table></details>"


def page(d: ReportData) -> str:
    body = "".join(
        [
            header(d),
            partition(d),
            estimates(d),
            validation(d),
            check(d),
            accuracy(d),
            bench(d),
            "<h2>Segments</h2>",
            table(d),
        ]
    )
    return (
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
        f'<meta name=viewport content="width=device-width"><title>rwkv2rknn report: '
        f"{esc(d.artifact)}</title><style>{CSS}</style></head><body>{body}"
        f"<p class=note>Made by rwkv2rknn {esc(__version__)} from the artifact's manifest.json, "
        f"plan.json{', check.json' if d.check else ''}{' and bench figures' if d.bench else ''}. "
        f"One file, no scripts, nothing loaded from elsewhere.</p></body></html>\n"
    )


def write_report(
    artifact: str, out: Optional[str] = None, bench: Optional[str] = None, size_by: str = "flops"
) -> str:
    """Render the page and write it atomically; returns its path (default ARTIFACT/report.html)."""
    out = out or os.path.join(artifact, REPORT_HTML)
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise UsageError(
            f"cannot write the report to '{out}': folder '{folder}' does not exist",
            "give a path in an existing folder",
        )
    fileio.write_text(out, page(load(artifact, bench, size_by)))
    return out
