"""``rwkv2rknn doctor [ARTIFACT]``: is this board ready to run an artifact?

One verdict per thing the board runtime depends on (architecture, SoC and NPU cores, RKNPU
driver, librknnrt against the toolkit that built the files, free memory against the artifact's
need), each with the fix when it is not right. Reads files (``root`` moves them for tests) and
loads librknnrt: with an artifact, the runtime itself reports its version and the NPU driver's
(``rknn_query`` on the artifact's smallest .rknn), compared with the manifest. It also runs on
the compile machine (where it says what is missing). The self-test of an artifact's segments
against their golden vectors is rwkv2rknn.runtime.selftest (``rwkv2rknn doctor ARTIFACT`` runs it).
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


def doctor(
    artifact: Optional[str] = None, root: str = "/", machine: Optional[str] = None, environ=None
) -> List[Verdict]:
    from rwkv2rknn.runtime.board import _NPU_FAMILY, board_soc, lite_available, same_npu

    manifest = None
    if artifact:
        from rwkv2rknn.runtime.hybrid import load_manifest

        manifest = load_manifest(artifact)
    out = []
    arch = machine or platform.machine()
    out.append(
        Verdict(
            "architecture",
            arch in ARCHES,
            arch,
            "the board runtime runs on the RK3588 board (aarch64): `rwkv2rknn pack` the "
            "artifact here and copy it there",
        )
    )

    soc = board_soc(f"{root.rstrip('/')}/proc/device-tree/compatible")
    target = manifest.target if manifest else "rk3588"
    if not soc:
        out.append(
            Verdict(
                "SoC",
                False,
                "no Rockchip NPU SoC in /proc/device-tree/compatible",
                "run this on an RK3588 board (Orange Pi 5, Rock 5B, ...)",
            )
        )
    else:
        out.append(
            Verdict(
                "SoC",
                same_npu(soc, target),
                f"{soc} (artifact built for {target})",
                f"compile the model again with --target {soc}",
            )
        )
        cores = device.NPU_CORES.get(_NPU_FAMILY.get(soc, soc), 1)
        masks = {3: "0, 1, 2, 0_1, 0_1_2", 2: "0, 1, 0_1"}.get(cores, "auto")
        out.append(Verdict("NPU cores", True, f"{cores} (--core-mask {masks})"))

    version = device.npu_driver_version(root)
    if version:
        out.append(Verdict("RKNPU driver", True, f"version {version}"))
    elif device.npu_driver_present(root) or device.npu_device_present(root):
        out.append(
            Verdict(
                "RKNPU driver",
                True,
                "present, version unreadable (root can read /sys/kernel/debug/rknpu/version)",
            )
        )
    else:
        out.append(
            Verdict(
                "RKNPU driver",
                False,
                "not found (no /dev/rknpu, /dev/dri/renderD129, "
                "/sys/module/rknpu or /sys/kernel/debug/rknpu)",
                device.NO_DRIVER_FIX,
            )
        )

    out.extend(_librknnrt(root, environ, manifest, artifact))
    out.append(
        Verdict(
            "rknn-toolkit-lite2",
            True,
            "installed (the fallback runner)"
            if lite_available()
            else "not installed (optional: used only where librknnrt cannot load)",
        )
    )

    have = device.mem_available(root)
    if manifest is None:
        out.append(Verdict("free memory", have != 0, device.gib(have) if have >= 0 else "unknown"))
    else:
        need = device.memory_need(manifest, artifact)
        found = (
            f"{device.gib(have) if have >= 0 else 'unknown'} available, the artifact needs "
            f"{device.describe_need(need)}"
        )
        out.append(
            Verdict(
                "free memory",
                have < 0 or have >= need["total"] * 1.1,
                found,
                "close other programs or use a smaller model",
            )
        )
        npu = device.npu_weight_bytes(manifest, artifact)
        if npu > device.IOMMU_DOMAIN_BYTES:
            per_domain = device.domain_bytes(manifest, artifact)
            spread = ", ".join(device.gib(b) for b in per_domain)
            out.append(
                Verdict(
                    "NPU memory",
                    False,
                    f"the .rknn files hold {device.gib(npu)}, more than "
                    f"one 4 GiB IOMMU domain of the RK3588 NPU: they need {len(per_domain)} "
                    f"domains ({spread}), and {device.NO_DOMAIN_CHOICE}",
                    "use --quant w8a8 or a smaller model, so the NPU weights fit in 4 GiB",
                )
            )
        elif npu:
            out.append(
                Verdict(
                    "NPU memory",
                    True,
                    f"the .rknn files hold {device.gib(npu)}, within one 4 GiB IOMMU domain",
                )
            )
        missing = [
            s.name for s in manifest.segments if s.backend == "npu" and not (s.token.rknn or s.seq.rknn)
        ]
        if missing:
            out.append(
                Verdict(
                    "artifact",
                    False,
                    f"{len(missing)} NPU segment(s) have no .rknn (compiled with --plan-only)",
                    "compile without --plan-only",
                )
            )
    return out


def _librknnrt(root: str, environ, manifest, artifact) -> List[Verdict]:
    """The library: found, loadable, its version against the toolkit's; with an artifact, the
    versions the runtime itself reports for the artifact's smallest .rknn."""
    import os

    toolkit = manifest.toolkit if manifest else ""
    missing = device.librknnrt_missing(root, environ)
    if missing:
        return [Verdict("librknnrt", False, missing, device.LIBRKNNRT_INSTALL)]
    path = device.librknnrt_path(root, environ)
    from rwkv2rknn.errors import Rwkv2RknnError as RwkvError
    from rwkv2rknn.runtime import rknnrt

    try:
        rknnrt.load_library(path)
    except RwkvError as e:
        return [Verdict("librknnrt", False, e.problem, e.fix)]
    have = device.librknnrt_version(path)
    if device.runtime_too_old(have, toolkit):
        return [
            Verdict(
                "librknnrt",
                False,
                f"{path} is {have}, older than rknn-toolkit2 {toolkit} that built the files",
                device.LIBRKNNRT_INSTALL,
            )
        ]
    against = f" (files built by rknn-toolkit2 {toolkit})" if toolkit else ""
    if device.older(have, toolkit):  # the newest runtime published, older than the toolkit
        against = (
            f" (files built by rknn-toolkit2 {toolkit}, for which no runtime is published; "
            f"{have} reads their format, version {device.RUNTIME_FORMAT}: the self-test "
            f"decides)"
        )
    out = [Verdict("librknnrt", True, f"{path} {have or 'version unreadable'}{against}")]
    files = sorted(
        {
            f
            for s in (manifest.segments if manifest else ())
            if s.backend == "npu"
            for f in (s.token.rknn, s.seq.rknn)
            if f and os.path.isfile(os.path.join(artifact, f))
        },
        key=lambda f: os.path.getsize(os.path.join(artifact, f)),
    )
    if files:
        try:
            api, drv = rknnrt.runtime_versions(os.path.join(artifact, files[0]), path)
        except RwkvError as e:
            return out + [Verdict("runtime", False, f"{files[0]}: {e.problem}", e.fix)]
        version = device.version_in(api) or api
        if device.runtime_too_old(version, toolkit):
            return out + [
                Verdict(
                    "runtime",
                    False,
                    f"librknnrt reports {api}, driver {drv}; the files were built by rknn-toolkit2 {toolkit}",
                    device.LIBRKNNRT_INSTALL,
                )
            ]
        out.append(
            Verdict("runtime", True, f"librknnrt {api}, NPU driver {drv or 'unknown'} (loaded {files[0]})")
        )
    return out


