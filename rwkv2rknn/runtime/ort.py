"""ONNX Runtime: sessions that cope with the public fp16 files, and the ``ort`` runner."""

from __future__ import annotations

import logging
from typing import Dict, List, Optional

import numpy as np

from rwkv2rknn.errors import BadInput

log = logging.getLogger(__name__)

ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
             "tensor(int32)": np.int32, "tensor(int64)": np.int64, "tensor(double)": np.float64,
             "tensor(bool)": np.bool_}


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
KNOWN_FUSION_FAULT = "SimplifiedLayerNormFusion"


def make_session(model, threads: int = 0, what: str = "model", prepack: bool = True):
    """An InferenceSession for a path or serialized bytes.

    Thread pools do not spin between runs: a model runs as many sessions one after another, and
    onnxruntime's default spin-wait makes each idle pool steal the cores the next session needs
    (measured here: 1.4 s/token with spinning against 0.1 s/token without, on a 430M model cut
    into 50 segments).

    fp16 files made by onnxconverter-common (the public RWKV-4 files, our own fp16 export of
    every version) meet a known fault of one onnxruntime fusion (``KNOWN_FUSION_FAULT``): such a
    session is made at ORT_ENABLE_ALL without that fusion, quietly. Any other failure of the
    default (ORT_ENABLE_ALL) optimisation is retried with ORT_ENABLE_EXTENDED and logged.
    Returns ``(session, note)``, where ``note`` says what was done ('' if nothing).
    ``prepack=False`` keeps onnxruntime from holding a second, repacked copy of the MatMul
    weights (for sessions run only a few times, like the compiler's range trace).
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
        if threads:
            so.intra_op_num_threads = threads
        extra = {"disabled_optimizers": list(disabled)} if disabled else {}
        return ort.InferenceSession(model, sess_options=so, providers=["CPUExecutionProvider"], **extra)

    full = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        return create(full), ""
    except Exception as first:  # noqa: BLE001 - retried below, reported if the retry fails
        if KNOWN_FUSION_FAULT in str(first):
            try:
                sess = create(full, [KNOWN_FUSION_FAULT])
                log.debug("%s: onnxruntime optimises it without %s (a known fault of that fusion "
                          "on fp16 LayerNorms)", what, KNOWN_FUSION_FAULT)
                return sess, ""
            except Exception:  # noqa: BLE001 - not that fault after all: the general retry
                pass
        try:
            sess = create(ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)
        except Exception as e:
            raise BadInput(f"onnxruntime cannot load {what} ({str(e).splitlines()[0][:160]})",
                           "the file is corrupt or not a valid ONNX model") from e
        note = (f"onnxruntime's default optimisation failed on {what} "
                f"({str(first).splitlines()[0][:120]}); using ORT_ENABLE_EXTENDED")
        log.info(note)
        return sess, note


class OrtRunner:
    """A segment (or any ONNX model) run by ONNX Runtime on the CPU."""

    backend = "ort"

    def __init__(self, model, name: str = "", threads: int = 0, prepack: bool = True):
        self.name = name
        self.session, self.note = make_session(model, threads=threads, what=name or "model",
                                               prepack=prepack)
        self.inputs: List[str] = [i.name for i in self.session.get_inputs()]
        self.outputs: List[str] = [o.name for o in self.session.get_outputs()]
        self.input_types = {i.name: ORT_TYPES.get(i.type, np.float32) for i in self.session.get_inputs()}
        self.input_shapes = {i.name: i.shape for i in self.session.get_inputs()}

    def infer(self, feed: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        cast = {k: np.asarray(feed[k], dtype=self.input_types[k]) for k in self.inputs}
        return dict(zip(self.outputs, self.session.run(self.outputs, cast)))

    def close(self) -> None:
        self.session = None


def input_dtype(runner: Optional[OrtRunner], name: str):
    return runner.input_types[name] if runner else np.float32
