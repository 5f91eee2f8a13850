"""ONNX Runtime: sessions that cope with the public fp16 files, and the ``ort`` runner."""

from __future__ import annotations

import logging
from typing import Dict, List, Optional

import numpy as np

from rwkv2rknn.errors import BadInput

log = logging.getLogger(__name__)

ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(double)": np.float64,
    "tensor(bool)": np.bool_,
}


# onnxruntime (1.26, measured) cannot optimise a graph with two or more fp16 LayerNorms as
# onnxconverter-common writes them (ReduceMean, Sub, Pow(x, 2), ...: every block of the public
# RWKV-4 files and of our fp16 export, any version) at ORT_ENABLE_ALL (EXTENDED loads it):
# ConstantSharing merges the Pow nodes' equal fp16 exponents into one scalar, the CPU provider has
# no fp16 kernels for these ops so InsertCastTransformer casts that one scalar to fp32 once for
# both, and SimplifiedLayerNormFusion (an RMSNorm fusion) then fuses the first LayerNorm's tail and
# loses that shared Cast's output ("Attempting to get index by a name which does not exist:
# InsertedPrecisionFreeCast_ln2.two for node: ln1.scale/SimplifiedLayerNormFusion/"). A fault of
# that one fusion, which RWKV graphs have no use for (after the casts these ops run in fp32 anyway):
# without it the session keeps every other ORT_ENABLE_ALL optimisation (faster than
# ORT_ENABLE_EXTENDED on an RWKV-7 block, measured), with ORT_ENABLE_EXTENDED's logits to rounding
# (tests/runtime/test_runners.py).
# A second one (onnxruntime 1.26, measured): where a LayerNorm's input is a Cast from float16 (a
# token table stored in fp16, widened per token, in front of the first block's LayerNorm: the
# token steps of such an artifact joined into one graph, runtime/ortshare.fuse), the level-1
# LayerNorm fusion takes the Cast's fp16 input as the fused LayerNormalization's input while its
# scale and bias stay float32, and the session fails its own type check ("Type parameter (T) of
# Optype (LayerNormalization) bound to different types (tensor(float16) and tensor(float)").
# Without that one fusion the level-2 fusions still fuse the LayerNorms' tails.
KNOWN_FAULTS = {
    "SimplifiedLayerNormFusion": "SimplifiedLayerNormFusion",
    "Optype (LayerNormalization) bound to different types": "LayerNormFusionL1",
}


def make_session(
    model,
    threads: int = 0,
    what: str = "model",
    prepack: bool = True,
    initializers=None,
    arena: bool = True,
    config=None,
):
    """An InferenceSession for a path or serialized bytes.

    Thread pools do not spin between runs: a model runs as many sessions one after another, and
    onnxruntime's default spin-wait makes each idle pool steal the cores the next session needs
    (measured here: 1.4 s/token with spinning against 0.1 s/token without, on a 430M model cut
    into 50 segments).

    fp16 files made by onnxconverter-common (the public RWKV-4 files, our own fp16 export of
    every version) meet a known fault of one onnxruntime fusion, and a LayerNorm behind a cast
    from fp16 another (``KNOWN_FAULTS``): such a session is made at ORT_ENABLE_ALL without the
    fusion at fault, quietly. Any other failure of the
    default (ORT_ENABLE_ALL) optimisation is retried with ORT_ENABLE_EXTENDED and logged.
    Returns ``(session, note)``, where ``note`` says what was done ('' if nothing).
    ``prepack=False`` keeps onnxruntime from holding a second, repacked copy of the MatMul
    weights (for sessions run only a few times, like the compiler's range trace).
    ``initializers``: {name: OrtValue} that fill the model's initializers of those names
    (onnxruntime reads them where they are: sessions given the same ones share the memory).
    ``arena=False``: no memory arena (a session run on many rows at once, prefill, would
    otherwise keep its largest activations for good). ``config``: more session config entries
    ({key: value}, e.g. ``session.dynamic_block_base``).
    """
    import onnxruntime as ort

    def create(level, disabled=()):
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        so.log_severity_level = 4 if level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL else 3
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        if not prepack:
            so.add_session_config_entry("session.disable_prepacking", "1")
        if not arena:
            so.enable_cpu_mem_arena = False
        for key, value in (config or {}).items():
            so.add_session_config_entry(key, str(value))
        if threads:
            so.intra_op_num_threads = threads
        for name, value in (initializers or {}).items():
            so.add_initializer(name, value)
        extra = {"disabled_optimizers": list(disabled)} if disabled else {}
        return ort.InferenceSession(model, sess_options=so, providers=["CPUExecutionProvider"], **extra)

    full = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    disabled: List[str] = []
    first = None
    while True:  # each known fault met: that one fusion off, every other optimisation kept
        try:
            sess = create(full, disabled)
            if disabled:
                log.debug(
                    "%s: onnxruntime optimises it without %s (known faults of those fusions)",
                    what,
                    ", ".join(disabled),
                )
            return sess, ""
        except Exception as e:  # noqa: BLE001 - retried below, reported if the retry fails
            first = first or e
            fault = next(
                (opt for sign, opt in KNOWN_FAULTS.items() if sign in str(e) and opt not in disabled), None
            )
            if fault is None:
                break
            disabled.append(fault)
    try:
        sess = create(ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, disabled)
    except Exception as e:
        raise BadInput(
            f"onnxruntime cannot load {what} ({str(e).splitlines()[0][:160]})",
            "the file is corrupt or not a valid ONNX model",
        ) from e
    note = (
        f"onnxruntime's default optimisation failed on {what} "
        f"({str(first).splitlines()[0][:120]}); using ORT_ENABLE_EXTENDED"
    )
    log.info(note)
    return sess, note


class OrtRunner:
    """A segment (or any ONNX model) run by ONNX Runtime on the CPU."""

    backend = "ort"

    def __init__(
        self,
        model,
        name: str = "",
        threads: int = 0,
        store=None,
        arena: bool = True,
        prepack: bool = True,
        config=None,
    ):
        """``store``: a ``WeightStore`` (rwkv2rknn.runtime.ortshare) that holds the large weights
        of ``model`` (a path) for every session that uses them; None: the session holds its own.
        ``prepack=False``: no repacked copy of the MatMul weights (sessions run a few times).
        ``config``: more session config entries (its own session only)."""
        self.name, self.threads, self.store = name, threads, None
        made = None
        if store is not None and isinstance(model, str):
            made = store.session_for(model, name or "model", threads, arena=arena)
        if made is not None:
            # onnxruntime reads the store's arrays where they are, and does not own them: they
            # live as long as this runner does
            self.session, self.note, self.store = made[0], made[1], store
        else:
            self.session, self.note = make_session(
                model, threads=threads, what=name or "model", arena=arena, prepack=prepack, config=config
            )
        self.inputs: List[str] = [i.name for i in self.session.get_inputs()]
        self.outputs: List[str] = [o.name for o in self.session.get_outputs()]
        self.input_types = {i.name: ORT_TYPES.get(i.type, np.float32) for i in self.session.get_inputs()}
        self.input_shapes = {i.name: i.shape for i in self.session.get_inputs()}

    def infer(self, feed: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        cast = {k: np.asarray(feed[k], dtype=self.input_types[k]) for k in self.inputs}
        return dict(zip(self.outputs, self.session.run(self.outputs, cast)))

    def close(self) -> None:
        self.session = self.store = None


def input_dtype(runner: Optional[OrtRunner], name: str):
    return runner.input_types[name] if runner else np.float32
