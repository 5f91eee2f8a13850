"""Nothing is lost: a compile that fails, is killed (SIGKILL) or interrupted (Ctrl-C, SIGTERM)
leaves the previous output, the build cache and the temporary folders whole, and two compiles
share the cache. Each kill waits for the event it needs (the compile under way, a build
running), not for a fixed time."""

import os
import shutil
import signal

import numpy as np
import pytest

from helpers.robustness import (
    NO_ROWS,
    _scratch_of,
    build_under_way,
    cli,
    compile_under_way,
    error_line,
    partials_in,
    procs_in_group,
    scratch_env,
    scratch_left,
    snapshot,
    start_compile,
    wait_for,
    wait_group,
    whole_artifact,
)


@pytest.mark.slow
def test_foreign_output_folder_is_replaced_only_with_force(model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    error_line(cli("compile", model, "-o", out, "--plan-only"), 1, "holds other files", "--force")
    assert os.listdir(out) == ["notes.txt"]
    r = cli("compile", model, "-o", out, "--plan-only", "--force")
    assert r.returncode == 0, r.err
    assert not os.path.exists(out / "notes.txt")
    whole_artifact(out)
    assert not partials_in(tmp_path)


@pytest.mark.slow
def test_failed_compile_of_a_bad_model_keeps_the_previous_artifact(bad, plan, tmp_path):
    out = tmp_path / "art"
    shutil.copytree(plan, out)
    before = snapshot(out)
    for src in (bad["truncated"], bad["mixed_widths"], bad["conv_dir"], bad["no_mixing_1"]):
        error_line(cli("compile", src, "-o", out, "--plan-only"), 1)
        assert snapshot(out) == before
    whole_artifact(out)
    assert not partials_in(tmp_path)


@pytest.mark.slow
def test_compile_failing_midway_keeps_the_previous_artifact(model1, tmp_path):
    """--strict with a toolkit build that crashes fails inside the build pass, after the new
    artifact's segment files were written: the previous artifact stays as it was."""
    from rwkv2rknn.compiler.driver import compile_model
    from rwkv2rknn.compiler.ir import Options

    out = tmp_path / "art"
    compile_model(model1, str(out), Options(plan_only=True))
    before = snapshot(out)
    cache = tmp_path / "cache"
    tmp = tmp_path / "tmp"
    r = cli(
        "compile",
        model1,
        "-o",
        out,
        "--strict",
        *NO_ROWS,
        env=scratch_env(tmp, RWKV2RKNN_FLOAT_DTYPE="tfloat32", RWKV2RKNN_CACHE=cache),
    )
    error_line(r, 1, "build", "failed", "--strict")
    assert snapshot(out) == before
    whole_artifact(out)
    assert not partials_in(tmp_path)
    assert scratch_left(tmp) == {}  # the build's temporary folders are gone on an error too
    assert not [e for e in os.listdir(cache / "rknn") if not e.endswith(".lock")]


@pytest.mark.slow
def test_stale_partial_folders_of_killed_compiles_are_removed(model, tmp_path):
    """A `.OUT.partial-PID-*` folder whose process is gone is removed by the next compile; one of
    a running process is left alone."""
    pid = 4194000
    while os.path.exists(f"/proc/{pid}"):
        pid -= 1
    dead = tmp_path / f".out.partial-{pid}-abc"
    live = tmp_path / f".out.partial-{os.getppid()}-def"  # our parent: certainly running
    for d in (dead, live):
        d.mkdir()
        (d / "manifest.json").write_text("{half")
    r = cli("compile", model, "-o", tmp_path / "out", "--plan-only")
    assert r.returncode == 0, r.err
    assert not dead.exists() and live.exists()
    whole_artifact(tmp_path / "out")


def test_stale_cache_partials_are_removed(tmp_path):
    from rwkv2rknn.rknn.build import clean_stale_partials

    pid = 4194000
    while os.path.exists(f"/proc/{pid}"):
        pid -= 1
    names = [f"k.rknn.partial-{pid}", f"k.rknn.partial-{os.getpid()}", "k.rknn"]
    for n in names:
        (tmp_path / n).write_bytes(b"x")
    clean_stale_partials(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == sorted(names[1:])


def _whole_or_previous(out, before):
    """OUT is missing (before is None), the previous artifact byte for byte, or a whole new one."""
    if before is None and not os.path.exists(out):
        return "missing"
    if before is not None and snapshot(out) == before:
        whole_artifact(out)
        return "previous"
    whole_artifact(out)
    return "new"


@pytest.mark.slow
def test_killed_compile_loses_nothing_and_the_next_one_reuses_the_cache(model, plan, tmp_path):
    """SIGKILL a compile at several moments (the compile alone, or its whole process group with
    the build child): OUT is missing or whole, cache entries are whole, and the next compile
    succeeds, cleans up, and takes every whole entry from the cache."""
    cache, tmp = tmp_path / "cache", tmp_path / "tmp"
    env = scratch_env(tmp, RWKV2RKNN_CACHE=cache)
    fresh, out = tmp_path / "fresh", tmp_path / "out"
    shutil.copytree(plan, out)  # a complete previous artifact
    before = snapshot(out)
    hit_a_build = False
    # an early kill (once the compile is under way), then two kills while a toolkit build runs
    # (each waits for its event, so a slow machine does not turn them into other kills)
    for in_build, whole_group, target in ((False, False, fresh), (True, False, out), (True, True, out)):
        p = start_compile(model, target, env)
        wait_for((build_under_way(tmp, p.pid) if in_build else compile_under_way(target, p.pid)), p)
        busy = procs_in_group(p.pid) >= 2  # a build child is running
        if p.poll() is None:  # builds side by side and the cache can finish a compile first
            (os.killpg if whole_group else os.kill)(p.pid, signal.SIGKILL)
        p.communicate()
        wait_group(p.pid)
        hit_a_build |= p.returncode == -signal.SIGKILL and busy
        state = _whole_or_previous(target, before if target == out else None)
        if state == "new" and target == out:
            before = snapshot(out)
        rknn = cache / "rknn"
        for e in os.listdir(rknn) if rknn.exists() else []:
            if not whole_group:  # an orphaned build child finishes its entry, whole
                assert e.endswith((".rknn", ".sha256", ".lock")) and ".partial" not in e, e
                assert ".tmp" not in e, e
            if e.endswith(".rknn"):
                assert os.path.getsize(rknn / e) > 0
    assert hit_a_build, "no kill landed while a toolkit build was running"
    whole = {e: (cache / "rknn" / e).read_bytes() for e in os.listdir(cache / "rknn") if e.endswith(".rknn")}
    if busy and p.returncode == -signal.SIGKILL:  # the last kill left its build's folders
        assert [n for n in scratch_left(tmp) if n.startswith(_scratch_of(p.pid))], scratch_left(tmp)
    r = cli("compile", model, "-o", out, *NO_ROWS, env=env)
    assert r.returncode == 0, r.err
    assert scratch_left(tmp) == {}  # the next compile removed what the killed ones left
    m, logits = whole_artifact(out)
    npu = [s for s in m.segments if s.backend == "npu"]
    assert npu and not any(s.token.fallback for s in m.segments)
    # builds are not byte-reproducible: an entry that was reused is still the same bytes, and
    # the artifact got exactly those bytes
    for e, data in whole.items():
        assert (cache / "rknn" / e).read_bytes() == data, f"{e} was rebuilt"
    reused = [s for s in npu if (out / s.token.rknn).read_bytes() in whole.values()]
    assert len(reused) == len(whole)
    note = [x for x in m.report if x.startswith("build:")][0]
    assert f"{len(npu) - len(whole)} built, {len(whole)} from the cache" in note, (note, list(whole))
    assert r.err.count(": cached") == len(whole)
    assert not partials_in(cache / "rknn")
    assert not [p for p in partials_in(tmp_path) if p.startswith(".out.")]  # stale ones removed
    r = cli("compile", model, "-o", fresh, "--plan-only")  # and those beside the other output
    assert r.returncode == 0, r.err
    assert not partials_in(tmp_path)
    from rwkv2rknn.runtime.reference import PerLayerModel

    np.testing.assert_allclose(logits, PerLayerModel(model).logits([1, 5, 9]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "when,whole_group,sig",
    [
        ("under way", True, signal.SIGINT),
        ("building", False, signal.SIGINT),
        ("building", True, signal.SIGTERM),
    ],
    ids=["ctrl-c-early-group", "sigint-during-build", "sigterm-during-build"],
)
@pytest.mark.slow
def test_ctrl_c_exits_130_and_loses_nothing(model, plan, tmp_path, when, whole_group, sig):
    """Ctrl-C (SIGINT) exits 130, SIGTERM 143, each with one line; the previous artifact, the
    cache and the temporary folders are as they were. SIGTERM lands while a build runs (its
    temporary folders listed there before it)."""
    cache, tmp = tmp_path / "cache", tmp_path / "tmp"
    out = tmp_path / "out"
    shutil.copytree(plan, out)
    before = snapshot(out)
    p = start_compile(model, out, scratch_env(tmp, RWKV2RKNN_CACHE=cache))
    wait_for(build_under_way(tmp, p.pid) if when == "building" else compile_under_way(out, p.pid), p)
    during = scratch_left(tmp)
    (os.killpg if whole_group else os.kill)(p.pid, sig)
    _, err = p.communicate(timeout=300)
    wait_group(p.pid)
    err = err.decode("utf-8", "replace")
    code, word = (130, "interrupted") if sig == signal.SIGINT else (143, "terminated")
    assert p.returncode == code, err
    assert err.strip().splitlines()[-1] == word and "Traceback" not in err, err
    assert snapshot(out) == before
    assert not partials_in(tmp_path)
    assert not partials_in(cache / "rknn")
    if sig == signal.SIGTERM:
        assert any(n.startswith(_scratch_of(p.pid)) for n in during), during
    assert scratch_left(tmp) == {}, (during, err)


@pytest.mark.slow
def test_two_compiles_share_the_cache(two_at_once, model):
    """Both succeed; the cache holds only whole entries, and each is byte for byte the .rknn
    that one of the artifacts got (builds are not byte-reproducible, so this is one build)."""
    from rwkv2rknn.runtime.hybrid import load_manifest

    cache, outs, results = two_at_once
    for code, out, err in results:
        assert code == 0, err
        assert "fell back" not in out and "Traceback" not in err
    assert scratch_left(cache.parent / "at-once-tmp") == {}  # TMPDIR as it was before them
    names = os.listdir(cache / "rknn")  # entries, their checksums and locks; no partial files
    assert names and all(e.endswith((".rknn", ".sha256", ".lock")) for e in names), names
    entries = [e for e in names if e.endswith(".rknn")]
    got = []
    for art in outs:
        m, _ = whole_artifact(art)
        npu = [s for s in m.segments if s.backend == "npu"]
        assert npu and all(s.token.rknn for s in npu)
        got += [(art / s.token.rknn).read_bytes() for s in npu]
    assert len(entries) == len(got) // 2  # one entry per NPU segment of the (one) model
    for e in entries:
        data = (cache / "rknn" / e).read_bytes()
        assert data and data in got, e
    a, b = load_manifest(outs[0]), load_manifest(outs[1])
    assert [s.token.sha256 for s in a.segments] == [s.token.sha256 for s in b.segments]  # the same plan
