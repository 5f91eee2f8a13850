"""The report rendered by a real browser: headless Chromium (Debian's `chromium` package) takes a
screenshot, read back with a small PNG reader. Not part of `make test`: run `make browser-test`
(it installs chromium with apt-get first). Deselected by default (setup.cfg: -m "not browser")."""

import os
import shutil
import subprocess

import numpy as np
import pytest

from helpers.pngread import read_png
from helpers.report_page import alter_segments, copy_artifact
from rwkv2rknn.tools import report, report_html

pytestmark = pytest.mark.browser

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


def chromium() -> str:
    exe = shutil.which("chromium") or "/usr/bin/chromium"
    if not os.path.exists(exe):
        pytest.fail("chromium is not installed: run `make browser-test` (apt-get install -y chromium)")
    return exe


def offline() -> list:
    """Run the browser with no network at all where a network namespace can be made."""
    try:
        ok = subprocess.run(["unshare", "-n", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        ok = False
    return ["unshare", "-n"] if ok else []


def screenshot(html: str, folder, size=(1040, 1300)) -> np.ndarray:
    png = os.path.join(folder, os.path.basename(html) + ".png")
    profile = os.path.join(folder, "profile-" + os.path.basename(html))
    os.makedirs(profile)  # a new, empty profile for every run
    cmd = offline() + [
        chromium(),
        *FLAGS,
        f"--user-data-dir={profile}",
        f"--window-size={size[0]},{size[1]}",
        f"--screenshot={png}",
        "file://" + html,
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert os.path.exists(png), f"no screenshot (exit {res.returncode}): {res.stderr[-500:]}"
    return read_png(png)[..., :3]


def pixels_of(img: np.ndarray, colour: str) -> int:
    rgb = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)], np.uint8)
    return int((img.reshape(-1, 3) == rgb).all(1).sum())


def test_report_renders_with_segment_colours(fp32_plan_artifact, tmp_path):
    plain = copy_artifact(fp32_plan_artifact, str(tmp_path / "plain"))
    mixed = copy_artifact(fp32_plan_artifact, str(tmp_path / "mixed"))
    alter_segments(mixed, fallback=3, int8=1, accuracy={"max_rel": 0.01})
    shots = {}
    for art in (plain, mixed):
        out = str(tmp_path / (os.path.basename(art) + ".html"))
        report_html.write_report(art, out)
        shots[art] = screenshot(out, str(tmp_path))
    for art, img in shots.items():
        white = (img == 255).all(-1).mean()
        assert 0.02 < 1 - white, "the screenshot is blank"
        assert len(np.unique(img.reshape(-1, 3), axis=0)) > 20, "the screenshot has hardly any colours"
        strip = report.load(art).segs
        for kind in {v.kind for v in strip}:  # every kind of segment shows in its colour
            assert pixels_of(img, report.COLOURS[kind]) > 300, kind
        assert pixels_of(img, report.HANDOFF) > 100
    for kind in ("fallback", "npu-int8"):  # and only where there is such a segment
        assert pixels_of(shots[plain], report.COLOURS[kind]) == 0
        assert pixels_of(shots[mixed], report.COLOURS[kind]) > 300
