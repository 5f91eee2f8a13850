"""`rwkv2rknn report`: the page against the manifest and the plan, no external reference, the
check report saved into the artifact and read back, bench figures charted."""

import json
import os

import pytest
from click.testing import CliRunner

from helpers.report_page import Elements, alter_segments, copy_artifact, external_references
from rwkv2rknn.tools import report
from rwkv2rknn.tools.check import CHECK_JSON
from rwkv2rknn.cli import cli
from rwkv2rknn.artifact.plan import MANIFEST, PLAN, Manifest
from rwkv2rknn.runtime.hybrid import load_manifest


def _page(artifact, out, *extra):
    res = CliRunner().invoke(cli, ["report", artifact, "-o", str(out), *extra])
    assert res.exit_code == 0, res.output
    assert f"report written to {out}" in res.output
    with open(out) as f:
        return f.read()


@pytest.fixture
def artifact(fp32_plan_artifact, tmp_path):
    return copy_artifact(fp32_plan_artifact, str(tmp_path / "art"))


def expected_kind(seg, precision="fp16"):
    if seg.backend == "cpu":
        return "fallback" if seg.token.fallback else "cpu"
    return f"npu-{precision}"


@pytest.mark.slow
def test_page_matches_manifest(artifact, tmp_path):
    accuracy = {"max_rel": 0.0123, "cosine": 0.99931}
    alter_segments(artifact, fallback=3, int8=1, accuracy=accuracy)
    m = load_manifest(artifact)
    html = _page(artifact, tmp_path / "r.html")
    page = Elements(html)
    shapes = page.with_class("rect", "seg")
    assert [a["data-name"] for a in shapes] == [s.name for s in m.segments]  # one shape each, in order
    precision = {1: "int8"}
    for i, (a, seg) in enumerate(zip(shapes, m.segments)):
        kind = expected_kind(seg, precision.get(i, "fp16"))
        assert (a["data-backend"], a["data-kind"]) == (seg.backend, kind)
        assert a["fill"] == report.COLOURS[kind]
        assert int(a["data-flops"]) == seg.flops
    assert {a["data-kind"] for a in shapes} == {"npu-fp16", "npu-int8", "cpu", "fallback"}
    hand = page.with_class("path", "handoff")
    assert len(hand) == m.boundaries()
    assert [(h["data-after"], h["data-before"]) for h in hand] == [
        (a.name, b.name) for a, b in zip(m.segments, m.segments[1:]) if a.backend != b.backend
    ]
    # the headline numbers are the plan's
    kpi = {a["data-kpi"]: a["data-value"] for a in page.find("div") if "data-kpi" in a}
    assert kpi == {
        "segments": repr(len(m.segments)),
        "boundaries": repr(m.boundaries()),
        "npu-share": repr(m.npu_flop_share()),
    }
    # the estimate bars are plan.Manifest.estimate_ms, labelled with the profile's name
    parts = page.with_class("rect", "part")
    for phase, chunk in (("decode", parts[:4]), ("prefill", parts[4:])):
        est = m.estimate_ms(phase)
        assert [p["data-part"] for p in chunk] == ["NPU", "CPU segments", "hand-offs", "executor"]
        assert [float(p["data-value"]) for p in chunk] == [
            est["npu"],
            est["cpu"],
            est["handoffs"],
            est["executor"],
        ]
        assert f"{est['total']:.2f} ms/token" in html
    assert page.find("p", data_profile=m.profile["name"]) and "not a measurement" in html
    # the table's figures and the int8 segment's accuracy figures
    for seg in m.segments:
        cells = [x.strip() for t, a, x in _row(page, seg.name)]
        assert [str(seg.ops), str(seg.matmuls), f"{seg.flops / 1e6:.2f}"] == cells[6:9]
    assert "max_rel 0.0123, cosine 0.9993" in html and "rknn build failed: test" in html


def _row(page, name):
    """The cells of the segment table's row for ``name`` (the last table that has one)."""
    items = page.items
    start = max(i for i, (t, a, _) in enumerate(items) if t == "tr" and a.get("data-seg") == name)
    end = next((i for i in range(start + 1, len(items)) if items[i][0] == "tr"), len(items))
    return [it for it in items[start:end] if it[0] in ("td", "span")]


@pytest.mark.slow
def test_hover_and_cpu_reasons(artifact, tmp_path):
    html = _page(artifact, tmp_path / "r.html")
    m = load_manifest(artifact)
    with open(os.path.join(artifact, PLAN)) as f:
        plan = json.load(f)
    hovers = Elements(html).titles("seg", "data-name")
    assert list(hovers) == [s.name for s in m.segments]
    for seg, p in zip(m.segments, plan["segments"]):
        hover = hovers[seg.name]
        assert hover.startswith(f"{seg.name}: ") and f"{seg.ops} ops, {seg.matmuls} MatMuls" in hover
        if seg.backend == "cpu":  # why its ops are on the CPU, counted per segment by the compiler
            assert p["cpu_reasons"] and sum(p["cpu_reasons"].values()) == seg.ops
            for reason, n in p["cpu_reasons"].items():
                assert f"on the CPU: {reason} ({n} ops)" in hover
        else:
            assert "on the CPU" not in hover
    assert external_references(html) == []