def selftest(artifact: str, backend: str = "auto", rknn_io: str = "auto", echo=None) -> List[Verdict]:
    """The artifact's NPU segments on ``backend`` against their golden vectors (every check a
    line to ``echo``), recorded beside the artifact; one verdict."""
    from rwkv2rknn.errors import Rwkv2RknnError
    from rwkv2rknn.runtime import selftest as st
    from rwkv2rknn.runtime.hybrid import HybridModel, load_manifest, resolve_backend

    m = load_manifest(artifact)
    if not any(s.golden for s in m.segments):
        return [
            Verdict(
                "self-test",
                True,
                "not run: the artifact has no golden vectors (compiled "
                "with --plan-only or by an older rwkv2rknn)",
            )
        ]
    try:
        chosen = resolve_backend(backend)
        model = HybridModel(artifact, backend=chosen, rknn_io=rknn_io)
    except Rwkv2RknnError as e:
        return [Verdict("self-test", False, f"not run: {e.problem}", e.fix)]
    try:
        paths = ("copy", "zero-copy") if chosen == "rknn-rt" and rknn_io == "auto" else None
        report = st.run(model, paths, progress=(lambda c: echo("     " + c.line())) if echo else None)
    except Rwkv2RknnError as e:
        return [Verdict("self-test", False, f"{e.problem}", e.fix)]
    finally:
        model.close()
    st.record(artifact, report)
    n = len({c.segment for c in report.checks})
    if report.ok:
        io = ""
        if report.io:
            counts = {p: sum(1 for v in report.io.values() if v == p) for p in set(report.io.values())}
            io = "; io: " + ", ".join(f"{p} for {k} segment(s)" for p, k in sorted(counts.items()))
        return [
            Verdict(
                "self-test",
                True,
                f"{len(report.checks)} check(s) of {n} NPU segment(s) within tolerance on {report.key}{io}",
            )
        ]
    err = st.failure(report)
    return [Verdict("self-test", False, err.problem, err.fix)]
