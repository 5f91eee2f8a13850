"""What the board imports: `doctor` and `run --backend ort` on an unpacked artifact, in a child
process where torch, onnx, onnx-graphsurgeon, onnxconverter-common and rknn-toolkit2 cannot be
imported (a finder that refuses them), give the same text as here with everything installed."""

import os
import subprocess
import sys

import pytest

BLOCK = r"""
import sys

import pytest
FORBIDDEN = ("torch", "onnx", "onnx_graphsurgeon", "onnxconverter_common", "rknn")
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in FORBIDDEN:
            raise ImportError(f"the board has no {name}")
        return None
sys.meta_path.insert(0, Refuse())
from rwkv2rknn.cli import main
sys.argv = ["rwkv2rknn"] + sys.argv[1:]
try:
    main()
finally:
    seen = sorted(m for m in sys.modules if m.split(".")[0] in FORBIDDEN)
    print("IMPORTED " + ",".join(seen), file=sys.stderr)
"""


def _cli(*args, block=True):
    code = (
        BLOCK
        if block
        else "import sys\nfrom rwkv2rknn.cli import main\nsys.argv = ['rwkv2rknn'] + sys.argv[1:]\nmain()"
    )
    env = dict(os.environ, TQDM_DISABLE="1")
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=300
    )


@pytest.mark.slow
def test_run_and_doctor_import_nothing_of_the_compile_side(fp16_artifact, tmp_path):
    import shutil

    art = str(tmp_path / "art")
    shutil.copytree(fp16_artifact, art)
    args = ("run", art, "--backend", "ort", "--tokens", "5,17,30,2,64,9")
    board = _cli(*args)
    assert board.returncode == 0, board.stderr[-2000:]
    assert "IMPORTED \n" in board.stderr or board.stderr.rstrip().endswith("IMPORTED"), board.stderr[-500:]
    here = _cli(*args, block=False)
    assert here.returncode == 0, here.stderr[-2000:]
    assert board.stdout == here.stdout and len(board.stdout) > 3
    doc = _cli("doctor", art, "--backend", "ort")
    assert "ok   self-test:" in doc.stdout, doc.stdout + doc.stderr[-2000:]
    assert doc.stderr.rstrip().endswith("IMPORTED"), doc.stderr[-500:]
    assert "Traceback" not in doc.stderr


def test_the_board_extra_is_requirements_board():
    """setup.cfg's `board` extra and requirements-board.txt pin the same set."""
    import configparser

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(root, "setup.cfg"))
    extra = [x.strip() for x in cfg["options.extras_require"]["board"].splitlines() if x.strip()]
    with open(os.path.join(root, "requirements-board.txt")) as f:
        pins = [x.strip() for x in f if x.strip() and not x.startswith("#")]
    assert extra == pins
    assert all("==" in p for p in pins)
    names = {p.split("==")[0] for p in pins}
    assert not names & {"torch", "onnx", "onnx-graphsurgeon", "rknn-toolkit2", "onnxconverter-common"}
