"""The Rockchip SoCs: the ``--target`` names, which of them share an NPU, and which one this
machine is (from the device tree). Standard library only, and imports nothing of the package:
the board, the compiler and the command line all read it."""

from __future__ import annotations

# What ``--target`` takes: the SoCs rknn-toolkit2 builds for (the compile and profile commands).
TARGETS = ("rk3588", "rk3576", "rk3568", "rk3566", "rk3562")
# SoCs whose NPUs run the same .rknn files (an RK3588S runs what is built for rk3588).
NPU_FAMILY = {
    "rk3588": "rk3588",
    "rk3588s": "rk3588",
    "rk3576": "rk3576",
    "rk3566": "rk356x",
    "rk3568": "rk356x",
    "rk3562": "rk3562",
}


def board_soc(compatible: str = "/proc/device-tree/compatible") -> str:
    """The Rockchip SoC of this machine as a --target name ('rk3588', ...); '' if not known."""
    try:
        with open(compatible, "rb") as f:
            names = f.read().decode("ascii", "replace").split("\0")
    except OSError:
        return ""
    for n in names:
        soc = n.split(",", 1)[1] if n.startswith("rockchip,rk") else ""
        if soc in NPU_FAMILY:
            return "rk3588" if soc == "rk3588s" else soc
    return ""


def same_npu(soc: str, target: str) -> bool:
    """A .rknn built for ``target`` runs on ``soc``."""
    return NPU_FAMILY.get(soc, soc) == NPU_FAMILY.get(target, target)
