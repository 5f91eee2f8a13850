"""Device profiles: what an NPU call and a CPU matrix-vector product cost, for placement and estimates.

A profile is a small JSON file::

    {"name": "rk3588-published", "npu_call_ms": 0.03, "npu_gflops": {"1": 10, "16": 80, "128": 400},
     "cpu_gemv_gbs": 14.0, "cpu_weight_bytes": 4, "handoff_ms": 0.03}

- ``npu_call_ms``: the fixed cost of one NPU call (submit, sync, in/out copies);
- ``npu_gflops``: fp16 MatMul throughput of the NPU by rows M (interpolated in log M);
- ``cpu_gemv_gbs``: bytes of weights the CPU streams per second in a matrix-vector product;
- ``cpu_weight_bytes``: bytes per weight the CPU side reads (4: fp32 ONNX Runtime);
- ``handoff_ms``: an NPU<->CPU switch between segments.

The defaults come from published RK3588 figures (a GEMV with M = 1, K = N = 1024 takes about
0.1 ms on the CPU and 0.2 ms on one NPU core; about 10 GFLOPS fp16 at small M and a ~0.03 ms call
floor; rwkv.cpp's 61 ms/token for a 430M model on the CPU means about 14 GB/s of weights). They are
estimates, not measurements of your board: ``rwkv2rknn profile`` (measure.py) measures one, with
probes built on the compile machine and timed on the board with rknn-toolkit-lite2.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Dict, Optional

from rwkv2rknn.errors import BadInput


@dataclass(frozen=True)
class DeviceProfile:
    name: str = "rk3588-published"
    npu_call_ms: float = 0.03
    npu_gflops: Dict[int, float] = field(default_factory=lambda: {1: 10.0, 16: 80.0, 128: 400.0})
    cpu_gemv_gbs: float = 14.0
    cpu_weight_bytes: int = 4
    handoff_ms: float = 0.03

    def npu_throughput(self, rows: int) -> float:
        """GFLOPS at ``rows`` rows, interpolated linearly in log(rows)."""
        pts = sorted(self.npu_gflops.items())
        if rows <= pts[0][0]:
            return pts[0][1]
        for (m0, g0), (m1, g1) in zip(pts, pts[1:]):
            if rows <= m1:
                f = (math.log(rows) - math.log(m0)) / (math.log(m1) - math.log(m0))
                return g0 + f * (g1 - g0)
        return pts[-1][1]

    def npu_matmul_ms(self, out_features: int, in_features: int, rows: int = 1) -> float:
        return 2.0 * rows * out_features * in_features / (self.npu_throughput(rows) * 1e6)

    def cpu_matmul_ms(self, out_features: int, in_features: int, rows: int = 1) -> float:
        """Weight streaming bound; with many rows the CPU is compute bound (about 20 GFLOPS)."""
        stream = out_features * in_features * self.cpu_weight_bytes / (self.cpu_gemv_gbs * 1e6)
        compute = 2.0 * rows * out_features * in_features / (20.0 * 1e6)
        return max(stream, compute)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["npu_gflops"] = {str(k): v for k, v in self.npu_gflops.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str = "profile") -> "DeviceProfile":
        try:
            gflops = {int(k): float(v) for k, v in d.get("npu_gflops", {}).items()} or \
                DeviceProfile().npu_gflops
            p = cls(name=str(d.get("name", "custom")), npu_call_ms=float(d.get("npu_call_ms", 0.03)),
                    npu_gflops=gflops, cpu_gemv_gbs=float(d.get("cpu_gemv_gbs", 14.0)),
                    cpu_weight_bytes=int(d.get("cpu_weight_bytes", 4)),
                    handoff_ms=float(d.get("handoff_ms", 0.03)))
        except (TypeError, ValueError, AttributeError) as e:
            raise BadInput(f"{where} is not a valid device profile ({e})",
                           "see rwkv2rknn/profile.py for the fields") from e
        if p.cpu_gemv_gbs <= 0 or min(p.npu_gflops.values()) <= 0:
            raise BadInput(f"{where} has a zero or negative throughput", "give positive figures")
        return p


def load_profile(path: Optional[str]) -> DeviceProfile:
    if not path or path == "default":
        return DeviceProfile()
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise BadInput(f"cannot read device profile '{path}' ({type(e).__name__})",
                       "give a JSON file (see rwkv2rknn/profile.py)") from e
    if not isinstance(data, dict):
        raise BadInput(f"device profile '{path}' is not a JSON object", "see rwkv2rknn/profile.py")
    return DeviceProfile.from_dict(data, where=f"device profile '{path}'")
