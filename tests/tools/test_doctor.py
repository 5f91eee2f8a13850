"""``rwkv2rknn doctor`` on fake board file trees (there is no board here) and on this machine."""

import json
import os
import shutil

import pytest

from click.testing import CliRunner

from rwkv2rknn.tools.doctor import doctor
from rwkv2rknn.runtime import device

RK3588 = b"xunlong,orangepi-5\0rockchip,rk3588s\0"


@pytest.fixture
def board(tmp_path, standin_lib):
    """A fake board file tree whose librknnrt.so is the stand-in library of a given version."""

    def make(lib_version="2.5.0", **kw):
        root = _board(tmp_path, lib_version=None, **kw)
        if lib_version is not None:
            os.makedirs(os.path.join(root, "usr/lib"))
            shutil.copy(standin_lib(lib_version), os.path.join(root, "usr/lib/librknnrt.so"))
        return root

    return make


def _board(
    tmp_path, compatible=RK3588, driver=b"RKNPU driver: v0.9.8\n", lib_version=b"2.5.0", mem_kb=8_000_000
):
    root = tmp_path / "root"
    (root / "proc/device-tree").mkdir(parents=True)
    (root / "proc/device-tree/compatible").write_bytes(compatible)
    (root / "proc/meminfo").write_text(f"MemTotal: 16000000 kB\nMemFree: 1 kB\nMemAvailable: {mem_kb} kB\n")
    if driver is not None:
        (root / "sys/kernel/debug/rknpu").mkdir(parents=True)
        (root / "sys/kernel/debug/rknpu/version").write_bytes(driver)
    if lib_version is not None:
        (root / "usr/lib").mkdir(parents=True)
        # the shape of librknnrt's own version string, inside other bytes
        (root / "usr/lib/librknnrt.so").write_bytes(
            b"\x7fELF\0junk 1.2\0" + lib_version + b" (c949ad889d@2024-11-07T11:35:33)\0more"
        )
    return str(root)


def _by_name(verdicts):
    return {v.what: v for v in verdicts}


def test_a_ready_board(board):
    v = _by_name(doctor(root=board(), machine="aarch64", environ={}))
    assert all(x.ok for x in v.values()), [x.line() for x in v.values()]
    assert v["SoC"].found.startswith("rk3588")
    assert v["NPU cores"].found.startswith("3 ") and "0_1_2" in v["NPU cores"].found
    assert v["RKNPU driver"].found == "version 0.9.8"
    assert v["librknnrt"].found.endswith("librknnrt.so 2.5.0")
    assert v["free memory"].found == "7.63 GiB"


@pytest.mark.slow
def test_each_problem_is_one_line_with_its_fix(tmp_path, board, fp32_plan_artifact):
    root = board(compatible=b"rockchip,rk3568\0", driver=None, lib_version="1.6.0", mem_kb=10)
    art = str(tmp_path / "art")
    shutil.copytree(fp32_plan_artifact, art)
    m = json.loads(open(os.path.join(art, "manifest.json")).read())
    m["toolkit"] = "2.5.0"
    open(os.path.join(art, "manifest.json"), "w").write(json.dumps(m))
    v = _by_name(doctor(art, root=root, machine="x86_64", environ={}))
    bad = {k for k, x in v.items() if not x.ok}
    assert bad == {"architecture", "SoC", "RKNPU driver", "librknnrt", "free memory", "artifact"}
    assert "compile the model again with --target rk3568" in v["SoC"].line()
    assert "1.6.0, older than rknn-toolkit2" in v["librknnrt"].line()
    assert "download librknnrt.so 2.3.2" in v["librknnrt"].fix
    assert "needs about" in v["free memory"].found and v["free memory"].fix
    assert "--plan-only" in v["artifact"].fix
    assert all("\n" not in x.line() for x in v.values())


def test_unreadable_versions_are_said_not_guessed(board):
    root = board(driver=b"", lib_version="unknown")
    os.unlink(os.path.join(root, "sys/kernel/debug/rknpu/version"))
    os.makedirs(os.path.join(root, "sys/module/rknpu"))
    v = _by_name(doctor(root=root, machine="aarch64", environ={}))
    assert v["RKNPU driver"].ok and "version unreadable" in v["RKNPU driver"].found
    assert v["librknnrt"].ok and "version unreadable" in v["librknnrt"].found
    # no librknnrt at all, and the environment variable wins over the usual places
    os.unlink(os.path.join(root, "usr/lib/librknnrt.so"))
    assert not _by_name(doctor(root=root, machine="aarch64", environ={}))["librknnrt"].ok
    env = {device.LIBRKNNRT_ENV: "/opt/x/librknnrt.so"}
    assert device.librknnrt_path(root, env) == "/opt/x/librknnrt.so"
    # a library the variable names that is not there is FIX, not ok
    v = _by_name(doctor(root=root, machine="aarch64", environ=env))["librknnrt"]
    assert not v.ok and "names /opt/x/librknnrt.so, which does not exist" in v.line()


