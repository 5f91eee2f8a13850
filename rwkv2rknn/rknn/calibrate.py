"""Calibration from real text: the actual inputs of every NPU segment, for int8 builds.

::

    text --tokenizer--> ids --hybrid executor on ort (fp32 ONNX segments), traced-->
        per NPU segment: rows of (inputs, outputs)
            first rows -> the toolkit's dataset (dataset.txt: one line per sample, one .npy per input)
            last rows  -> held out: a quantised build's outputs against fp32 onnxruntime

The T-row (prefill) variants take the same rows stacked T at a time; their time-shift state
inputs are the row before the chunk, so their samples are made from the per-token rows with no
second run. ``accuracy`` scores a build's outputs against the fp32 ones: the smallest cosine and
the largest and median error relative to each output row's largest |value|.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np

from rwkv2rknn.errors import BadInput

log = logging.getLogger(__name__)

MIN_TOKENS = 32  # fewer calibration tokens than this say nothing about the activation ranges
DATASET = "dataset.txt"
# The bundled model is scored on the first 20,000 bytes of its held-out text (README); its
# default calibration text is what comes after them, so the two never overlap.
HELDOUT_SCORED = 20000
# Integer builds whose ranges are cheap to widen also calibrate on seeded random ids, this share
# of the calibration tokens, appended after the text (the held-out tokens stay text). w16a16i:
# its 16-bit fixed-point ranges come from the calibration maxima, and text leaves some unreached
# (trained RWKV-7 4 x 256: L0's a-LoRA output reaches 10.6 on random ids against 7.1 on text,
# past its power-of-two range; check --random failed, KL mean 0.063; docs/quality.md). w8a8
# stays on text only: its 8-bit ranges would lose resolution on the text it runs.
RANDOM_SHARE = {"w16a16i": 0.25}
RANDOM_SEED = 20261207  # not check's seed (0): check --random runs ids the build never saw

# The default for tokenizers other than raw bytes (written for this project).
BUILTIN_TEXT = """\
The morning was grey and still when the ferry left the harbour. A few passengers stood at the \
rail with their coffee, watching the town grow small behind them: the church tower, the row of \
painted houses along the quay, the cranes of the boatyard, and above them all the green shoulder \
of the hill where the old lighthouse keeper still lived alone. Nobody spoke much. It was too \
early, and the water was too calm, and everyone seemed to feel that a loud word would break \
something.

Halfway across, the sun came through. The sea turned from lead to silver, and then to a blue so \
deep that a child near the stern asked her father whether it had been painted. He laughed and \
told her that the colour came from the sky, and that on a cloudy day the same water would look \
like soup. She did not believe him. She said that soup was never that colour, and that if the \
sky could paint the sea it could also paint the boat, which was plainly white.

On the island the market had already begun. Farmers sold eggs, cheese, honey and potatoes from \
the backs of their vans; a man with a folding table offered to mend clocks, radios and \
umbrellas while you waited; two girls sold lemonade at twice the price it was worth and \
nobody minded. The ferry would leave again at four o'clock, the captain said, and not a minute \
later, because the tide would not wait for anyone, not even for the mayor.

