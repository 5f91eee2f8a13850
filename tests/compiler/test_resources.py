"""resources: a compile that would not fit in memory or on disk is refused before any work, in
one line that says what is needed, what is free and what to do (free readings injected)."""

import os

import pytest

from rwkv2rknn.compiler import resources
from rwkv2rknn.compiler.driver import compile_model
from rwkv2rknn.errors import ResourceError
from rwkv2rknn.compiler.ir import Options


def test_model_size_counts_fp16_files_as_fp32(fp16_dir, fp32_dir):
    a, b = resources.model_size(fp16_dir), resources.model_size(fp32_dir)
    files = [f for f in os.listdir(fp16_dir) if f.endswith(".onnx")]
    assert a.files == b.files == len(files)
    assert a.total == 2 * sum(os.path.getsize(os.path.join(fp16_dir, f)) for f in files)
    assert 0.8 < a.total / b.total < 1.25  # both are the fp32 weights, within the files' overhead
    assert a.largest == max(2 * os.path.getsize(os.path.join(fp16_dir, f)) for f in files)


def test_too_little_memory_is_refused_in_one_line(fp16_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(resources, "memory_available", lambda: 300 << 20)
    out = tmp_path / "art"
    with pytest.raises(ResourceError) as e:
        compile_model(fp16_dir, str(out), Options(plan_only=True))
    msg = str(e.value)
    assert "\n" not in msg and "memory" in msg and "0.3 GB is available" in msg
    assert "--plan-only" in msg and "fewer compiles" in msg and "more memory" in msg
    assert not out.exists() and not os.listdir(tmp_path)


@pytest.mark.slow
def test_too_little_disk_is_refused_before_writing(fp16_dir, tmp_path, monkeypatch):
    size = resources.model_size(fp16_dir)
    need = resources.artifact_bytes(size, True)
    monkeypatch.setattr(resources, "disk_free", lambda path: need // 2)
    out = tmp_path / "deep" / "art"
    with pytest.raises(ResourceError) as e:
        compile_model(fp16_dir, str(out), Options(plan_only=True))
    msg = str(e.value)
    assert "\n" not in msg and "of disk in" in msg and str(tmp_path / "deep") in msg
    assert resources._gb(need) in msg and "-o" in msg
    assert not os.listdir(tmp_path)
    monkeypatch.setattr(resources, "disk_free", lambda path: need + 1)  # just enough: it compiles
    compile_model(fp16_dir, str(out), Options(plan_only=True))
    assert (out / "manifest.json").exists()


@pytest.mark.slow
def test_a_full_disk_while_writing_is_one_error(fp16_dir, tmp_path, monkeypatch):
    """The estimate said yes, the disk said no (ENOSPC): a ResourceError, nothing left."""
    from rwkv2rknn import fileio

    real = fileio.save_onnx
    calls = []

    def full(model, path, **kw):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(model, path, **kw)

    monkeypatch.setattr(fileio, "save_onnx", full)
    out = tmp_path / "art"
    with pytest.raises(ResourceError, match="ran full while writing"):
        compile_model(fp16_dir, str(out), Options(plan_only=True))
    assert not os.listdir(tmp_path)


def test_build_jobs_follow_cores_and_memory(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(resources, "memory_available", lambda: 64 << 30)
    assert resources.build_jobs(50 << 20, 10) == 2
    assert resources.build_jobs(50 << 20, 1) == 1
    monkeypatch.setattr(resources, "memory_available", lambda: resources.build_memory(50 << 20))
    assert resources.build_jobs(50 << 20, 10) == 1  # room for one: never zero


@pytest.mark.slow
def test_peak_rss_counts_children_and_the_phase_they_ran_in():
    """The bench's memory figure is the process tree's: a child holding 300 MB shows up in the
    phase it ran in, not in the others."""
    import subprocess
    import sys
    from rwkv2rknn.compiler.resources import PeakRss

    with PeakRss(every=0.05) as mem:
        mem.mark("quiet")
        mem.mark("child")
        subprocess.run(
            [
                sys.executable,
                "-c",
                "import time; b = bytearray(300 << 20); b[::4096] = b'x' * len(b[::4096]); time.sleep(1.0)",
            ],
            check=True,
        )
        mem.mark("after")
    assert mem.phases["child"] - mem.phases["quiet"] > 250 << 20
    assert mem.phases["after"] < mem.phases["child"] - (250 << 20)
    assert mem.peak == max(mem.phases.values())


def test_compile_starts_again_with_its_heap_on_huge_pages(monkeypatch):
    """`rwkv2rknn compile` re-executes itself once with glibc.malloc.hugetlb=1 (read only when a
    process starts); with the setting there (or for other commands) it runs as it is."""
    import sys

    from rwkv2rknn.cli import app
    import signal

    calls = []

    def execve(exe, argv, env):  # Ctrl-C is held over the exec, until the command takes it
        calls.append((argv, env))
        assert {signal.SIGINT, signal.SIGTERM} <= signal.pthread_sigmask(signal.SIG_BLOCK, [])
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})

    monkeypatch.setattr(app.os, "execve", execve)
    monkeypatch.setattr(app, "cli", lambda **kw: calls.append("ran"))
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.setattr(sys, "argv", ["rwkv2rknn", "compile", "m/", "-o", "a/"])
    app.main()
    (argv, env), ran = calls
    assert argv == [sys.executable, "-m", "rwkv2rknn", "compile", "m/", "-o", "a/"] and ran == "ran"
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    calls.clear()
    monkeypatch.setenv("GLIBC_TUNABLES", env["GLIBC_TUNABLES"])
    app.main()
    monkeypatch.setattr(sys, "argv", ["rwkv2rknn", "run", "a/", "--prompt", "x"])
    monkeypatch.delenv("GLIBC_TUNABLES")
    app.main()
    assert calls == ["ran", "ran"]