def test_a_file_that_is_not_a_library_is_fix(tmp_path):
    root = _board(tmp_path)  # usr/lib/librknnrt.so: a version string in junk bytes
    v = _by_name(doctor(root=root, machine="aarch64", environ={}))["librknnrt"]
    assert not v.ok and "cannot load" in v.found and "aarch64 librknnrt.so" in v.found


def test_the_runtime_reports_its_versions_for_the_artifact(board, tmp_path, fp32_plan_artifact):
    """With an artifact, doctor opens its smallest .rknn on the library and reads the runtime's
    and the driver's versions from rknn_query."""
    art = str(tmp_path / "art")
    shutil.copytree(fp32_plan_artifact, art)
    m = json.loads(open(os.path.join(art, "manifest.json")).read())
    npu = [s for s in m["segments"] if s["backend"] == "npu"]
    for i, s in enumerate(npu[:2]):  # stand-in models (the stand-in library reads text)
        s["rknn"] = f"segments/{s['name']}.rknn"
        open(os.path.join(art, s["rknn"]), "w").write("in x 4\nout y 4\n" + "#" * 100 * i)
    m["toolkit"] = "2.5.0"
    open(os.path.join(art, "manifest.json"), "w").write(json.dumps(m))
    v = _by_name(doctor(art, root=board(), machine="aarch64", environ={}))
    assert v["runtime"].ok, v["runtime"].line()
    assert v["runtime"].found == (
        f"librknnrt 2.5.0 (620b20d build@2025-04-01T10:00:00), NPU driver 0.9.8 (loaded {npu[0]['rknn']})"
    )
    # a library that refuses the file: the cause, in one line
    open(os.path.join(art, npu[0]["rknn"]), "w").write(
        "in x 4\nout y 4\nsay Invalid RKNN model version 6\ninit -1\n"
    )
    v = _by_name(doctor(art, root=str(tmp_path / "root"), machine="aarch64", environ={}))
    assert not v["runtime"].ok and "too old for these files" in v["runtime"].found
    assert "Invalid RKNN model version 6" in v["runtime"].found
    # this runtime (2.5.0) is newer than any published one: the fix is a build that matches it
    assert "pip install --no-deps rknn-toolkit2==2.5.0" in v["runtime"].fix


def test_version_helpers():
    assert device.parse_version("RKNPU driver: v0.9.8") == (0, 9, 8)
    assert device.parse_version("2.5.0b1") == (2, 5, 0) and device.parse_version("x") == ()
    assert device.older("1.6.0", "2.5.0") and not device.older("2.5.0", "2.5.0")
    assert not device.older("", "2.5.0")  # unknown is not called older


@pytest.mark.slow
def test_doctor_command_here_exits_1(fp32_plan_artifact):
    from rwkv2rknn.cli import cli

    r = CliRunner().invoke(cli, ["doctor", fp32_plan_artifact])
    assert r.exit_code == 1, r.output
    assert "FIX  architecture" in r.output or "ok   architecture" in r.output
    assert "free memory" in r.output and "Traceback" not in r.output


def _with_rknn_files(src, dst, sizes):
    """A copy of a plan-only artifact whose NPU segments have .rknn files of these sizes (a
    stand-in's text first, so the stand-in library loads the smallest)."""
    shutil.copytree(src, dst)
    m = json.loads(open(os.path.join(dst, "manifest.json")).read())
    segs = [s for s in m["segments"] if s["backend"] == "npu"]
    assert len(segs) >= len(sizes)
    for seg, size in zip(segs, sizes):
        seg["rknn"] = f"segments/{seg['name']}.rknn"
        head = "in x 4\nout y 4\n"
        open(os.path.join(dst, seg["rknn"]), "w").write(head + "#" * (size - len(head)))
    for seg in segs[len(sizes) :]:
        seg["backend"] = "cpu"
    open(os.path.join(dst, "manifest.json"), "w").write(json.dumps(m))
    return dst


