"""The compiler's shared state: one onnx-graphsurgeon graph plus what the passes learn about it.

Passes take a ``Context`` and edit ``ctx.graph`` in place (copying only where they need to), then
leave it cleaned up and toposorted. From partition on, ``ctx.segments`` holds the graph's
``GraphSegment`` s, which the later passes fill in; the compiler turns each into the manifest's
``plan.Segment``. Helpers here are the graph edits more than one pass needs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np

from rwkv2rknn.artifact.plan import StateSlot
from rwkv2rknn.artifact.profile import DeviceProfile, load_profile

log = logging.getLogger(__name__)


@dataclass
class TensorInfo:
    """What range tracing saw of one tensor: its shape, dtype name and largest |value|."""

    shape: Tuple[int, ...]
    dtype: str
    absmax: float


@dataclass(frozen=True)
class Note:
    """One thing a pass says about the compile: the pass, what kind of note it is, the figures
    code reads from it (``counts``) and the segment it is about, if one. ``line`` is what a
    person reads (the manifest's ``report``, the plan, the CLI); code reads the fields, never
    the words."""

    pass_name: str
    text: str  # the message, rendered by the pass from the fields below where it has them
    kind: str = ""  # e.g. "summary"; '' for a plain remark
    counts: Mapping[str, int] = field(default_factory=dict)
    segment: str = ""

    @property
    def line(self) -> str:
        return f"{self.pass_name}: {self.text}"


@dataclass
class Options:
    """What the user asked of the compile (the ``compile`` command's options)."""

    target: str = "rk3588"
    strict: bool = False
    verbose: bool = False
    plan_only: bool = False
    calib_tokens: int = 256  # tokens of calibration text for a quantised build (+ 1/4 held out)
    range_tokens: int = 8  # seeded sample tokens the fp16 range guard runs
    quant: str = "fp16"  # NPU precision: fp16, w8a8 or w16a16i (artifact.plan.PRECISIONS)
    calib_text: Optional[str] = None  # calibration text file (default: calibrate.default_text)
    quant_min_cos: float = 0.99  # a quantised segment below this cosine is built fp16
    quant_keep: Tuple[str, ...] = ()  # NPU segments (names, or stages they hold) kept fp16
    # tensor groups kept float16 in quantised per-token builds (rknn.toolkit.FLOAT_TENSORS:
    # 'residual'); needs prefill_rows empty (the toolkit's hybrid flow builds one shape only)
    quant_float: Tuple[str, ...] = ()
    seed: int = 0
    fp16_limit: float = 65504.0 / 4  # headroom: keep NPU tensors 4x below fp16's maximum
    min_segment_flops: int = 2 * 32 * 32
    cache_dir: Optional[str] = None
    build_timeout: float = 900.0
    stream: bool = True  # per-layer folders: one stage at a time (rwkv2rknn/compiler/stream.py)
    build_jobs: int = 0  # rknn-toolkit2 builds side by side (0: as many as cores and memory allow)
    placement: str = "npu"  # "npu": every constant-weight MatMul on the NPU; "cost": by the profile
    profile: Optional[str] = None  # device profile JSON (default: published RK3588 figures)
    prefill_rows: Tuple[int, ...] = (16, 64)  # T-row NPU builds for prefill (empty: none)
    verify_passes: bool = False  # compare the graph with the source after every rewriting pass


@dataclass(eq=False)
class Variant:
    """One variant of a ``GraphSegment`` as the passes fill it in: the per-token graph or the
    T-row one. The compiler turns it into the manifest's ``plan.Build``."""

    model: object = None  # onnx ModelProto, then (once written) the file's path
    sha256: str = ""  # of the file as it was written ('' if not known)
    # build: the NPU file (path relative to the artifact)
    rknn: Optional[str] = None
    fallback: str = ""  # why it was not built (per token: the segment runs on the CPU; T rows:
    # its prefill runs token by token)
    precision: str = "fp16"  # of the build (--quant)
    calib: str = ""  # its calibration dataset in the artifact (the simulator rebuilds from it)
    quant: dict = field(default_factory=dict)  # a quantised build: how (plan.Build.quant)
    rows: Tuple[int, ...] = ()  # T rows: the row counts built into one .rknn
    layout: str = ""  # T rows: 'columns', the build takes and gives [C, T] (rwkv2rknn.rknn.columns)


@dataclass(eq=False)
class GraphSegment:
    """One piece of the partitioned graph, filled in pass by pass (a mutable working record).

    Like ONNX Runtime's IndexedSubGraph with its MetaDef, or a TVM BYOC partitioned function:
    the nodes of the piece, the device they go to, and, once cut, the piece as its own model
    with named inputs and outputs. The compiler turns each into the manifest's frozen
    ``plan.Segment`` (``compiler.manifest_segment``); nothing after the compiler sees this class.
    A new fact about a segment is a new field here with a default, set by the pass that learns
    it, and, if the runtime needs it, a field of ``plan.Segment`` that ``manifest_segment`` fills.
    """

    # partition: where the nodes run and which they are (in graph order)
    device: str  # "npu" or "cpu"; build may move an NPU segment to "cpu" (see token.fallback)
    nodes: list = field(default_factory=list)  # onnx_graphsurgeon Nodes, still in ctx.graph
    # cut: the segment as its own model (``token.model``)
    name: str = ""  # e.g. "s003_npu_L0-L1": position, device, stages; names its files
    inputs: List[str] = field(default_factory=list)  # tensors it reads that others make
    outputs: List[str] = field(default_factory=list)  # tensors it makes that others read
    ops: int = 0
    matmuls: int = 0
    flops: int = 0  # MatMul FLOPs per call
    est_ms: float = 0.0  # estimated ms per call (device profile)
    est_prefill_ms: float = 0.0  # estimated ms per token of prefill
    # cut, then build: the per-token graph (``token.model``: an onnx ModelProto of one token step);
    # sequence, then build: the T-row (prefill) variant (``seq.model``: rows symbolic, or None:
    # per token only)
    token: Variant = field(default_factory=Variant)
    seq: Variant = field(default_factory=Variant)
    cache_key: str = ""  # the build cache entry the .rknn came from
    # build with --quant: the quantised build's measured accuracy
    accuracy: dict = field(default_factory=dict)  # calibrate.Accuracy.to_dict() on held-out rows
    precision_note: str = ""  # why a segment is fp16 in a quantised compile
    decode_rows: int = 0  # > 0: token steps run the T-row build (token.rknn == seq.rknn), no per-token one

    @property
    def stages(self) -> List[str]:
        """The loader stages its nodes come from, in model order (embed, L0, ..., head)."""
        return stages_of(self.nodes)


@dataclass
class Context:
    """Everything the passes share. ``load`` fills the graph, its source, arch, shape and I/O
    names; ``state`` unpacks ``whole_state`` into ``state`` rows; ``fp16_guard`` fills
    ``tensors`` and ``forced_cpu``; ``support`` fills ``support``; ``partition`` fills
    ``node_device`` and ``segments``, which cut, sequence and build fill in further. Every pass
    adds ``Note`` s to ``notes`` (``report``: their lines)."""

    graph: object  # onnx_graphsurgeon.Graph
    source: str = ""
    arch: str = ""
    shape: dict = field(default_factory=dict)
    token_input: str = "token"
    logits_output: str = "logits"
    state: List[StateSlot] = field(default_factory=list)
    # state tensors the loader could not unpack into rows: layer -> (input, output)
    whole_state: Dict[int, Tuple[str, str]] = field(default_factory=dict)
    # the model asks that ops computing only inputs of the recurrence also stay in fp32 on the CPU
    cpu_recurrence_inputs: bool = False
    options: Options = field(default_factory=Options)
    tensors: Dict[str, TensorInfo] = field(default_factory=dict)
    support: Dict[str, Tuple[str, str]] = field(default_factory=dict)  # node -> (kind, reason)
    forced_cpu: Dict[str, str] = field(default_factory=dict)  # node -> reason (range guard)
    node_device: Dict[str, str] = field(default_factory=dict)  # node -> "npu"/"cpu" (partition)
    segments: List[GraphSegment] = field(default_factory=list)  # partition, cut, sequence, build
    notes: List[Note] = field(default_factory=list)
    layout: str = ""  # the file layout the loader or recognize found (said in the plan)
    # what a single source file says about itself (dtype, tokenizer, its state pairs), for the manifest
    facts: Dict[str, object] = field(default_factory=dict)
    # values of Constant nodes nothing reads, by name (load; recognize takes initial states from them)
    unread_constants: Dict[str, np.ndarray] = field(default_factory=dict)
    # the compiled model against its source (compiler/validate.py): figures for plan.json
    validation: Dict[str, object] = field(default_factory=dict)
    _profile: Optional[DeviceProfile] = field(default=None, init=False, repr=False)

    @property
    def profile(self) -> DeviceProfile:
        """The device profile for placement and estimates: ``options.profile`` (read once, on
        first use; load asks for it so a bad file fails early), else published RK3588 figures."""
        if self._profile is None:
            self._profile = load_profile(self.options.profile)
        return self._profile

    @property
    def report(self) -> List[str]:
        """The notes as the lines a person reads ('pass: message'), in order."""
        return [n.line for n in self.notes]

    def note(self, pass_name: str, message: str, kind: str = "", segment: str = "", **counts: int) -> Note:
        """Record what ``pass_name`` says: ``message`` for people, ``kind``, ``segment`` and
        ``counts`` for code."""
        n = Note(pass_name, message, kind, dict(counts), segment)
        self.add_note(n)
        return n

    def add_note(self, note: Note) -> None:
        self.notes.append(note)
        log.info(note.line)

    def said(self, pass_name: str, kind: Optional[str] = None) -> List[Note]:
        """The notes of one pass (of one ``kind`` if given), in order."""
        return [n for n in self.notes if n.pass_name == pass_name and kind in (None, n.kind)]


# --------------------------------------------------------------------------------------------
# graph helpers


def producers(graph) -> Dict[str, object]:
    return {t.name: n for n in graph.nodes for t in n.outputs}


def is_const(t) -> bool:
    import onnx_graphsurgeon as gs

    return isinstance(t, gs.Constant)


def const_value(t) -> Optional[np.ndarray]:
    return np.asarray(t.values) if is_const(t) else None


def transposed(a: np.ndarray, dtype=None, block: int = 32) -> np.ndarray:
    """A C-ordered copy of the 2-D array ``a.T`` (as ``dtype``, default a's), made a band of
    ``block`` rows at a time (each band's reads and writes stay in cache: 2-4x faster than
    ``np.ascontiguousarray(a.T)`` on a 50277 x 1024 head). A column-major ``a`` of that dtype
    gives its transpose as it is (a C-ordered view)."""
    dtype = np.dtype(dtype or a.dtype)
    if a.T.flags.c_contiguous and a.dtype == dtype:
        return a.T
    out = np.empty(a.shape[::-1], dtype)
    for i in range(0, a.shape[0], block):
        out[:, i : i + block] = a[i : i + block].T
    return out


def replace_uses(old, new) -> None:
    """Make every node that reads tensor ``old`` read ``new`` instead (graph inputs and outputs
    are left as they are)."""
    for consumer in list(old.outputs):
        for i, t in enumerate(consumer.inputs):
            if t is old:
                consumer.inputs[i] = new


def bypass(graph, node) -> None:
    """Remove a one-in one-out node, wiring its input to its consumers (keeps graph output names)."""
    src, dst = node.inputs[0], node.outputs[0]
    if dst in graph.outputs:
        if src in graph.inputs or src in graph.outputs or is_const(src):
            node.op, node.attrs = "Identity", {}
            return
        name = dst.name
        graph.outputs[graph.outputs.index(dst)] = src
        dst.name = name + ".bypassed"
        src.name = name
        src.dtype = src.dtype or dst.dtype
        src.shape = src.shape or dst.shape
    replace_uses(dst, src)
    node.outputs.clear()
    node.inputs.clear()


def toposort_chains(graph) -> None:
    """Order ``graph.nodes`` topologically, depth first: a node comes right after the last
    input it waits for whenever it can, so a chain such as a decomposed LayerNorm stays in one
    run of nodes (ties keep the current order). rknn-toolkit2 2.5.0 matches LayerNorm on
    neighbouring nodes: with an unrelated node between the ReduceMean and its Sub it fuses the
    inner part as an RMS norm, and a T-row build of a graph with a second LayerNorm after it
    then fails inside the toolkit (IndexError in ``_p_remove_reshape_after_add``)."""
    nodes = list(graph.nodes)
    index = {id(n): i for i, n in enumerate(nodes)}
    made_by = {id(t): n for n in nodes for t in n.outputs}
    waits = {id(n): {id(made_by[id(t)]) for t in n.inputs if id(t) in made_by} for n in nodes}
    readers: Dict[int, list] = {}
    for n in nodes:
        for p in waits[id(n)]:
            readers.setdefault(p, []).append(n)
    ready = [n for n in reversed(nodes) if not waits[id(n)]]  # the earliest on top
    order = []
    while ready:
        n = ready.pop()
        order.append(n)
        now = []
        for r in readers.get(id(n), []):
            waits[id(r)].discard(id(n))
            if not waits[id(r)]:
                now.append(r)
        ready += sorted(now, key=lambda r: -index[id(r)])
    if len(order) != len(nodes):
        raise ValueError("the graph has a cycle")
    graph.nodes = order


def layer_of(node_name: str) -> Optional[int]:
    """Layer index of a node from the loader's name prefix ('L3/...'); None for embed/head."""
    if node_name.startswith("L") and "/" in node_name:
        head = node_name.split("/", 1)[0][1:]
        if head.isdigit():
            return int(head)
    return None


def stage_of(node_name: str) -> str:
    """The loader stage of a node from its name prefix ('L3', 'embed', 'head'); '' for none."""
    return node_name.split("/", 1)[0] if "/" in node_name else ""


def stage_key(stage: str):
    """Model order of loader stages: embed, L0, L1, ..., head (anything else last)."""
    if stage == "embed":
        return (0, 0)
    if stage.startswith("L") and stage[1:].isdigit():
        return (1, int(stage[1:]))
    return (2, 0) if stage == "head" else (3, stage)


def stages_of(nodes) -> List[str]:
    """The stages of ``nodes`` in model order ('graph' for nodes of a lone .onnx file)."""
    return sorted({stage_of(n.name) or "graph" for n in nodes}, key=stage_key)


def reshape_node(x, y, shape, name: str, shape_name: str):
    """A Reshape node ``name`` that writes ``x`` as ``y`` in ``shape`` (a constant named
    ``shape_name``)."""
    import onnx_graphsurgeon as gs

    return gs.Node(
        "Reshape", name=name, inputs=[x, gs.Constant(shape_name, np.array(shape, np.int64))], outputs=[y]
    )


def export(graph):
    import onnx_graphsurgeon as gs

    model = gs.export_onnx(graph)
    model.ir_version = min(model.ir_version, 8)
    return model