In the afternoon the wind rose a little. Clouds gathered in the west, low and heavy, and the \
light went yellow. People began to walk back towards the pier with their bags and baskets, \
counting their change and comparing what they had bought. Someone had found a brass compass \
at a stall of old books and instruments; it pointed firmly at the café, which everyone agreed \
was the right direction. At ten to four the horn sounded twice, and the last of the visitors \
hurried up the gangway as the first drops of rain fell on the deck.
"""


def bundled_heldout() -> str:
    import rwkv2rknn.models as models

    return os.path.join(os.path.dirname(models.__file__), "default", "heldout.txt")


def read_text(path: str, flag: str = "--calib-text") -> str:
    """A text file given with ``flag`` as str: BadInput if unreadable, empty or not UTF-8."""
    what = "calibration text" if flag == "--calib-text" else "text"
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise BadInput(
            f"cannot read {what} '{path}' ({e.strerror})", f"give a readable UTF-8 text file with {flag}"
        ) from e
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadInput(
            f"{what} '{path}' is not UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})",
            f"give UTF-8 text with {flag}",
        ) from e
    if not text.strip():
        raise BadInput(f"{what} '{path}' is empty", f"give some real text with {flag}")
    return text


def default_text(tokenizer_spec: Optional[str]) -> tuple:
    """(text, where it came from) when no --calib-text is given: the bundled held-out text after
    its scored part for byte-level models, a built-in English sample otherwise."""
    path = bundled_heldout()
    if tokenizer_spec == "bytes" and os.path.isfile(path):
        with open(path, "rb") as f:
            tail = f.read()[HELDOUT_SCORED:].decode("utf-8", errors="ignore")
        if len(tail.encode()) >= 4 * MIN_TOKENS:
            return tail, f"{os.path.basename(path)} after byte {HELDOUT_SCORED}"
    return BUILTIN_TEXT, "the built-in English sample"


def split_tokens(ids: Sequence[int], n: int, where: str) -> tuple:
    """(calibration ids, held-out ids): up to ``n`` for the dataset, then n/4 (at least 16) held
    out; a shorter text is split 4:1. BadInput below MIN_TOKENS."""
    hold = max(16, n // 4)
    ids = [int(i) for i in ids[: n + hold]]
    if len(ids) < MIN_TOKENS:
        raise BadInput(
            f"calibration text {where} has only {len(ids)} token(s), fewer than {MIN_TOKENS}",
            "give a longer text with --calib-text",
        )
    if len(ids) < n + hold:
        hold = max(len(ids) // 5, 1)
        log.info(
            "calibration text %s is short: %d tokens for the dataset, %d held out",
            where,
            len(ids) - hold,
            hold,
        )
    return ids[:-hold], ids[-hold:]


@dataclass
class Rows:
    """One NPU segment's traced rows: its inputs and fp32 outputs per token."""

    name: str
    inputs: List[str]
    outputs: List[str]
    shapes: Dict[str, tuple]
    feeds: List[Dict[str, np.ndarray]] = field(default_factory=list)
    results: List[Dict[str, np.ndarray]] = field(default_factory=list)


def capture(artifact: str, ids: Sequence[int]) -> Dict[str, Rows]:
    """Run ``ids`` through the artifact's segments on onnxruntime (fp32) and keep every NPU
    segment's inputs and outputs, token by token."""
    from rwkv2rknn.runtime.hybrid import HybridModel

    model = HybridModel(
        artifact, backend="ort", verify=False, threads=1, share_weights=False, fuse=False
    )  # each segment its own session, as the golden trace runs them
    try:
        segs = [s for s in model.manifest.segments if s.backend == "npu"]
        rows = {s.name: Rows(s.name, list(s.inputs), list(s.outputs), dict(s.shapes)) for s in segs}
        slots = {s.input: i for i, s in enumerate(model.slots)}
        state = model.init_state()
        for t in ids:
            before = model.slot_views(state.copy())  # step() updates the state in place
            env: Dict[str, np.ndarray] = {}
            model.step(int(t), state, trace=env)
            for s in segs:
                r = rows[s.name]
                r.feeds.append(
                    {
                        k: np.array(before[slots[k]] if k in slots else env[k], np.float32).reshape(
                            s.shapes[k]
                        )
                        for k in s.inputs
                    }
                )
                r.results.append({k: np.array(env[k], np.float32).reshape(s.shapes[k]) for k in s.outputs})
    finally:
        model.close()
    return rows


