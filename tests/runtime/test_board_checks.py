"""The board's checks before it loads an artifact: rknn-toolkit-lite2 missing, an artifact built
for another SoC, the SoC from the device tree."""

import shutil

import pytest

from rwkv2rknn.errors import BadInput

from helpers.robustness import cli, edit_manifest, error_line


@pytest.mark.slow
def test_rknn_lite_off_the_board_names_the_install(two_at_once, tmp_path):
    _, outs, _ = two_at_once
    art = tmp_path / "art"
    shutil.copytree(outs[0], art)
    r = cli("run", art, "--prompt", "hi", "--backend", "rknn-lite")
    error_line(r, 1, "rknn-toolkit-lite2", "pip install rknn-toolkit-lite2", "board")
    edit_manifest(art, lambda d: d.update(target="rk3566"))  # off the board the SoC is unknown
    r = cli("run", art, "--tokens", "1", "--backend", "rknn-lite")
    error_line(r, 1, "rknn-toolkit-lite2")


@pytest.mark.slow
def test_rknn_lite_refuses_an_artifact_built_for_another_soc(plan, tmp_path, monkeypatch):
    from rwkv2rknn.runtime import soc
    from rwkv2rknn.runtime.hybrid import HybridModel

    art = tmp_path / "art"
    shutil.copytree(plan, art)
    monkeypatch.setattr(soc, "board_soc", lambda *a, **k: "rk3588")
    edit_manifest(art, lambda d: d.update(target="rk3566"))
    with pytest.raises(BadInput, match=r"compiled for rk3566, but this board is rk3588.*--target rk3588"):
        HybridModel(str(art), backend="rknn-lite")
    edit_manifest(art, lambda d: d.update(target="rk3588"))  # right SoC: on to the next check
    with pytest.raises(BadInput, match="--plan-only"):
        HybridModel(str(art), backend="rknn-lite")


def test_board_soc_from_the_device_tree(tmp_path):
    from rwkv2rknn.runtime.board import board_soc, same_npu

    f = tmp_path / "compatible"
    f.write_bytes(b"radxa,rock-5b\0rockchip,rk3588s\0")
    assert board_soc(str(f)) == "rk3588"
    f.write_bytes(b"rockchip,rk3566-evb\0rockchip,rk3566\0")
    assert board_soc(str(f)) == "rk3566"
    f.write_bytes(b"raspberrypi,4-model-b\0brcm,bcm2711\0")
    assert board_soc(str(f)) == ""
    assert board_soc(str(tmp_path / "none")) == ""
    assert same_npu("rk3568", "rk3566") and same_npu("rk3588", "rk3588")
    assert not same_npu("rk3588", "rk3566") and not same_npu("rk3576", "rk3588")