def test_npu_weights_past_one_iommu_domain_are_fix(board, tmp_path, fp32_plan_artifact, monkeypatch):
    art = _with_rknn_files(fp32_plan_artifact, str(tmp_path / "art"), [3000, 2500])
    v = _by_name(doctor(art, root=board(), machine="aarch64", environ={}))
    assert v["NPU memory"].ok and "within one 4 GiB IOMMU domain" in v["NPU memory"].found
    monkeypatch.setattr(device, "IOMMU_DOMAIN_BYTES", 4096)  # 5500 bytes: two domains
    v = _by_name(doctor(art, root=str(tmp_path / "root"), machine="aarch64", environ={}))
    got = v["NPU memory"]
    assert not got.ok and "more than one 4 GiB IOMMU domain" in got.found
    assert "need 2 domains" in got.found and "rknn_init cannot place a context" in got.found
    assert "--quant w8a8" in got.fix
    need = device.memory_need(device_manifest(art), art)
    assert need["npu_domains"] == 2 and "2 IOMMU domains" in device.describe_need(need)


def device_manifest(art):
    from rwkv2rknn.runtime.hybrid import load_manifest

    return load_manifest(art)


def test_iommu_domains_are_given_greedily_largest_file_first(tmp_path):
    from types import SimpleNamespace as NS

    sizes = {"a.rknn": 3000, "b.rknn": 2500, "c.rknn": 1500, "d.rknn": 1000, "e.seq.rknn": 900}
    for name, n in sizes.items():
        (tmp_path / name).write_bytes(b"#" * n)

    def seg(backend, rknn, seq_rknn=None):
        return NS(backend=backend, token=NS(rknn=rknn), seq=NS(rknn=seq_rknn))

    m = NS(
        segments=[
            seg("npu", "a.rknn", "e.seq.rknn"),
            seg("npu", "d.rknn"),
            seg("cpu", "x.rknn"),  # not an NPU context
            seg("npu", "c.rknn", ""),
            seg("npu", "b.rknn"),
        ]
    )
    art = str(tmp_path)
    # first fit, largest first: a 3000 -> 0; b 2500 -> 1; c 1500 -> 1 (4000); d 1000 -> 0 (4000);
    # e 900 fits in neither -> 2
    got = device.iommu_domains(m, art, domain_bytes=4096)
    assert got == {"a.rknn": 0, "b.rknn": 1, "c.rknn": 1, "d.rknn": 0, "e.seq.rknn": 2}
    assert device.iommu_domains(m, art) == dict.fromkeys(got, 0)  # 8.9 kB: all in domain 0
    assert device.domain_bytes(m, art, got) == [4000, 4000, 900]
    (tmp_path / "big.rknn").write_bytes(b"#" * 5000)  # larger than a domain: one of its own
    m.segments.append(seg("npu", "big.rknn"))
    got = device.iommu_domains(m, art, domain_bytes=4096)
    assert got["big.rknn"] == 0 and got["a.rknn"] == 1 and len(set(got.values())) == 4


@pytest.mark.parametrize("lib, ok", [("2.3.0", False), ("2.3.2", True), ("2.5.0", True)])
def test_the_newest_published_runtime_is_enough_for_newer_toolkits(
    board, tmp_path, fp32_plan_artifact, lib, ok
):
    """No librknnrt newer than 2.3.2 is published: a board that has it is not told to install a
    2.5.0 it cannot get; an older one is told where 2.3.2 is."""
    art = str(tmp_path / "art")
    shutil.copytree(fp32_plan_artifact, art)
    m = json.loads(open(os.path.join(art, "manifest.json")).read())
    m["toolkit"] = "2.5.0"
    open(os.path.join(art, "manifest.json"), "w").write(json.dumps(m))
    got = _by_name(doctor(art, root=board(lib_version=lib), machine="aarch64", environ={}))["librknnrt"]
    assert got.ok is ok, got.line()
    if not ok:
        assert "download librknnrt.so 2.3.2" in got.fix and device.LIBRKNNRT_URL in got.fix
    elif lib == "2.3.2":
        assert "no runtime is published" in got.found and "self-test decides" in got.found
    else:
        assert "no runtime is published" not in got.found
    assert device.runtime_wanted("2.5.0") == "2.3.2" and device.runtime_wanted("2.2.0") == "2.2.0"