def seq_feeds(rows: Rows, t: int, shift_inputs: Sequence[str]) -> List[Dict[str, np.ndarray]]:
    """T-row samples from per-token rows: T consecutive rows stacked; a time-shift state input
    is its value before the chunk's first row (what the T-row variant takes)."""
    out = []
    for i in range(0, len(rows.feeds) - t + 1, t):
        chunk = rows.feeds[i : i + t]
        out.append(
            {
                k: (
                    chunk[0][k].reshape(-1)
                    if k in shift_inputs
                    else np.stack([f[k].reshape(-1) for f in chunk])
                )
                for k in rows.inputs
            }
        )
    return out


def write_dataset(folder: str, inputs: Sequence[str], feeds: Sequence[Dict[str, np.ndarray]]) -> str:
    """The toolkit's dataset: one line per sample listing one .npy per input, in input order
    (names relative to ``folder``; ``toolkit.build_in_process`` makes them absolute)."""
    os.makedirs(folder, exist_ok=True)
    lines = []
    for i, feed in enumerate(feeds):
        files = []
        for j, k in enumerate(inputs):
            name = f"{i:04d}_{j}.npy"
            np.save(os.path.join(folder, name), np.ascontiguousarray(feed[k], np.float32))
            files.append(name)
        lines.append(" ".join(files))
    path = os.path.join(folder, DATASET)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def read_dataset(path: str) -> List[List[np.ndarray]]:
    """The samples of a dataset file, each a list of arrays in input order."""
    base = os.path.dirname(os.path.abspath(path))
    with open(path) as f:
        return [[np.load(os.path.join(base, p)) for p in line.split()] for line in f if line.strip()]


@dataclass(frozen=True)
class Accuracy:
    min_cos: float
    max_rel: float
    median_rel: float
    rows: int

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return (
            f"cos {self.min_cos:.5f}, rel err max {self.max_rel:.3g} "
            f"median {self.median_rel:.3g} ({self.rows} held-out rows)"
        )


def accuracy(got: Sequence[Dict[str, np.ndarray]], want: Sequence[Dict[str, np.ndarray]]) -> Accuracy:
    """Every output row of ``got`` against ``want`` (same keys): smallest cosine, largest and
    median of max|a - b| / max|b|."""
    cos, rel = [], []
    for g, w in zip(got, want):
        for k, b in w.items():
            a = np.asarray(g[k], np.float64).reshape(-1)
            b = np.asarray(b, np.float64).reshape(-1)
            scale = float(np.max(np.abs(b))) if b.size else 0.0
            na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
            finite = bool(np.isfinite(a).all())
            rel.append(float(np.max(np.abs(a - b))) / max(scale, 1e-30) if finite else float("inf"))
            if not finite:
                cos.append(-1.0)
            elif na == 0.0 and nb == 0.0:
                cos.append(1.0)
            else:
                cos.append(float(np.dot(a, b)) / max(na * nb, 1e-30))
    if not rel:
        return Accuracy(1.0, 0.0, 0.0, 0)
    return Accuracy(min(cos), max(rel), float(np.median(rel)), len(got))


# -------------------------------------------------------------------------------------------
# the compiler's use: text -> ids before the passes run, datasets once the segments are cut


def random_count(precision: str, n: int) -> int:
    """Seeded random ids appended to ``n`` calibration tokens for a build of ``precision``."""
    return int(round(n * RANDOM_SHARE.get(precision, 0.0)))


