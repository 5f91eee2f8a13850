"""``rwkv2rknn doctor [ARTIFACT]``: is this board ready to run an artifact?

One verdict per thing the board runtime depends on (architecture, SoC and NPU cores, RKNPU
driver, librknnrt against the toolkit that built the files, free memory against the artifact's
need), each with the fix when it is not right. Reads only files (``root`` moves them for tests);
loads nothing, so it also runs on the compile machine (where it says what is missing).
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from typing import List, Optional

from rwkv2rknn.runtime import device

ARCHES = ("aarch64", "arm64")


@dataclass(frozen=True)
class Verdict:
    what: str
    ok: bool
    found: str
    fix: str = ""

    def line(self) -> str:
        text = f"{'ok ' if self.ok else 'FIX'}  {self.what}: {self.found}"
        return text if self.ok or not self.fix else f"{text}: {self.fix}"


def doctor(artifact: Optional[str] = None, root: str = "/", machine: Optional[str] = None,
           environ=None) -> List[Verdict]:
    from rwkv2rknn.runtime.board import _NPU_FAMILY, board_soc, lite_available, same_npu
    manifest = None
    if artifact:
        from rwkv2rknn.runtime.hybrid import load_manifest
        manifest = load_manifest(artifact)
    out = []
    arch = machine or platform.machine()
    out.append(Verdict("architecture", arch in ARCHES, arch,
                       "the board runtime runs on the RK3588 board (aarch64): `rwkv2rknn pack` the "
                       "artifact here and copy it there"))

    soc = board_soc(f"{root.rstrip('/')}/proc/device-tree/compatible")
    target = manifest.target if manifest else "rk3588"
    if not soc:
        out.append(Verdict("SoC", False, "no Rockchip NPU SoC in /proc/device-tree/compatible",
                           "run this on an RK3588 board (Orange Pi 5, Rock 5B, ...)"))
    else:
        out.append(Verdict("SoC", same_npu(soc, target), f"{soc} (artifact built for {target})",
                           f"compile the model again with --target {soc}"))
        cores = device.NPU_CORES.get(_NPU_FAMILY.get(soc, soc), 1)
        masks = {3: "0, 1, 2, 0_1, 0_1_2", 2: "0, 1, 0_1"}.get(cores, "auto")
        out.append(Verdict("NPU cores", True, f"{cores} (--core-mask {masks})"))

    version = device.npu_driver_version(root)
    if version:
        out.append(Verdict("RKNPU driver", True, f"version {version}"))
    elif device.npu_driver_present(root):
        out.append(Verdict("RKNPU driver", True, "present, version unreadable (root can read "
                           "/sys/kernel/debug/rknpu/version)"))
    else:
        out.append(Verdict("RKNPU driver", False, "not found (no /dev/rknpu, /sys/module/rknpu or "
                           "/sys/kernel/debug/rknpu)", "boot a kernel with Rockchip's RKNPU driver "
                           "(the board vendor's or a vendor-kernel Armbian/Ubuntu image)"))

    out.append(_librknnrt(root, environ, manifest.toolkit if manifest else ""))
    out.append(Verdict("rknn-toolkit-lite2", True, "installed (the fallback runner)" if lite_available()
                       else "not installed (optional: used only where librknnrt cannot load)"))

    have = device.mem_available(root)
    if manifest is None:
        out.append(Verdict("free memory", have != 0, device.gib(have) if have >= 0 else "unknown"))
    else:
        need = device.memory_need(manifest, artifact)
        found = (f"{device.gib(have) if have >= 0 else 'unknown'} available, the artifact needs "
                 f"{device.describe_need(need)}")
        out.append(Verdict("free memory", have < 0 or have >= need["total"] * 1.1, found,
                           "close other programs or use a smaller model"))
        missing = [s.name for s in manifest.segments if s.backend == "npu" and not (s.rknn or s.seq_rknn)]
        if missing:
            out.append(Verdict("artifact", False, f"{len(missing)} NPU segment(s) have no .rknn "
                               f"(compiled with --plan-only)", "compile without --plan-only"))
    return out


def _librknnrt(root: str, environ, toolkit: str) -> Verdict:
    path = device.librknnrt_path(root, environ)
    if not path:
        return Verdict("librknnrt", False, "librknnrt.so not found", device.LIBRKNNRT_INSTALL)
    have = device.librknnrt_version(path)
    if device.older(have, toolkit):
        return Verdict("librknnrt", False, f"{path} is {have}, older than rknn-toolkit2 {toolkit} "
                       f"that built the files", f"install librknnrt.so {toolkit} or newer: "
                       f"{device.LIBRKNNRT_INSTALL}")
    against = f" (files built by rknn-toolkit2 {toolkit})" if toolkit else ""
    return Verdict("librknnrt", True, f"{path} {have or 'version unreadable'}{against}")