def test_no_external_reference_and_small_for_50_segments(tmp_path):
    art = str(tmp_path / "big")
    _fake_artifact(art, layers=24)
    html = _page(art, tmp_path / "r.html", "--size", "bytes")
    assert len(Elements(html).with_class("rect", "seg")) == 50
    assert len(html.encode()) < 1_000_000
    assert external_references(html) == []
    assert external_references('<img src="x.png">') and external_references("a{b:url(x.png)}")
    assert not external_references("a{b:url(data:image/png;base64,AA)}")


def _fake_artifact(folder, layers):
    """A 430M-shaped partition (embed, 24 layers, head; 50 segments) as another compiler version
    might write it: only manifest.json, no plan.json and no segment files."""
    os.makedirs(folder)
    segs, prev = [], "token"
    plan = [("cpu", ["embed"]), ("npu", ["embed", "L0"])]
    for k in range(layers):
        plan += [("cpu", [f"L{k}"]), ("npu", [f"L{k}", f"L{k + 1}" if k + 1 < layers else "head"])]
    for i, (dev, stages) in enumerate(plan):
        out = "logits" if i == len(plan) - 1 else f"t{i}"
        segs.append(
            {
                "name": f"s{i:03d}_{dev}_{'-'.join(stages)}",
                "backend": dev,
                "onnx": f"segments/s{i:03d}.onnx",
                "inputs": [prev],
                "outputs": [out],
                "shapes": {prev: [1, 1024], out: [1, 1024]},
                "stages": stages,
                "ops": 40,
                "matmuls": 7 if dev == "npu" else 0,
                "flops": 2 * 12_582_912 if dev == "npu" else 0,
                "est_ms": 2.5,
            }
        )
        prev = out
    m = Manifest.from_dict(
        {
            "format": "rwkv2rknn-artifact",
            "format_version": 1,
            "model": {"arch": "rwkv4", "layers": layers, "width": 1024, "vocab": 50277},
            "segments": segs,
            "state": [],
            "token_input": "token",
            "logits_output": "logits",
            "profile": {"name": "made-up", "handoff_ms": 0.1},
        }
    )
    with open(os.path.join(folder, MANIFEST), "w") as f:
        json.dump(m.to_dict(), f)


def test_long_check_stays_small():
    from rwkv2rknn.tools.svg import line_plot

    plot = line_plot([1e-3 * (1 + i % 7) for i in range(4096)], "error", "max rel error", ref=(0.05, "tol"))
    assert len(plot) < 100_000 and plot.count("<polyline") == 1 and "<circle" not in plot


@pytest.mark.slow
def test_check_json_written_and_read_back(artifact, tmp_path):
    res = CliRunner().invoke(cli, ["check", artifact, "--backend", "ort", "--tokens", "5", "--per-segment"])
    assert res.exit_code == 0, res.output
    path = os.path.join(artifact, CHECK_JSON)
    assert f"check report saved to {path}" in res.output
    assert not [n for n in os.listdir(artifact) if ".tmp" in n]
    with open(path) as f:
        saved = json.load(f)
    assert saved["backend"] == "ort" and saved["tokens"] == 5 and len(saved["steps"]) == 5
    assert saved["passed"] is True and saved["per_segment"]
    html = _page(artifact, tmp_path / "r.html")
    page = Elements(html)
    points = page.with_class("circle", "point")
    assert [float(p["data-value"]) for p in points] == [s["max_rel"] for s in saved["steps"]]
    assert page.text_of("td", data_check="result") == ["PASS"]
    assert page.text_of("td", data_check="same top token") == [f"{100 * saved['top1_agreement']:.1f}%"]
    kl = saved["quality"]["kl"]
    assert page.text_of("td", data_check="decode path")[0].startswith(f"KL mean {kl['mean']:.3g}, ")
    # the KL histogram: a column per decade for each path, the counts of check.json
    cols = page.with_class("rect", "col")
    for path, rep in (("decode", saved), ("prefill", saved["prefill"])):
        counts = [int(c["data-value"]) for c in cols if c["data-series"] == path]
        assert counts == rep["quality"]["histogram"]["counts"] and sum(counts) == 5
    assert float(page.with_class("line", "ref")[0]["data-value"]) == saved["tolerance"]["max_rel"]
    assert "written for another compile" not in html
    hovers = page.titles("seg", "data-name")
    assert {bool(s["rows"]) for s in saved["per_segment"]} == {False, True}
    for s in saved["per_segment"]:  # each NPU segment's own error (and its T-row variant's)
        assert page.find("tr", data_seg=s["segment"])
        what = "its T-row variant vs the per-token ONNX" if s["rows"] else "this segment alone vs onnxruntime"
        assert f"{what}: max rel error {s['max_rel']:.3g}" in hovers[s["segment"]]
    assert page.text_of("td", data_check="prefill path")[0].startswith(
        f"KL mean {saved['prefill']['quality']['kl']['mean']:.3g}, "
    )
    # a recompile replaces manifest.json: the saved check no longer describes it
    with open(os.path.join(artifact, MANIFEST), "a") as f:
        f.write("\n")
    assert "written for another compile" in _page(artifact, tmp_path / "r2.html")


