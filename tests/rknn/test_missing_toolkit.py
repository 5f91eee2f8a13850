"""Without rknn-toolkit2 (not installed, or broken): compile names the install and `--plan-only`;
the plan still runs on onnxruntime."""

import os
import sys

import pytest

from rwkv2rknn.errors import MissingDependency

from helpers.robustness import cli, error_line, partials_in


@pytest.mark.slow
def test_compile_without_the_toolkit_names_the_install(no_toolkit, model, tmp_path):
    out = tmp_path / "art"
    r = cli("compile", model, "-o", out, env=no_toolkit)
    error_line(r, 1, "rknn-toolkit2", "pip install", "--plan-only")
    assert not out.exists() and not partials_in(tmp_path)
    r = cli("compile", model, "-o", out, "--plan-only", env=no_toolkit)
    assert r.returncode == 0, r.err
    r = cli("run", out, "--prompt", "hi", "--max-tokens", "4", "--seed", "0", env=no_toolkit)
    assert r.returncode == 0, r.err
    assert "backend: ort (auto)" in r.err and r.out.startswith("hi")
    r = cli("run", out, "--tokens", "1,2", "--backend", "rknn-sim", env=no_toolkit)
    error_line(r, 1, "rknn-toolkit2 is not installed", "pip install")


def test_toolkit_checks_in_process(monkeypatch, model, tmp_path):
    from rwkv2rknn.compiler.driver import compile_model
    from rwkv2rknn.compiler.ir import Options
    from rwkv2rknn.rknn import toolkit
    from rwkv2rknn.runtime import board

    for name in ("rknn", "rknn.api"):
        monkeypatch.setitem(sys.modules, name, None)  # import rknn -> ImportError
    assert not board.toolkit_available() and not toolkit.toolkit_installed()
    with pytest.raises(MissingDependency, match="pip install"):
        toolkit.import_toolkit()
    with pytest.raises(MissingDependency, match="--plan-only"):
        compile_model(model, str(tmp_path / "a"), Options())
    assert not os.path.exists(tmp_path / "a")
