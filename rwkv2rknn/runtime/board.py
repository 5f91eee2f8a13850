"""What this machine can run: the Rockchip SoC it is (from the device tree) and which RKNN
runtimes import here. Standard library only: the board imports it.
"""

from __future__ import annotations

import importlib.util

# the SoC's identity lives below this module (runtime.soc); its names stay importable from here
from rwkv2rknn.runtime.soc import NPU_FAMILY as _NPU_FAMILY  # noqa: F401
from rwkv2rknn.runtime.soc import board_soc, same_npu  # noqa: F401


def has_module(module: str) -> bool:
    """``module`` can be found (a broken or shadowed parent package counts as missing)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


BACKENDS = ("auto", "ort", "rknn-sim", "rknn-rt", "rknn-lite")  # where NPU segments run
BOARD_BACKENDS = ("rknn-rt", "rknn-lite")  # the NPU runners that load .rknn files


def rt_available() -> bool:
    """librknnrt.so loads here (the ``rknn-rt`` runner, the board's default)."""
    from rwkv2rknn.runtime.rknnrt import available

    return available()


def core_mask_for(seg, manifest, requested: str = "auto") -> str:
    """The NPU cores of a segment: ``requested`` unless it is 'auto'; then every core of an
    RK3588 (0_1_2) for a segment the artifact's device profile calls large, else the runtime's
    own choice ('auto')."""
    if requested != "auto" or manifest.target != "rk3588":
        return requested
    from rwkv2rknn.artifact.profile import DeviceProfile

    prof = DeviceProfile.from_dict(manifest.profile) if manifest.profile else DeviceProfile()
    weight_bytes = seg.flops / 2 * prof.npu_weight_bytes  # per-token MatMul FLOPs = 2 x weights
    return "0_1_2" if prof.npu_cores_for(weight_bytes) >= 3 else "auto"


def lite_available() -> bool:
    """rknn-toolkit-lite2 (the board's NPU runtime) is installed."""
    return has_module("rknnlite.api")


def toolkit_available() -> bool:
    """rknn-toolkit2's simulator can run here (it needs torch too)."""
    return has_module("rknn.api") and has_module("torch")
