"""The ``rknn-rt`` runner (librknnrt's C API over ctypes) against a RECORDING STAND-IN library.

There is no RK3588 here, so ``standin_librknnrt.c`` (built below with gcc) stands in for
librknnrt.so: the same C signatures and structure layouts as the public rknn_api.h, every call
recorded with its arguments and structure contents, known outputs. What is checked for real: the
ctypes structures (the C side reads them), the call order, the float32 buffers made once and
reused, the core mask, the T-row shape switching, and release on every failure path.
"""

import ctypes
import os

import numpy as np
import pytest

from rwkv2rknn.errors import BadInput, ToolkitError
from rwkv2rknn.runtime import rknnrt

HERE = os.path.dirname(__file__)
W = 48
PER_TOKEN = f"in x 1,{W}\nin s {W}\nout y 1,{W}\nout s_out {W}\n"
T_ROW = f"in x T,{W}\nin s {W}\nout y T,{W}\nout s_out {W}\n"
SHAPES = {"x": [1, W], "s": [W], "y": [1, W], "s_out": [W]}


@pytest.fixture(scope="module")
def standin(standin_lib):
    """The stand-in librknnrt.so, compiled from C for this test (tests/conftest.py)."""
    return standin_lib()


@pytest.fixture
def log(tmp_path, monkeypatch):
    path = tmp_path / "calls.log"
    monkeypatch.setenv("STANDIN_LOG", str(path))

    def calls():
        out = []
        for line in path.read_text().splitlines() if path.exists() else []:
            name, *kv = line.split()
            out.append((name, dict(x.split("=", 1) for x in kv)))
        return out

    return calls


