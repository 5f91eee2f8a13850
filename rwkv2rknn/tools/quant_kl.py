"""Mixed precision chosen by measured KL (``compile --quant w8a8 --quant-kl TARGET``).

::

    compile, every NPU segment quantised --> held-out KL (rknn-sim against fp32 onnxruntime)
        at or below TARGET: done
        above: each quantised segment alone on rknn-sim (the rest fp32): the KL it adds
               keep segments fp16, most KL saved per byte added first; once the segments'
               figures predict a KL near TARGET, measure the artifact with them kept (rknn-sim
               rebuilds them fp16) after each added segment until its KL is at or below TARGET
        compile again with them kept (--quant-keep): the quantised builds come from the cache

The KL is the mean per-token KL divergence of the next-token distribution on the calibration
text's held-out tokens, the larger of the decode and the prefill path's; the bytes a kept
segment adds are its weights' (one more byte per int8 weight in fp16).
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional

import numpy as np

from rwkv2rknn import fileio
from rwkv2rknn.artifact.plan import MANIFEST, Manifest
from rwkv2rknn.runtime.hybrid import load_manifest

log = logging.getLogger(__name__)
# The artifact is measured once the per-segment figures predict a KL within this factor of the
# target (they add up only roughly: bundled model, six segments alone 0.0038, together 0.0037)
NEAR = 1.5


@dataclass
class KlChoice:
    """What ``choose`` did: the segments kept fp16 (in the order chosen), the held-out KL of
    every quantised artifact measured and of the chosen one, and its .rknn bytes."""

    target: float
    kept: List[str] = field(default_factory=list)
    all_kl: float = 0.0  # every NPU segment quantised (as the first compile chose)
    kl: float = 0.0  # the chosen artifact's
    alone: Dict[str, float] = field(default_factory=dict)  # KL each segment adds on its own
    extra: Dict[str, int] = field(default_factory=dict)  # bytes it adds when kept fp16
    tried: List[tuple] = field(default_factory=list)  # (kept names, measured KL)
    bytes_before: int = 0  # .rknn bytes of the first compile (all quantised)
    bytes_after: int = 0  # and of the chosen artifact
    reached: bool = True

    def lines(self) -> List[str]:
        out = [
            f"--quant-kl {self.target:g}: held-out KL mean {self.all_kl:.3g} with every NPU segment quantised"
        ]
        for name in sorted(self.alone, key=lambda n: -self.alone[n] / max(self.extra.get(n, 1), 1)):
            out.append(
                f"  {name}: adds KL {self.alone[name]:.3g} alone; fp16 adds "
                f"{self.extra.get(name, 0) / 1e6:.3f} MB of weights"
            )
        for names, kl in self.tried:
            out.append(f"  kept fp16 {','.join(names) or '(none)'}: KL mean {kl:.3g}")
        verdict = "at or below" if self.reached else "still above (every candidate kept)"
        out.append(
            f"kept fp16: {','.join(self.kept) or 'none'}; held-out KL mean {self.kl:.3g}, {verdict} "
            f"the target {self.target:g}; .rknn {self.bytes_after:,} bytes (all quantised: "
            f"{self.bytes_before:,})"
        )
        return out


def heldout_kl(quality: dict) -> float:
    """The larger of the decode and prefill paths' KL mean in a ``heldout_quality`` result."""
    return max(float(quality[p]["kl"]["mean"]) for p in ("decode", "prefill") if quality.get(p))


def rknn_bytes(artifact: str, manifest: Optional[Manifest] = None) -> int:
    """The .rknn bytes of an artifact (each file once)."""
    m = manifest or load_manifest(artifact)
    files = {f for s in m.segments for f in (s.token.rknn, s.seq.rknn) if f}
    return sum(os.path.getsize(os.path.join(artifact, f)) for f in files)


def weight_bytes(onnx_path: str) -> int:
    """Elements of the constant weight matrices (2-D and larger float initializers) of an ONNX
    file: the bytes keeping it fp16 adds over int8."""
    import onnx

    model = onnx.load(onnx_path, load_external_data=False)
    n = 0
    for t in model.graph.initializer:
        if len(t.dims) >= 2 and t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            n += int(np.prod(t.dims))
    return n


def _variant(artifact: str, folder: str, edit: Callable) -> str:
    """A view of ``artifact`` in ``folder`` (its files linked) with ``edit(segment)`` applied
    to every segment of its manifest."""
    os.makedirs(folder)
    for name in os.listdir(artifact):
        if name != MANIFEST:
            os.symlink(os.path.join(os.path.abspath(artifact), name), os.path.join(folder, name))
    m = load_manifest(artifact)
    m = replace(m, segments=tuple(edit(s) for s in m.segments))
    fileio.write_json(os.path.join(folder, MANIFEST), m.to_dict())
    return folder


