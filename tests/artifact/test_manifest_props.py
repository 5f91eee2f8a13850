"""Property tests: whatever a manifest or an .onnx file holds, loading it fails only with BadInput.

- ``Manifest.from_dict`` on arbitrary JSON-like data raises nothing but ``BadInput``;
- a valid manifest round-trips ``to_dict -> from_dict`` (also through JSON text) unchanged;
- a valid manifest dict with a required key dropped or given a wrong type is ``BadInput``;
- random bytes (and cut or bit-flipped real files) as an .onnx give ``BadInput`` from
  ``rwkv2rknn.fileio.load_onnx`` and from the reference runner, never another exception.
"""

import copy
import json
import os
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rwkv2rknn.errors import BadInput
from rwkv2rknn.artifact import plan
from rwkv2rknn.artifact.plan import (
    READS_VERSIONS,
    FORMAT,
    FORMAT_VERSION,
    Build,
    Manifest,
    Segment,
    StateSlot,
)

PROPS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
FILES = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# ------------------------------------------------------------------ arbitrary JSON-like data

# Values that break naive readers, drawn often (random floats rarely hit inf or NaN).
NASTY = [float("inf"), float("-inf"), float("nan"), 1e308, -1, 2**64, True, "", "12", "x", [], {}, None]
scalars = (
    st.sampled_from(NASTY)
    | st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
json_like = st.recursive(
    scalars,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=20,
)

names = st.text(alphabet="abcdefghij_/0123456789", min_size=1, max_size=8)
KEYS = [
    "format",
    "format_version",
    "model",
    "segments",
    "state",
    "token_input",
    "logits_output",
    "tokenizer",
    "target",
    "toolkit",
    "generator",
    "report",
]
SEG_KEYS = [
    "name",
    "backend",
    "onnx",
    "inputs",
    "outputs",
    "shapes",
    "stages",
    "ops",
    "matmuls",
    "flops",
    "rknn",
    "sha256",
    "rknn_sha256",
    "fallback",
]


def _from_dict_only_bad_input(d):
    try:
        m = Manifest.from_dict(d)
    except BadInput as e:
        line = str(e)
        assert line and "\n" not in line and len(line) < 400, line
        return None
    assert isinstance(m, Manifest)
    # what the CLI and the runtime read from a loaded manifest works too
    assert isinstance(m.layers, int) and isinstance(m.vocab, int)
    assert isinstance(m.table(), str) and 0.0 <= m.npu_flop_share() <= 1.0
    return m


@pytest.mark.slow
@PROPS
@given(json_like)
def test_from_dict_of_anything_raises_only_bad_input(d):
    _from_dict_only_bad_input(d)


name_lists = st.lists(st.sampled_from(["token", "x", "y", "logits"]), max_size=3)
shape_maps = st.dictionaries(
    st.sampled_from(["token", "x", "y", "logits"]), st.lists(scalars, max_size=3) | scalars, max_size=4
)
# Valid-looking values often enough that the later field readers are reached too.
_near = {
    "backend": st.sampled_from(["npu", "cpu"]),
    "inputs": name_lists,
    "outputs": name_lists,
    "stages": name_lists,
    "shapes": shape_maps,
    "onnx": st.sampled_from(["a.onnx", "../x", "/abs"]),
}
_SEG_REQ = ("name", "backend", "onnx", "inputs", "outputs", "shapes", "stages")
segment_like = st.fixed_dictionaries(
    {k: _near.get(k, names) | json_like for k in _SEG_REQ},
    optional={k: json_like | names for k in SEG_KEYS + ["est_ms"] if k not in _SEG_REQ},
)
state_like = st.fixed_dictionaries(
    {
        "layer": st.integers(0, 3) | json_like,
        "row": names | json_like,
        "input": st.sampled_from(["x", "y"]) | json_like,
        "output": st.sampled_from(["x", "y"]) | json_like,
    },
    optional={"accumulator": json_like},
)
manifest_like = st.fixed_dictionaries(
    {
        "format": st.just(FORMAT) | json_like,
        "format_version": st.just(FORMAT_VERSION) | json_like,
        "model": st.dictionaries(st.text(max_size=6), json_like, max_size=3) | json_like,
        "segments": st.lists(segment_like, max_size=3) | json_like,
        "state": st.lists(state_like, max_size=3) | json_like,
        "token_input": st.just("token") | json_like,
        "logits_output": st.just("logits") | json_like,
    },
    optional={
        "tokenizer": json_like,
        "target": json_like,
        "toolkit": json_like,
        "generator": json_like,
        "report": json_like,
        "profile": json_like,
    },
)


@pytest.mark.slow
@PROPS
@given(manifest_like)
def test_from_dict_of_manifest_shaped_junk_raises_only_bad_input(d):
    """Junk that gets past the format checks, so that every field reader is reached."""
    _from_dict_only_bad_input(d)


# ------------------------------------------------------------------ valid manifests


@st.composite
def manifests(draw):
    """A valid manifest: a chain of segments, each reading what the token, the state or an
    earlier segment makes; the state outputs and the logits made by some segment."""
    layers = draw(st.integers(1, 3))
    width = draw(st.integers(1, 64))
    token = "token"
    # a slot: a row of the width (()), a row [1, C] (the one-file layouts) or a wkv [H, N, N]
    state = [
        StateSlot(
            i,
            row,
            f"L{i}/in.{row}",
            f"L{i}/out.{row}",
            row in ("aa", "bb"),
            draw(st.sampled_from([(), (1, width), (2, 3, 3)])),
        )
        for i in range(layers)
        for row in draw(st.lists(st.sampled_from(["aa", "bb", "x"]), min_size=1, max_size=3, unique=True))
    ]
    known = [token] + [s.input for s in state]
    needed = [s.output for s in state] + ["logits"]
    n = draw(st.integers(1, 4))
    segs = []
    for i in range(n):
        ins = tuple(draw(st.lists(st.sampled_from(known), min_size=1, max_size=3, unique=True)))
        outs = [f"t{i}_{j}" for j in range(draw(st.integers(1, 2)))]
        if i == n - 1:
            outs += needed  # the last segment makes whatever is still needed
        else:
            outs += draw(st.lists(st.sampled_from(needed), max_size=2, unique=True))
        outs = tuple(dict.fromkeys(outs))
        shapes = {t: tuple(draw(st.lists(st.integers(0, 4096), max_size=3))) for t in ins + outs}
        backend = draw(st.sampled_from(["npu", "cpu"]))
        rknn = draw(st.none() | st.just(f"segments/s{i}.rknn")) if backend == "npu" else None
        segs.append(
            Segment(
                name=f"s{i:03d}_{backend}",
                backend=backend,
                inputs=ins,
                outputs=outs,
                shapes=shapes,
                stages=tuple(
                    draw(
                        st.lists(
                            st.sampled_from(["embed", "L0", "L1", "head"]),
                            min_size=1,
                            max_size=3,
                            unique=True,
                        )
                    )
                ),
                ops=draw(st.integers(0, 10**6)),
                matmuls=draw(st.integers(0, 100)),
                flops=draw(st.integers(0, 10**12)),
                token=Build(
                    onnx=f"segments/s{i:03d}.onnx",
                    rknn=rknn,
                    sha256=draw(st.text("0123456789abcdef", max_size=64)),
                    rknn_sha256=draw(st.text("0123456789abcdef", max_size=64)),
                    fallback=draw(st.text(max_size=20)),
                ),
                seq=Build(layout=draw(st.sampled_from(["", "columns"]))),
            )
        )
        known += list(outs)
    model = {
        "arch": "rwkv4",
        "layers": layers,
        "width": width,
        "vocab": draw(st.integers(2, 70000)),
        "source": draw(st.text(max_size=20)),
        "source_dtype": draw(st.sampled_from(["float16", "float32"])),
    }
    return Manifest(
        model=model,
        segments=tuple(segs),
        state=tuple(state),
        token_input=token,
        logits_output="logits",
        tokenizer=draw(st.none() | st.sampled_from(["bytes", "world"])),
        target=draw(st.sampled_from(["rk3588", "rk3576", "rk3566"])),
        toolkit=draw(st.sampled_from(["", "2.5.0"])),
        generator="rwkv2rknn test",
        report=tuple(draw(st.lists(st.text(max_size=30), max_size=4))),
    )


@pytest.mark.slow
@PROPS
@given(manifests())
def test_valid_manifest_round_trips(m):
    d = m.to_dict()
    assert Manifest.from_dict(d) == m
    assert Manifest.from_dict(json.loads(json.dumps(d))) == m  # through manifest.json's text
    assert Manifest.from_dict(Manifest.from_dict(d).to_dict()) == m


# A segment's keys in manifest.json as formats 1 to 4 write them (flat: the per-token build's
# plain, the T-row build's with "seq_" before them)
SEGMENT_KEYS = {
    "name",
    "backend",
    "onnx",
    "inputs",
    "outputs",
    "shapes",
    "stages",
    "ops",
    "matmuls",
    "flops",
    "rknn",
    "sha256",
    "rknn_sha256",
    "fallback",
    "est_ms",
    "est_prefill_ms",
    "seq_onnx",
    "seq_sha256",
    "seq_rknn",
    "seq_rknn_sha256",
    "seq_rows",
    "seq_fallback",
    "seq_layout",
    "precision",
    "seq_precision",
    "accuracy",
    "precision_note",
    "calib",
    "seq_calib",
    "quant",
    "seq_quant",
    "decode_rows",
    "golden",
    "golden_sha256",
}


def test_a_segments_two_builds_are_written_and_read_under_the_flat_keys():
    """Segment holds one Build per variant (token, seq); manifest.json keeps the flat keys, so
    an artifact reads in the runtimes that came before, and theirs read here."""
    shared = dict(rknn="segments/s0.seq.rknn", rknn_sha256="ab", precision="w8a8", calib="calib/s0.seq")
    seg = Segment(
        "s0",
        "npu",
        ("tok",),
        ("h",),
        {"tok": (1,), "h": (1, 8)},
        ("L0",),
        Build("segments/s0.onnx", "cd", **shared),
        seq=Build("segments/s0.seq.onnx", "ef", rows=(2, 16), layout="columns", **shared),
        decode_rows=2,
    )
    d = seg.to_dict()
    assert set(d) == SEGMENT_KEYS == plan.SEGMENT_KEYS
    assert (d["onnx"], d["sha256"], d["seq_onnx"], d["seq_sha256"]) == (
        "segments/s0.onnx",
        "cd",
        "segments/s0.seq.onnx",
        "ef",
    )
    assert d["rknn"] == d["seq_rknn"] == "segments/s0.seq.rknn" and d["seq_rows"] == (2, 16)
    assert d["seq_layout"] == "columns" and d["seq_precision"] == d["precision"] == "w8a8"
    m = Manifest(model={"arch": "rwkv4"}, segments=(seg,), state=(), token_input="tok", logits_output="h")
    back = Manifest.from_dict(json.loads(json.dumps(m.to_dict()))).segments[0]
    assert back == seg and back.seq == seg.seq and back.token.onnx == "segments/s0.onnx"
    # the flat names read the builds' fields (what the runtime reads)
    assert (back.seq.rknn, back.seq.rows, back.token.rknn, back.token.calib) == (
        back.seq.rknn,
        back.seq.rows,
        back.token.rknn,
        back.token.calib,
    )
    old = {
        k: v
        for k, v in d.items()
        if not k.startswith("seq_") and k not in ("golden", "golden_sha256", "decode_rows")
    }
    first = Manifest.from_dict({**m.to_dict(), "format_version": 1, "segments": [old]}).segments[0]
    assert first.seq == Build() and first.token == seg.token  # a version-1 segment: rows only


def _one_line_refusal(d, version, reads):
    with pytest.raises(BadInput) as e:
        Manifest.from_dict(d)
    line = str(e.value)
    assert (
        "\n" not in line
        and f"has format version {version}, this rwkv2rknn reads versions {reads}" in line
        and "compile the model again" in line
    ), line


def _columns_onnx(m):
    """A T-row build in columns keeps its .seq.onnx, which is then the columns form (version 5)."""
    return any(seg.seq.layout == "columns" and seg.seq.onnx for seg in m.segments)


def _row_state_beside_columns(m):
    """A segment's T-row build in columns takes a state slot [1, C] (what version 3 added)."""
    return any(
        seg.seq.layout == "columns" and slot.input in seg.inputs and len(slot.shape) == 2
        for seg in m.segments
        for slot in m.state
    )


@pytest.mark.slow
@PROPS
@given(manifests())
def test_versions_1_to_5_read_and_6_is_refused_in_one_line(m):
    """Version 2 added T-row builds in columns (`seq_layout`), version 3 such builds that take a
    state row [1, C] beside their rows, version 5 the .seq.onnx of such a build in columns itself.
    A manifest is written as 5 where a columns build keeps its ONNX, 3 only where it holds a row
    state beside columns, else as 2 (older runtimes open it); versions 1-5 read (a version-1
    artifact has row builds only); 6 (and 0) are refused in one line, a reader of 1 and 2 only
    refuses 3 in its one line, a reader of 1-4 refuses 5 in its one line.
    Version 4 (golden vectors) is written only where a segment carries them."""
    d = json.loads(json.dumps(m.to_dict()))
    want = 5 if _columns_onnx(m) else 3 if _row_state_beside_columns(m) else 2
    assert d["format_version"] == m.format_version == want and FORMAT_VERSION == 5
    for version in (1, 2, 3, 4, 5):
        old = copy.deepcopy(d)
        old["format_version"] = version
        if version == 1:
            for seg in old["segments"]:
                seg.pop("seq_layout", None)
        got = Manifest.from_dict(old)
        assert got.to_dict()["format_version"] == (want if version > 1 else 2)
        assert version == 1 or got == m
    for version in (0, 6):
        _one_line_refusal(dict(d, format_version=version), version, "1, 2, 3, 4, 5")
    if want == 5:
        import rwkv2rknn.artifact.plan as plan

        reads = plan.READS_VERSIONS
        plan.READS_VERSIONS = (1, 2, 3, 4)  # the reader before version 5
        try:
            _one_line_refusal(d, 5, "1, 2, 3, 4")
        finally:
            plan.READS_VERSIONS = reads
    if want == 3:
        import rwkv2rknn.artifact.plan as plan

        reads = plan.READS_VERSIONS
        plan.READS_VERSIONS = (1, 2)  # the reader before version 3, with its own message
        try:
            _one_line_refusal(d, 3, "1, 2")
        finally:
            plan.READS_VERSIONS = reads


def test_only_a_row_state_beside_columns_writes_version_3():
    """The same segment and [1, C] slot: rows (2), columns (3); columns with the slot a row of
    the width or a wkv (2); columns with the [1, C] slot read by another segment only (2)."""

    def manifest(layout, shape, reader="s0"):
        slot = StateSlot(0, "x", "in.x", "out.x", shape=shape)
        segs = (
            Segment(
                "s0",
                "npu",
                ("tok",) + (("in.x",) if reader == "s0" else ()),
                ("h",),
                {},
                ("L0",),
                Build("s0.onnx"),
                seq=Build(layout=layout),
            ),
            Segment(
                "s1",
                "cpu",
                ("h",) + (("in.x",) if reader == "s1" else ()),
                ("logits", "out.x"),
                {},
                ("head",),
                Build("s1.onnx"),
            ),
        )
        return Manifest(
            model={"arch": "rwkv7"}, segments=segs, state=(slot,), token_input="tok", logits_output="logits"
        )

    assert manifest("columns", (1, 8)).format_version == 3
    assert manifest("columns", (1, 8)).to_dict()["format_version"] == 3
    assert manifest("", (1, 8)).format_version == 2
    assert manifest("columns", ()).format_version == 2
    assert manifest("columns", (2, 4, 4)).format_version == 2
    assert manifest("columns", (1, 8), reader="s1").format_version == 2


def test_a_columns_build_that_keeps_its_onnx_writes_version_5_and_its_packed_copy_does_not():
    """Version 5: the .seq.onnx of a T-row build in columns is the columns form that was built
    (onnxruntime and the simulator turn rows into columns for it). A packed copy drops the NPU
    segments' ONNX, so the board's older runtimes still open it; rows builds stay below 5."""
    import dataclasses

    def manifest(layout, onnx):
        seg = Segment(
            "s0",
            "npu",
            ("tok",),
            ("logits",),
            {"tok": (1,), "logits": (1, 8)},
            ("L0",),
            Build("s0.onnx"),
            seq=Build(onnx=onnx, rknn="s0.seq.rknn" if layout else None, rows=(2, 16), layout=layout),
        )
        return Manifest(
            model={"arch": "rwkv4"}, segments=(seg,), state=(), token_input="tok", logits_output="logits"
        )

    m = manifest("columns", "s0.seq.onnx")
    assert m.format_version == 5 and Manifest.from_dict(m.to_dict()) == m
    assert manifest("", "s0.seq.onnx").format_version == 2
    packed = dataclasses.replace(
        m,
        segments=tuple(dataclasses.replace(s, seq=dataclasses.replace(s.seq, onnx=None)) for s in m.segments),
    )
    assert packed.format_version == 2
    import rwkv2rknn.artifact.plan as plan

    reads = plan.READS_VERSIONS
    plan.READS_VERSIONS = (1, 2, 3, 4)  # the reader before version 5
    try:
        _one_line_refusal(m.to_dict(), 5, "1, 2, 3, 4")
        assert Manifest.from_dict(packed.to_dict()) == packed
    finally:
        plan.READS_VERSIONS = reads


@st.composite
def junk_inside(draw):
    """A valid manifest dict with the value at one random place (top level, a segment, a shape,
    a state slot; required or optional key) replaced by arbitrary data or removed."""
    d = json.loads(json.dumps(draw(manifests()).to_dict()))
    holders = {
        "top": [d],
        "segment": d["segments"],
        "state": d["state"],
        "shapes": [seg["shapes"] for seg in d["segments"]],
    }
    holder = draw(st.sampled_from(holders[draw(st.sampled_from(sorted(holders)))]))
    key = draw(st.sampled_from(sorted(holder) + ["ops", "est_ms", "report", "profile"]))
    if draw(st.integers(0, 4)) == 0:
        holder.pop(key, None)
    else:
        holder[key] = draw(json_like)
    return d


@pytest.mark.slow
@settings(PROPS, max_examples=400)
@given(junk_inside())
def test_junk_inside_a_valid_manifest_raises_only_bad_input(d):
    _from_dict_only_bad_input(d)


# Values of a type each required field must not have.
WRONG = {
    str: [None, 3, 2.5, ["x"], {"a": 1}],
    list: [None, 3, "abc", {"a": 1}],
    dict: [None, 3, "abc", ["x"]],
    int: [None, "1", 1.5, ["x"], True],
}
TOP_REQUIRED = {
    "format": None,
    "format_version": None,
    "model": dict,
    "segments": list,
    "state": list,
    "token_input": str,
    "logits_output": str,
}
SEG_REQUIRED = {
    "name": str,
    "backend": str,
    "onnx": str,
    "inputs": list,
    "outputs": list,
    "shapes": dict,
    "stages": list,
}
STATE_REQUIRED = {"layer": int, "row": str, "input": str, "output": str}


@st.composite
def broken(draw):
    """(valid manifest dict, the same with one required key dropped or mistyped)."""
    d = json.loads(json.dumps(draw(manifests()).to_dict()))
    bad = copy.deepcopy(d)
    where = draw(st.sampled_from(["top", "segment", "state"]))
    if where == "top":
        holder, required = bad, TOP_REQUIRED
    elif where == "segment":
        holder, required = draw(st.sampled_from(bad["segments"])), SEG_REQUIRED
    else:
        holder, required = draw(st.sampled_from(bad["state"])), STATE_REQUIRED
    key = draw(st.sampled_from(sorted(required)))
    typ = required[key]
    if typ is None or draw(st.booleans()):
        if typ is None and draw(st.booleans()):
            # the version after the newest this rwkv2rknn reads (drawing one it reads made the
            # "broken" manifest a valid one)
            holder[key] = draw(st.sampled_from(["rwkv2rknn-other", 0, max(READS_VERSIONS) + 1, None, "1"]))
        else:
            del holder[key]
    else:
        holder[key] = draw(st.sampled_from(WRONG[typ]))
    return d, bad


@pytest.mark.slow
@PROPS
@given(broken())
def test_mutated_manifest_is_bad_input(pair):
    good, bad = pair
    Manifest.from_dict(good)
    with pytest.raises(BadInput):
        Manifest.from_dict(bad)


@pytest.mark.slow
@PROPS
@given(manifests(), st.data())
def test_mutated_bindings_are_bad_input(m, data):
    """A segment reading a tensor nothing makes, no segments, or a lost state output."""
    d = json.loads(json.dumps(m.to_dict()))
    kind = data.draw(st.sampled_from(["dangling", "empty", "lost", "shape"]))
    if kind == "dangling":
        seg = data.draw(st.sampled_from(d["segments"]))
        seg["inputs"].append("nobody_makes_this")
        seg["shapes"]["nobody_makes_this"] = [1]
    elif kind == "empty":
        d["segments"] = []
    elif kind == "lost":
        for seg in d["segments"]:
            seg["outputs"] = [t for t in seg["outputs"] if t != "logits"]
    else:
        seg = data.draw(st.sampled_from(d["segments"]))
        del seg["shapes"][data.draw(st.sampled_from(seg["inputs"]))]
    with pytest.raises(BadInput):
        Manifest.from_dict(d)


# ------------------------------------------------------------------ .onnx files


@pytest.fixture(scope="module")
def real_onnx(fp32_dir):
    with open(os.path.join(fp32_dir, "mixing_0.onnx"), "rb") as f:
        return f.read()


def _load_onnx_only_bad_input(path):
    from rwkv2rknn.fileio import load_onnx

    try:
        load_onnx(path)
    except BadInput as e:
        assert "\n" not in str(e)
        return False
    return True


@FILES
@given(st.binary(max_size=2048))
def test_random_bytes_as_onnx_is_bad_input(tmp_path, data):
    path = str(tmp_path / "model.onnx")
    with open(path, "wb") as f:
        f.write(data)
    assert not _load_onnx_only_bad_input(path)


@FILES
@given(st.data())
def test_cut_or_flipped_real_onnx_loads_or_is_bad_input(tmp_path, real_onnx, data):
    """A damaged real file may still parse (a flipped weight byte is a valid model): then it
    loads; otherwise it is BadInput. Never another exception."""
    blob = bytearray(real_onnx)
    if data.draw(st.booleans()):
        blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
    else:
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(blob) - 1))
            blob[i] = data.draw(st.integers(0, 255))
    path = str(tmp_path / "model.onnx")
    with open(path, "wb") as f:
        f.write(bytes(blob))
    _load_onnx_only_bad_input(path)


@FILES
@given(
    st.sampled_from(["embed.onnx", "mixing_0.onnx", "mixing_1.onnx", "head.onnx"]),
    st.binary(max_size=1024) | st.sampled_from([b"", b"not onnx\n", b"\x08\x07"]),
)
@pytest.mark.slow
def test_reference_runner_on_random_bytes_is_bad_input(tmp_path_factory, fp32_dir, name, data):
    from rwkv2rknn.runtime.reference import PerLayerModel

    folder = str(tmp_path_factory.mktemp("ref"))
    shutil.rmtree(folder)
    shutil.copytree(fp32_dir, folder)
    with open(os.path.join(folder, name), "wb") as f:
        f.write(data)
    with pytest.raises(BadInput) as e:
        PerLayerModel(folder)
    assert "\n" not in str(e.value)
