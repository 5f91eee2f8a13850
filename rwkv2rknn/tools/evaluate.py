"""Language-model quality on a text, teacher-forced from the zero state: bits per byte of a model
alone (``bits_per_byte``), or an artifact against onnxruntime on its source files
(``compare_on_text``: KL divergence, same top token and bits of both, decode and prefill)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

from rwkv2rknn.tools.compare import log_softmax
from rwkv2rknn.errors import BadInput


@dataclass
class Score:
    tokens: int
    bytes: int
    bits_per_byte: float
    top1: float  # share of next tokens predicted exactly


def read_text(path: str, max_bytes: int) -> str:
    """The first ``max_bytes`` bytes of a UTF-8 text file (a character cut at the end is dropped)."""
    try:
        with open(path, "rb") as f:
            return f.read(max_bytes).decode("utf-8", errors="ignore")
    except OSError as e:
        raise BadInput(f"cannot read '{path}' ({e.strerror})", "give a readable text file") from e


def bits_per_byte(model, tokenizer, text: str, chunk: int = 64) -> Score:
    """Score ``text``: the model reads token i and is charged -log2 p(token i+1)."""
    ids = tokenizer.encode(text)
    if len(ids) < 2:
        raise BadInput(
            f"the text is too short to score ({len(ids)} token(s), at least 2 needed)",
            "give a longer text file",
        )
    state = model.init_state()
    if hasattr(model, "prefill"):
        logits = model.prefill(ids[:-1], state, chunk=chunk)
    else:
        logits = np.stack([model.step(int(t), state) for t in ids[:-1]])
    lp = log_softmax(logits)
    targets = np.asarray(ids[1:])
    nats = -lp[np.arange(len(targets)), targets].sum()
    scored = tokenizer.decode_bytes(ids[1:]) if hasattr(tokenizer, "decode_bytes") else text.encode()
    n_bytes = max(len(scored), 1)
    return Score(
        tokens=len(targets),
        bytes=n_bytes,
        bits_per_byte=float(nats / math.log(2) / n_bytes),
        top1=float((logits.argmax(1) == targets).mean()),
    )


@dataclass
class TextQuality:
    """An artifact against onnxruntime on its source files, teacher-forced on one text."""

    backend: str
    source: str  # what the text was
    decode: dict  # compare.Report.to_dict() of the token-by-token path
    prefill: Optional[dict] = None  # and of the prompt path (T-row variants), where there is one

    def summary(self) -> str:
        from rwkv2rknn.tools.compare import path_line

        lines = [
            f"backend {self.backend}: {len(self.decode['steps'])} tokens of {self.source}, "
            f"against onnxruntime on the source files"
        ]
        b = (self.decode.get("quality") or {}).get("bits")
        if b:  # the headline `eval` gives an uncompiled folder too
            count = f"{b['bytes']} bytes" if b["unit"] == "byte" else f"{b['scored']} tokens"
            lines.append(
                f"{b['artifact']:.4f} bits per {b['unit']} over {count} "
                f"({b['scored']} tokens scored; the source: {b['reference']:.4f})"
            )
        lines.append("decode:  " + path_line(self.decode))
        if self.prefill is not None:
            lines.append("prefill: " + path_line(self.prefill))
        return "\n".join(lines)


def compare_on_text(
    artifact: str,
    text: Optional[str] = None,
    backend: str = "auto",
    reference: Optional[str] = None,
    tokenizer: Optional[str] = None,
    echo=None,
) -> TextQuality:
    """Teacher-force all of ``text`` (default: the built-in sample for the artifact's tokenizer)
    through the artifact, token by token and as a prompt, and through pure onnxruntime on the
    source files: KL divergence, same top token and bits of both, per path (no gate)."""
    from rwkv2rknn.tools.check import choose_tokens, open_pair
    from rwkv2rknn.tools.compare import compare_logits

    manifest, hybrid, ref, chosen = open_pair(artifact, backend, reference)
    if echo:
        echo(f"backend: {chosen}; reference: onnxruntime on {manifest.model.get('source', '?')}")
    try:
        if text is not None and len(text.encode()) < 2:
            raise BadInput(
                f"the text is too short to score ({len(text.encode())} byte(s))", "give a longer text file"
            )
        feed = choose_tokens(manifest, 1 << 30, text=text, artifact=artifact, tokenizer=tokenizer)
        if feed.targets is None:
            raise BadInput(
                f"cannot score a text with this artifact: {feed.warnings[0]}",
                "give --tokenizer (bytes, world or a tokenizer.json)",
            )
        h_state, r_state = hybrid.init_state(), ref.init_state()
        got = np.stack([hybrid.step(t, h_state) for t in feed.ids])
        want = np.stack([ref.step(t, r_state) for t in feed.ids])
        kw = dict(max_rel=float("inf"), targets=feed.targets, n_bytes=feed.n_bytes)
        res = TextQuality(chosen, feed.source, compare_logits(got, want, **kw).to_dict())
        if len(feed.ids) > 1 and hybrid.prepare_prefill():
            res.prefill = compare_logits(hybrid.prefill(feed.ids, hybrid.init_state()), want, **kw).to_dict()
    finally:
        hybrid.close()
    return res


def heldout_quality(artifact: str, ids, where: str = "") -> dict:
    """A quantised artifact on rknn-sim against the same artifact's segment ONNX (fp32) on
    onnxruntime, teacher-forced on ``ids`` (the calibration text's held-out tokens): the KL
    figures (compare.quality) of the decode and the prefill path, saved into plan.json as
    'heldout_quality' and returned as {'tokens', 'text', 'decode', 'prefill'}."""
    from rwkv2rknn import fileio as io
    from rwkv2rknn.artifact.plan import PLAN

    out = {"tokens": len(ids), "text": where, **sim_against_ort(artifact, ids)}
    path = os.path.join(artifact, PLAN)
    if os.path.exists(path):
        plan = io.read_json(path, "plan")
        plan["heldout_quality"] = out
        io.write_json(path, plan)
    return out


def sim_against_ort(artifact: str, ids) -> dict:
    """The artifact on rknn-sim against its segment ONNX on onnxruntime, teacher-forced on
    ``ids``: {'decode': compare.quality, 'prefill': the same for the prefill path, where the
    artifact has one}."""
    from rwkv2rknn.tools.compare import quality
    from rwkv2rknn.runtime.hybrid import HybridModel

    ids = [int(t) for t in ids]
    ref = HybridModel(artifact, backend="ort")
    sim = HybridModel(artifact, backend="rknn-sim")
    try:
        r_state, s_state = ref.init_state(), sim.init_state()
        want = np.stack([ref.step(t, r_state) for t in ids])
        got = np.stack([sim.step(t, s_state) for t in ids])
        res = {"decode": quality(got, want, ids[1:])}
        if len(ids) > 1 and sim.prepare_prefill():
            res["prefill"] = quality(sim.prefill(ids, sim.init_state()), want, ids[1:])
    finally:
        sim.close()
        ref.close()
    return res