def _fp16(seg):
    return replace(
        seg,
        token=replace(seg.token, precision="fp16", calib=None, quant={}),
        seq=replace(seg.seq, precision="fp16", calib=None, quant={}),
    )


def _quantised(m: Manifest) -> List[str]:
    return [s.name for s in m.segments if s.backend == "npu" and s.token.precision != "fp16"]


def choose(
    artifact: str,
    ids,
    where: str,
    target: float,
    recompile: Callable[[tuple], Manifest],
    say: Callable[[str], None] = log.info,
) -> KlChoice:
    """Keep NPU segments of the quantised ``artifact`` fp16 until its held-out KL on ``ids``
    is at or below ``target``; ``recompile(keep)`` compiles it again with those kept (its
    --quant-keep) into the same folder. ``say``: progress lines."""
    from rwkv2rknn.tools.evaluate import heldout_quality, sim_against_ort

    m = load_manifest(artifact)
    out = KlChoice(target=target, bytes_before=rknn_bytes(artifact, m))
    out.all_kl = out.kl = heldout_kl(heldout_quality(artifact, ids, where))
    out.bytes_after = out.bytes_before
    candidates = _quantised(m)
    if out.kl <= target or not candidates:
        out.reached = out.kl <= target
        _save(artifact, out)
        return out
    say(f"held-out KL mean {out.all_kl:.3g} > {target:g}: measuring each quantised NPU segment alone")
    with tempfile.TemporaryDirectory(prefix="rwkv2rknn-quant-kl-") as tmp:
        for i, name in enumerate(candidates):
            view = _variant(
                artifact,
                os.path.join(tmp, f"alone{i}"),
                lambda s: s if s.name == name or s.backend != "npu" else replace(s, backend="cpu"),
            )
            out.alone[name] = heldout_kl(sim_against_ort(view, ids))
            seg = next(s for s in m.segments if s.name == name)
            out.extra[name] = max(
                weight_bytes(os.path.join(artifact, f)) for f in (seg.token.onnx, seg.seq.onnx) if f
            )
            say(f"  {name}: adds KL {out.alone[name]:.3g} alone, {out.extra[name] / 1e6:.3f} MB fp16")
        order = sorted(candidates, key=lambda n: -out.alone[n] / max(out.extra[n], 1))
        total = sum(max(out.alone[n], 0.0) for n in order) or 1.0
        kept: List[str] = []
        kl = out.all_kl
        for j, name in enumerate(order):
            kept.append(name)
            saved = sum(max(out.alone[n], 0.0) for n in kept) / total
            if out.all_kl * (1 - saved) > NEAR * target and j < len(order) - 1:
                continue  # far from enough by the per-segment figures: keep the next one too
            view = _variant(
                artifact,
                os.path.join(tmp, f"keep{j}"),
                lambda s: _fp16(s) if s.name in kept else s,
            )
            kl = heldout_kl(sim_against_ort(view, ids))
            out.tried.append((tuple(kept), kl))
            say(f"  kept fp16 {','.join(kept)}: held-out KL mean {kl:.3g}")
            if kl <= target:
                break
    out.kept, out.kl, out.reached = list(kept), kl, kl <= target
    if kept:
        final = recompile(tuple(kept))
        out.bytes_after = rknn_bytes(artifact, final)
        q = heldout_quality(artifact, ids, where)  # the compiled artifact itself, saved in plan.json
        out.kl = heldout_kl(q)
        out.reached = out.kl <= target
    _save(artifact, out)
    return out


def _save(artifact: str, choice: KlChoice) -> None:
    """The choice into plan.json ('quant_kl')."""
    from rwkv2rknn.artifact.plan import PLAN

    path = os.path.join(artifact, PLAN)
    if not os.path.exists(path):
        return
    plan = fileio.read_json(path, "plan")
    plan["quant_kl"] = {
        "target": choice.target,
        "kept": choice.kept,
        "kl_all_quantised": choice.all_kl,
        "kl": choice.kl,
        "alone": choice.alone,
        "extra_bytes": choice.extra,
        "tried": [{"kept": list(k), "kl": v} for k, v in choice.tried],
        "rknn_bytes": choice.bytes_after,
        "rknn_bytes_all_quantised": choice.bytes_before,
        "reached": choice.reached,
    }
    fileio.write_json(path, plan)