def _model(tmp_path, text, name="seg.rknn"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_structures_match_the_header_and_the_c_compiler(standin):
    got = (ctypes.c_uint32 * 36)()
    ctypes.CDLL(standin).standin_layout(got)
    a, m = rknnrt.TensorAttr, rknnrt.TensorMem
    ours = (
        [ctypes.sizeof(a)]
        + [
            getattr(a, f).offset
            for f in (
                "n_dims",
                "dims",
                "name",
                "n_elems",
                "size",
                "fmt",
                "type",
                "qnt_type",
                "fl",
                "zp",
                "scale",
                "w_stride",
                "size_with_stride",
                "pass_through",
                "h_stride",
            )
        ]
        + [ctypes.sizeof(m)]
        + [getattr(m, f).offset for f in ("phys_addr", "fd", "offset", "size", "flags", "priv_data")]
        + [ctypes.sizeof(rknnrt.InOutNum), ctypes.sizeof(rknnrt.SdkVersion)]
        + [ctypes.sizeof(rknnrt.Input)]
        + [getattr(rknnrt.Input, f).offset for f in ("buf", "size", "pass_through", "type", "fmt")]
        + [ctypes.sizeof(rknnrt.Output)]
        + [getattr(rknnrt.Output, f).offset for f in ("is_prealloc", "index", "buf", "size")]
    )
    assert ours == list(got)
    # the figures rknn_api.h's field list gives on a 64-bit machine (uint32 dims[16], char name[256])
    assert ctypes.sizeof(a) == 376 and a.name.offset == 72 and a.n_elems.offset == 328
    assert a.zp.offset == 352 and a.pass_through.offset == 368 and a.h_stride.offset == 372
    assert ctypes.sizeof(m) == 40 and m.size.offset == 24 and m.priv_data.offset == 32
    # rknn_input {u32 index; void *buf; u32 size; u8 pass_through; type; fmt} and rknn_output
    # {u8 want_float, is_prealloc; u32 index; void *buf; u32 size} as padded on 64-bit
    assert ctypes.sizeof(rknnrt.Input) == 32 and rknnrt.Input.type.offset == 24
    assert ctypes.sizeof(rknnrt.Output) == 24 and rknnrt.Output.index.offset == 4


def test_per_token_segment_calls_and_outputs(standin, tmp_path, log):
    path = _model(tmp_path, PER_TOKEN)
    r = rknnrt.RknnRtRunner(
        path, "s001", ["x", "s"], ["y", "s_out"], SHAPES, core_mask="0_1_2", lib=standin, io="zero-copy"
    )
    calls = log()
    names = [c[0] for c in calls]
    assert (
        names
        == [
            "rknn_init",
            "rknn_set_core_mask",
            "rknn_query",
            "rknn_query",
            "rknn_query",
            "rknn_query",
            "rknn_query",
        ]
        + ["rknn_create_mem", "rknn_set_io_mem"] * 4
    )
    init = calls[0][1]
    assert init == {"size": str(os.path.getsize(path)), "flag": "0", "extend": "null"}
    assert calls[1][1]["mask"] == "7"  # RKNN_NPU_CORE_0_1_2
    assert [(c[1]["cmd"], c[1]["size"], c[1]["index"]) for c in calls[2:7]] == [
        ("0", "8", "0"),
        ("1", "376", "0"),
        ("1", "376", "1"),
        ("2", "376", "0"),
        ("2", "376", "1"),
    ]
    binds = [c[1] for c in calls if c[0] == "rknn_set_io_mem"]
    assert [
        (b["name"], b["dims"], b["type"], b["size"], b["mem_size"], b["pass_through"]) for b in binds
    ] == [
        ("x", f"1,{W}", "0", str(4 * W), str(4 * W), "0"),
        ("s", str(W), "0", str(4 * W), str(4 * W), "0"),
        ("y", f"1,{W}", "0", str(4 * W), str(4 * W), "0"),
        ("s_out", str(W), "0", str(4 * W), str(4 * W), "0"),
    ]
    rng = np.random.default_rng(0)
    for _ in range(3):
        x = rng.standard_normal((1, W)).astype(np.float32)
        s = rng.standard_normal(W).astype(np.float32)
        out = r.infer({"s": s, "x": x})
        assert list(out) == ["y", "s_out"]
        assert out["y"].dtype == np.float32 and out["y"].shape == (1, W) and out["s_out"].shape == (W,)
        np.testing.assert_allclose(out["y"], 1000 + x + 10 * s, rtol=1e-6)
        np.testing.assert_allclose(out["s_out"], 2000 + x[0] + 10 * s, rtol=1e-6)
    assert [c[0] for c in log()[len(calls) :]] == ["rknn_run"] * 3  # buffers made once, reused
    assert r.sdk_version() == ("2.5.0 (620b20d build@2025-04-01T10:00:00)", "0.9.8")
    n = len(log())
    r.close()
    r.close()
    assert [c[0] for c in log()[n:]] == ["rknn_destroy_mem"] * 4 + ["rknn_destroy"]


def test_t_row_segment_switches_shapes_and_reuses_buffers(standin, tmp_path, log):
    r = rknnrt.RknnRtRunner(
        _model(tmp_path, T_ROW),
        "s001.seq",
        ["x", "s"],
        ["y", "s_out"],
        None,
        rows=(16, 32),
        lib=standin,
        io="zero-copy",
    )
    assert not any(c[0] == "rknn_create_mem" for c in log())  # bound on first use, per row count
    s = np.arange(W, dtype=np.float32)
    seen = []
    for t in (16, 32, 16, 16):
        n = len(log())
        x = np.full((t, W), t, np.float32)
        out = r.infer({"x": x, "s": s})
        assert out["y"].shape == (t, W) and out["y"].dtype == np.float32
        np.testing.assert_allclose(out["y"], 1000 + x + 10 * s)
        seen.append([c for c in log()[n:]])
    first = [c[0] for c in seen[0]]
    assert first == [
        "rknn_set_input_shapes",
        "shape",
        "shape",
        "rknn_query",
        "rknn_query",
        "rknn_query",
        "rknn_query",
    ] + ["rknn_create_mem", "rknn_set_io_mem"] * 4 + ["rknn_run"]
    assert [(c[1]["name"], c[1]["dims"], c[1]["n_elems"]) for c in seen[0] if c[0] == "shape"] == [
        ("x", f"16,{W}", str(16 * W)),
        ("s", str(W), str(W)),
    ]
    assert [c[1]["dims"] for c in seen[1] if c[0] == "shape"] == [f"32,{W}", str(W)]
    assert [c[1]["cmd"] for c in seen[0] if c[0] == "rknn_query"] == ["14", "14", "15", "15"]
    assert [c[1]["size"] for c in seen[0] if c[0] == "rknn_create_mem"] == [
        str(16 * W * 4),
        str(W * 4),
        str(16 * W * 4),
        str(W * 4),
    ]
    # back to 16 rows: shapes set and the same buffers bound again, nothing allocated
    assert [c[0] for c in seen[2]] == ["rknn_set_input_shapes", "shape", "shape"] + [
        "rknn_set_io_mem"
    ] * 4 + ["rknn_run"]
    assert [c[0] for c in seen[3]] == ["rknn_run"]  # same shape: only the run
    with pytest.raises(BadInput, match=r"built for \[16, 32\] rows"):
        r.infer({"x": np.zeros((8, W), np.float32), "s": s})
    n = len(log())
    r.close()
    assert [c[0] for c in log()[n:]] == ["rknn_destroy_mem"] * 8 + ["rknn_destroy"]


@pytest.mark.parametrize("fn", ["rknn_set_core_mask", "rknn_query", "rknn_create_mem", "rknn_set_io_mem"])
def test_every_failure_after_init_releases_the_context(standin, tmp_path, log, fn):
    path = _model(tmp_path, PER_TOKEN + f"fail {fn}\n")
    with pytest.raises(ToolkitError, match=fn):
        rknnrt.RknnRtRunner(
            path, "s001", ["x", "s"], ["y", "s_out"], SHAPES, core_mask="0", lib=standin, io="zero-copy"
        )
    names = [c[0] for c in log()]
    assert names[-1] == "rknn_destroy"
    assert names.count("rknn_destroy_mem") == names.count("rknn_create_mem") - (fn == "rknn_create_mem")


def test_copy_path_calls_and_outputs(standin, tmp_path, log):
    """The documented path: rknn_inputs_set (FLOAT32, pass_through 0), rknn_run,
    rknn_outputs_get (want_float into buffers made once), rknn_outputs_release."""
    r = rknnrt.RknnRtRunner(
        _model(tmp_path, PER_TOKEN), "s001", ["x", "s"], ["y", "s_out"], SHAPES, lib=standin
    )
    assert r.io == "copy"
    assert not any(c[0] in ("rknn_create_mem", "rknn_set_io_mem") for c in log())
    rng = np.random.default_rng(1)
    for _ in range(2):
        n = len(log())
        x = rng.standard_normal((1, W)).astype(np.float32)
        s = rng.standard_normal(W).astype(np.float32)
        out = r.infer({"s": s, "x": x})
        np.testing.assert_allclose(out["y"], 1000 + x + 10 * s, rtol=1e-6)
        np.testing.assert_allclose(out["s_out"], 2000 + x[0] + 10 * s, rtol=1e-6)
        calls = log()[n:]
        assert [c[0] for c in calls] == [
            "rknn_inputs_set",
            "input",
            "input",
            "rknn_run",
            "rknn_outputs_get",
            "output",
            "output",
            "rknn_outputs_release",
        ]
        assert [
            (c[1]["index"], c[1]["size"], c[1]["type"], c[1]["pass_through"])
            for c in calls
            if c[0] == "input"
        ] == [("0", str(4 * W), "0", "0"), ("1", str(4 * W), "0", "0")]
        assert [
            (c[1]["want_float"], c[1]["is_prealloc"], c[1]["size"]) for c in calls if c[0] == "output"
        ] == [("1", "1", str(4 * W))] * 2
    r.close()
    assert log()[-1][0] == "rknn_destroy"


def test_copy_path_t_rows(standin, tmp_path, log):
    r = rknnrt.RknnRtRunner(
        _model(tmp_path, T_ROW), "s001.seq", ["x", "s"], ["y", "s_out"], None, rows=(16, 32), lib=standin
    )
    s = np.arange(W, dtype=np.float32)
    for t in (16, 32, 16):
        n = len(log())
        x = np.full((t, W), t, np.float32)
        out = r.infer({"x": x, "s": s})
        np.testing.assert_allclose(out["y"], 1000 + x + 10 * s)
        names = [c[0] for c in log()[n:]]
        assert names[0] == "rknn_set_input_shapes" and "rknn_inputs_set" in names
    n = len(log())
    r.infer({"x": x, "s": s})  # same rows: no new shapes
    assert [c[0] for c in log()[n:]][0] == "rknn_inputs_set"
    r.close()


@pytest.mark.parametrize(
    "said, code, cause, fix",
    [
        ("failed to open rknpu module, need to insmod rknpu dirver!", -1, "no NPU driver", "dmesg"),
        # a 2.5.0 runtime is newer than any published one: the fix is files built to match it
        ("Invalid RKNN model version 6", -1, "too old for these files", "rknn-toolkit2==2.5.0"),
        (
            "The target platform of model is [RK3566], but current platform is [RK3588]",
            -13,
            "another SoC",
            "--target",
        ),
    ],
)
def test_refused_model_names_its_cause_and_destroys_the_context(
    standin, tmp_path, log, capfd, said, code, cause, fix
):
    """librknnrt's own E RKNN line is read (not printed) and names the cause; a context the
    runtime made before refusing is destroyed."""
    path = _model(tmp_path, PER_TOKEN + f"say {said}\ninit {code}\n")
    with pytest.raises(ToolkitError) as e:
        rknnrt.RknnRtRunner(path, "s001", ["x", "s"], ["y", "s_out"], SHAPES, toolkit="2.5.0", lib=standin)
    assert cause in str(e.value) and said in str(e.value) and "s001" in str(e.value)
    assert fix in e.value.fix
    assert [c[0] for c in log()] == ["rknn_init", "rknn_destroy"]
    assert "E RKNN" not in capfd.readouterr().err  # caught, not shown


def test_a_runtime_older_than_the_published_one_is_told_where_that_is(standin_lib, tmp_path, log):
    path = _model(tmp_path, PER_TOKEN + "say Invalid RKNN model version 6\ninit -1\n")
    with pytest.raises(ToolkitError) as e:
        rknnrt.RknnRtRunner(
            path, "s001", ["x", "s"], ["y", "s_out"], SHAPES, toolkit="2.5.0", lib=standin_lib("1.3.4")
        )
    assert "librknnrt 1.3.4 is too old for these files" in str(e.value)
    assert "download librknnrt.so 2.3.2" in e.value.fix and "aarch64/librknnrt.so" in e.value.fix


def test_refused_model_without_a_message_on_a_machine_without_the_driver(standin, tmp_path, log):
    path = _model(tmp_path, PER_TOKEN + "fail rknn_init\n")
    with pytest.raises(ToolkitError) as e:
        rknnrt.RknnRtRunner(path, "s001", ["x", "s"], ["y", "s_out"], SHAPES, toolkit="2.5.0", lib=standin)
    assert "RKNN_ERR_MODEL_INVALID" in str(e.value)
    assert "no NPU driver" in str(e.value) and "/dev/dri/renderD129" in str(e.value)
    assert [c[0] for c in log()] == ["rknn_init"]  # no context was made: nothing to destroy


def test_missing_library_names_where_it_looked(tmp_path, monkeypatch):
    from rwkv2rknn.errors import MissingDependency
    from rwkv2rknn.runtime import device

    monkeypatch.setenv(device.LIBRKNNRT_ENV, str(tmp_path / "nowhere.so"))
    with pytest.raises(
        MissingDependency, match=r"RWKV2RKNN_LIBRKNNRT names .*nowhere.so, which does not exist"
    ):
        rknnrt.load_library()
    monkeypatch.delenv(device.LIBRKNNRT_ENV)
    monkeypatch.setattr(device, "LIBRKNNRT_PATHS", ("no/such/librknnrt.so",))
    with pytest.raises(
        MissingDependency, match=r"librknnrt.so not found \(looked in .*/no/such/librknnrt.so\)"
    ):
        rknnrt.load_library()


def test_runtime_versions_read_from_the_runtime(standin, tmp_path, log):
    assert rknnrt.runtime_versions(_model(tmp_path, PER_TOKEN), standin) == (
        "2.5.0 (620b20d build@2025-04-01T10:00:00)",
        "0.9.8",
    )
    assert [c[0] for c in log()][-1] == "rknn_destroy"
    from rwkv2rknn.runtime import device

    assert device.librknnrt_version(standin) == "2.5.0"  # the "build@" form of the version string


def test_wrong_io_count_is_one_line_and_released(standin, tmp_path, log):
    path = _model(tmp_path, PER_TOKEN)
    with pytest.raises(BadInput, match="has 2 inputs and 2 outputs, the manifest says 3"):
        rknnrt.RknnRtRunner(path, "s001", ["x", "s", "z"], ["y", "s_out"], SHAPES, lib=standin)
    assert log()[-1][0] == "rknn_destroy"


def test_auto_picks_rknn_rt_where_librknnrt_loads(standin, tmp_path, monkeypatch):
    from rwkv2rknn.runtime import device
    from rwkv2rknn.runtime.hybrid import resolve_backend

    monkeypatch.setenv(device.LIBRKNNRT_ENV, standin)
    assert resolve_backend("auto") == "rknn-rt"
    bad = tmp_path / "librknnrt.so"
    bad.write_bytes(b"not a shared library")
    monkeypatch.setenv(device.LIBRKNNRT_ENV, str(bad))
    assert resolve_backend("auto") != "rknn-rt"  # present but not loadable: the next backend


def test_a_t_row_build_in_columns_gets_columns_and_gives_rows(standin, tmp_path, log):
    from rwkv2rknn.runtime.rows import Columns

    # the .rknn takes [C, T] and gives [1, N, 1, T] (rwkv2rknn.rknn.columns)
    columns = f"in x {W},T\nin s {W}\nout y 1,{W},1,T\nout s_out {W}\n"
    rt = rknnrt.RknnRtRunner(
        _model(tmp_path, columns),
        "s001.seq",
        ["x", "s"],
        ["y", "s_out"],
        None,
        rows=(16, 32),
        lib=standin,
        columns=True,
        io="zero-copy",
    )
    r = Columns(rt)
    assert r.rows == (16, 32) and r.backend == "rknn-rt"
    s = np.arange(W, dtype=np.float32)
    x = np.arange(16 * W, dtype=np.float32).reshape(16, W)
    n = len(log())
    out = r.infer({"x": x, "s": s})
    # the runtime was given x as [W, 16] (columns), and the caller gets rows [16, W] back
    assert [c[1]["dims"] for c in log()[n:] if c[0] == "shape"] == [f"{W},16", str(W)]
    assert out["y"].shape == (16, W)
    # the 4-D output is bound in NCHW (rknn_tensor_format 0), so its bytes are [W, 16]
    binds = [b for c, b in log()[n:] if c == "rknn_set_io_mem" and b["name"] == "y"]
    assert [(b["dims"], b["fmt"]) for b in binds] == [(f"1,{W},1,16", "0")]
    # the stand-in adds 1000 to its first input's flat values: in columns, x.T's
    np.testing.assert_allclose(out["y"], 1000 + x + 10 * np.resize(s, (W, 16)).T)
    with pytest.raises(BadInput, match=r"built for \[16, 32\] rows, got \[8\]"):
        r.infer({"x": np.zeros((8, W), np.float32), "s": s})
    r.close()


def test_a_columns_build_with_a_state_row_of_one_file_layouts(standin, tmp_path, log):
    """A one-file layout's state row [1, C] goes to a columns build as the column [C, 1], beside
    the rows' [C, T]; its one row is not taken for the row count."""
    from rwkv2rknn.runtime.rows import Columns

    columns = f"in x {W},T\nin s {W},1\nout y {W},T\nout s_out {W},T\n"
    r = Columns(
        rknnrt.RknnRtRunner(
            _model(tmp_path, columns),
            "s001.seq",
            ["x", "s"],
            ["y", "s_out"],
            None,
            rows=(2, 16),
            lib=standin,
            columns=True,
        )
    )
    s = np.arange(W, dtype=np.float32).reshape(1, W)
    for t in (2, 16):
        x = np.arange(t * W, dtype=np.float32).reshape(t, W)
        n = len(log())
        out = r.infer({"x": x, "s": s})
        assert [c[1]["dims"] for c in log()[n:] if c[0] == "shape"] == [f"{W},{t}", f"{W},1"]
        assert out["y"].shape == out["s_out"].shape == (t, W)
        np.testing.assert_allclose(out["y"], 1000 + x + 10 * np.resize(s, (W, t)).T)
    with pytest.raises(BadInput, match=r"built for \[2, 16\] rows, got \[8\]"):
        r.infer({"x": np.zeros((8, W), np.float32), "s": s})
    with pytest.raises(ValueError, match=r"rows at once"):
        r.infer({"x": np.zeros((8, W), np.float32), "s": np.zeros((2, W), np.float32)})
    r.close()