def calibration_ids(source: str, text_path: Optional[str], n: int, random_ids: int = 0) -> tuple:
    """(calibration ids, held-out ids, where the text came from) for the model at ``source``,
    read with its recorded tokenizer; ``random_ids`` seeded random ids (RANDOM_SEED) of its
    vocabulary appended to the calibration ids. Fails before any pass runs if the text or
    tokenizer is bad."""
    from rwkv2rknn import fileio
    from rwkv2rknn.runtime.tokenizer import load_tokenizer

    facts = fileio.model_facts(source)
    spec = facts.get("tokenizer")
    if not spec:
        raise BadInput(
            f"'{source}' records no tokenizer, which calibration needs to read its text",
            "export the model with rwkv2rknn export --tokenizer bytes|world|PATH",
        )
    if text_path:
        text, where = read_text(text_path), f"'{text_path}'"
    else:
        text, where = default_text(spec)
    ids = load_tokenizer(spec).encode(text)
    vocab = int((facts.get("shape") or {}).get("vocab") or 0)
    if vocab and ids and max(ids) >= vocab:
        raise BadInput(
            f"tokenizer '{spec}' reads calibration text {where} as id {max(ids)}, outside "
            f"the model's vocabulary ({vocab})",
            "export the model with its own --tokenizer",
        )
    cal, hold = split_tokens(ids, n, where)
    if random_ids and vocab:
        cal = cal + [int(t) for t in np.random.default_rng(RANDOM_SEED).integers(0, vocab, random_ids)]
    return cal, hold, where


@dataclass
class SegmentCalibration:
    """What the build pass needs to quantise one NPU segment and measure it."""

    dataset: str  # per-token samples, relative to the artifact
    seq_dataset: str  # T-row samples ('' if there are too few rows for one)
    holdout: str  # held-out inputs (absolute, removed after the build)
    seq_holdout: str  # the same rows as token steps of a T-row build: each in row 0, zero rows after
    want: List[Dict[str, np.ndarray]]  # their fp32 outputs
    digest: str  # of every sample and held-out row: part of the build cache key


def prepare(
    artifact: str,
    cal: Sequence[int],
    hold: Sequence[int],
    rows: int,
    shift_inputs: Sequence[str],
    decode_rows: int = 2,
) -> Dict[str, SegmentCalibration]:
    """Trace the cut artifact (its manifest written, no .rknn yet) on the calibration and
    held-out ids and write each NPU segment's datasets under ``artifact``/calib/: T-row samples
    of ``rows`` rows, held-out token steps as they come and padded to ``decode_rows`` rows."""
    import hashlib

    traced = capture(artifact, list(cal) + list(hold))
    out = {}
    for name, r in traced.items():
        n = len(cal)
        part = Rows(name, r.inputs, r.outputs, r.shapes, r.feeds[:n], r.results[:n])
        held = Rows(name, r.inputs, r.outputs, r.shapes, r.feeds[n:], r.results[n:])
        h = hashlib.sha256(repr((r.inputs, rows)).encode())
        for feed in r.feeds:
            for k in r.inputs:
                h.update(feed[k].tobytes())
        write_dataset(os.path.join(artifact, "calib", name), r.inputs, part.feeds)
        seq_rel = ""
        seq = seq_feeds(part, rows, [k for k in r.inputs if k in shift_inputs]) if rows else []
        if seq:
            seq_rel = f"calib/{name}.seq/{DATASET}"
            write_dataset(os.path.join(artifact, "calib", name + ".seq"), r.inputs, seq)
        shift = [k for k in r.inputs if k in shift_inputs]
        steps = [
            {k: (v if k in shift else _pad_rows(v, decode_rows)) for k, v in f.items()}
            for f in seq_feeds(held, 1, shift)
        ]
        out[name] = SegmentCalibration(
            dataset=f"calib/{name}/{DATASET}",
            seq_dataset=seq_rel,
            holdout=write_dataset(os.path.join(artifact, "calib", ".holdout", name), r.inputs, held.feeds),
            seq_holdout=write_dataset(
                os.path.join(artifact, "calib", ".holdout", name + ".seq"), r.inputs, steps
            ),
            want=held.results,
            digest=h.hexdigest(),
        )
    return out


def _pad_rows(rows: np.ndarray, t: int) -> np.ndarray:
    out = np.zeros((t, rows.shape[1]), np.float32)
    out[: rows.shape[0]] = rows
    return out


def drop_holdout(artifact: str) -> None:
    """Remove the held-out rows (the artifact keeps only the datasets the simulator rebuilds from)."""
    import shutil

    shutil.rmtree(os.path.join(artifact, "calib", ".holdout"), ignore_errors=True)