@pytest.mark.slow
def test_a_check_on_random_ids_shows_its_warning(artifact, tmp_path):
    """The small model cannot read the built-in text (vocabulary 97 < 256 bytes): check falls
    back to random ids, and the page shows check's warning by the result."""
    if os.path.exists(os.path.join(artifact, CHECK_JSON)):  # a check other tests ran on the original
        os.remove(os.path.join(artifact, CHECK_JSON))
    assert 'data-check="warning"' not in _page(artifact, tmp_path / "none.html")
    res = CliRunner().invoke(cli, ["check", artifact, "--backend", "ort", "--tokens", "5"])
    assert res.exit_code == 0, res.output
    with open(os.path.join(artifact, CHECK_JSON)) as f:
        saved = json.load(f)
    page = Elements(_page(artifact, tmp_path / "r.html"))
    assert page.text_of("td", data_check="result") == ["PASS"]
    assert page.text_of("td", data_check="warning") == saved["warnings"]
    assert saved["warnings"][0].startswith("checked on seeded random ids, not text")


@pytest.mark.slow
def test_corrupt_check_json_is_one_line_error(artifact, tmp_path):
    with open(os.path.join(artifact, CHECK_JSON), "w") as f:
        f.write('{"steps": 3')
    res = CliRunner().invoke(cli, ["report", artifact, "-o", str(tmp_path / "r.html")])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "check report" in res.output and "run rwkv2rknn check" in res.output
    assert not os.path.exists(tmp_path / "r.html")


@pytest.mark.slow
def test_bench_figures_are_charted(artifact, tmp_path):
    bench = str(tmp_path / "bench.json")
    res = CliRunner().invoke(
        cli,
        [
            "bench",
            "--layers",
            "2",
            "--width",
            "32",
            "--vocab",
            "61",
            "--tokens",
            "3",
            "--no-rwkv",
            "--json-out",
            bench,
        ],
    )
    assert res.exit_code == 0, res.output
    with open(bench) as f:
        figures = json.load(f)
    page = Elements(_page(artifact, tmp_path / "r.html", "--bench", bench))
    bars = page.with_class("rect", "bar")
    assert [float(b["data-value"]) for b in bars] == [r["ms_per_token"] for r in figures["rows"]]
    assert float(page.with_class("line", "ref")[-1]["data-value"]) == figures["bandwidth_bound_ms"]


@pytest.mark.slow
def test_bad_inputs(artifact, tmp_path):
    not_bench = tmp_path / "nb.json"
    not_bench.write_text('{"rows": []}')
    r = CliRunner()
    res = r.invoke(cli, ["report", artifact, "-o", str(tmp_path / "r.html"), "--bench", str(not_bench)])
    assert res.exit_code == 1 and "not a bench result" in res.output and "Traceback" not in res.output
    res = r.invoke(cli, ["report", str(tmp_path), "-o", str(tmp_path / "r.html")])
    assert res.exit_code == 1 and "manifest.json" in res.output
    res = r.invoke(cli, ["report", artifact, "-o", str(tmp_path / "no" / "r.html")])
    assert res.exit_code == 2 and "does not exist" in res.output
    assert not os.path.exists(tmp_path / "r.html")


@pytest.mark.slow
def test_compile_report(fp32_dir, tmp_path):
    out = str(tmp_path / "art")
    res = CliRunner().invoke(cli, ["compile", fp32_dir, "-o", out, "--plan-only", "--report"])
    assert res.exit_code == 0, res.output
    path = os.path.join(out, report.REPORT_HTML)
    assert f"report written to {path}" in res.output
    with open(path) as f:
        shapes = Elements(f.read()).with_class("rect", "seg")
    assert len(shapes) == len(load_manifest(out).segments)


def test_the_compile_validation_is_shown(artifact, tmp_path):
    """plan.json's validation figures (the compile's own check against its source) on the page."""
    with open(os.path.join(artifact, PLAN)) as f:
        v = json.load(f)["validation"]
    page = _page(artifact, tmp_path / "r.html")
    assert "Compile&#x27;s validation" in page or "Compile's validation" in page
    assert 'data-validation="result">PASS<' in page
    from rwkv2rknn.tools.svg import fmt

    assert f'data-validation="tolerance">{fmt(v["tolerance"])}<' in page
