"""A training run stopped part way (--stop-at) and resumed (--resume) ends with the same weights
as the same run straight through, so that a long run (the 4000-step RWKV-7) can be done in parts."""

import os
import random
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = os.path.join(ROOT, "training", "train.py")

pytestmark = pytest.mark.slow  # three training processes, each imports torch


def _train(tmp_path, out, *extra, **kw):
    args = [
        sys.executable, TRAIN, "--data", str(tmp_path / "text.txt"), "--version", "7",
        "--layers", "2", "--width", "32", "--head-size", "16", "--ctx", "16", "--batch", "2",
        "--steps", "6", "--eval-every", "0", "--threads", "1", "--out", str(tmp_path / out),
    ]  # fmt: skip
    return subprocess.run(args + list(extra), capture_output=True, text=True, timeout=600, **kw)


@pytest.fixture
def text(tmp_path):
    rnd = random.Random(3)
    words = "the of and to a in that it was her she he not be his as had with for you but".split()
    (tmp_path / "text.txt").write_text(" ".join(rnd.choice(words) for _ in range(4000)))
    return tmp_path


def test_a_run_in_two_parts_gives_the_same_weights_as_one(text):
    assert _train(text, "whole.pth").returncode == 0
    first = _train(text, "parts.pth", "--stop-at", "3")
    assert first.returncode == 0, first.stderr
    assert "stopped at step 3 of 6" in first.stdout
    assert os.path.exists(text / "parts.pth.resume") and not os.path.exists(text / "parts.pth")
    # other arguments than the stopped run's are refused, and the run's state stays
    bad = _train(text, "parts.pth", "--resume", "--lr", "1e-3")
    assert bad.returncode != 0 and "--lr 0.002" in bad.stderr and "Traceback" not in bad.stderr
    rest = _train(text, "parts.pth", "--resume")
    assert rest.returncode == 0, rest.stderr
    assert "resumed at step 3 of 6" in rest.stdout
    assert not os.path.exists(text / "parts.pth.resume")  # complete: nothing left to resume
    whole = torch.load(text / "whole.pth")
    parts = torch.load(text / "parts.pth")
    assert whole.keys() == parts.keys()
    assert all(torch.equal(whole[k], parts[k]) for k in whole)


def test_resume_without_a_stopped_run_says_so(text):
    r = _train(text, "none.pth", "--resume")
    assert r.returncode != 0 and "no run to resume" in r.stderr and "Traceback" not in r.stderr
