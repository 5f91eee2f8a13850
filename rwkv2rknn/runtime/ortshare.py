"""One copy of the weights for every onnxruntime session of an artifact, consecutive segments
fused into one session, and a token step without per-call allocations.

``WeightStore`` reads a segment's ONNX once, keeps each large initializer as one array (an
``OrtValue`` over it), and hands onnxruntime a stub of the graph whose large initializers are
placeholders filled from the store (``SessionOptions.add_initializer``): the per-token and the
T-row session of a segment, and a fused session over several segments, all read the same arrays.
onnxruntime does not copy such a user-owned initializer, but its MatMul kernels would each keep
a prepacked copy of it (one more copy of the weights per session; Python has no shared
prepacked-weights container): sessions on the store are made without prepacking (measured here,
onnxruntime 1.26, a 430M RWKV-7 segment of 49 MB: 58 MB more per session with prepacking, 0.2
without; its call 11.1 against 12.1 ms, the price of one copy).

``fuse`` joins consecutive segments into one graph (the artifact's plan is unchanged: this is
only how the ``ort`` backend loads it); ``BoundStep`` runs such a whole-model session with its
token, state and logits bound once to preallocated buffers (onnxruntime's I/O binding).
"""

from __future__ import annotations

import logging
import os
import shutil
import statistics
import tempfile
import time
from collections import deque
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple

import numpy as np

from rwkv2rknn.fileio import scratch_prefix
from rwkv2rknn.runtime import onnxwire as wire

log = logging.getLogger(__name__)

# initializers at least this many elements are shared through the store; smaller ones (scalars,
# shape constants, LayerNorm vectors) stay in the graph, where onnxruntime may fold them
MIN_SHARED = 4096
STUB_FILE = "shared-weights.bin"
# a session whose MatMul work per call is below this many FLOPs runs on one thread: waking a
# pool costs more than splitting saves (bench/threads.py: onnxruntime 1.26, this 2-core x86
# machine, MatMuls up to 1024 x 256 per row were no faster on 2 threads even when it was quiet
# enough to measure)
POOL_MIN_FLOPS = 1_000_000  # the placeholders' external-data location (an empty file)


class WeightStore:
    """The large initializers of every segment file loaded so far, one array each."""

    def __init__(self):
        self.arrays: Dict[str, np.ndarray] = {}
        self.values: Dict[str, object] = {}  # name -> OrtValue over arrays[name]
        self.conflicts = 0  # initializers a later file named like an earlier one, other content

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())

    def strip(self, path: str) -> Tuple[bytes, List[str]]:
        """The ONNX at ``path`` with its large initializers taken into the store and left as
        placeholders: (model bytes, names of the placeholders). A file whose initializers are
        stored as external data of its own cannot be moved: StubError.

        The file is mapped, not read: each weight is copied out once (or compared with the one
        the store holds) and its pages of the file are dropped, so that loading holds about one
        tensor more than the store."""
        import mmap

        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise StubError(f"{path} is empty")
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            return self._strip(memoryview(mm), mm, path)
        except wire.WireError as e:
            raise StubError(f"{path} is not an ONNX file this runtime reads ({e})") from e
        finally:
            try:
                mm.close()
            except BufferError:  # a view still alive: the mapping goes with it
                pass

    def _strip(self, model: memoryview, mm, path: str) -> Tuple[bytes, List[str]]:
        import onnxruntime as ort

        page = mmap_page()
        graph = wire.graph_of(model)
        base = _offset(model, graph)
        origin = np.frombuffer(model, np.uint8).ctypes.data  # the mapping's first byte
        parts, used = [], []
        for num, _, value, start, end in wire.fields(graph):
            if num != wire.G_INIT:
                parts.append(bytes(graph[start:end]))
                continue
            t = wire.Tensor(value)
            if t.external:
                raise StubError(f"{path}: initializer {t.name} is external data")
            view = t.view() if t.size >= MIN_SHARED else None
            if view is None:
                parts.append(bytes(graph[start:end]))
                continue
            have = self.arrays.get(t.name)
            blocks = _Blocks(view, mm, origin, page)
            if have is not None:
                if have.shape != view.shape or have.dtype != view.dtype or not blocks.equal(have):
                    self.conflicts += 1  # not the same weight: it stays in this graph
                    parts.append(bytes(graph[start:end]))
                    del view, t, blocks
                    continue
            else:
                arr = blocks.copy()
                self.arrays[t.name] = arr
                self.values[t.name] = ort.OrtValue.ortvalue_from_numpy(arr)
            parts.append(wire.enc_len(wire.G_INIT, t.stub(STUB_FILE)))
            used.append(t.name)
            a = base + _offset(graph, value)
            del view, t, value, blocks
            _drop(mm, a, a + end - start, page)
        stub = b"".join(parts)
        head = [bytes(model[s:e]) for num, _, _, s, e in wire.fields(model) if num != wire.M_GRAPH]
        del graph
        return b"".join(head) + wire.enc_len(wire.M_GRAPH, stub), used

    def initializers(self, names: Iterable[str]) -> Dict[str, object]:
        return {n: self.values[n] for n in names}

    def session_for(self, path: str, name: str, threads: int, arena: bool = True):
        """(session, note) of the ONNX file ``path`` with its large weights held here; None where
        the file cannot be stripped (onnxruntime then reads it, or says why it cannot)."""
        try:
            stub, names = self.strip(path)
        except StubError as e:
            log.debug("%s holds its own weights: %s", name, e)
            return None
        return session_from_stub(stub, names, self, name, threads, arena=arena)


def session_from_stub(
    model: bytes,
    names: Sequence[str],
    store: WeightStore,
    name: str,
    threads: int,
    arena: bool = True,
    config=None,
):
    """An onnxruntime session of a stub graph, its placeholders filled from ``store``:
    (session, note) as ``make_session`` returns them (``config``: its more config entries)."""
    from rwkv2rknn.runtime.ort import make_session

    folder = tempfile.mkdtemp(prefix=scratch_prefix("ortshare"))
    try:
        open(os.path.join(folder, STUB_FILE), "wb").close()
        path = os.path.join(folder, "model.onnx")
        with open(path, "wb") as f:
            f.write(model)
        return make_session(
            path,
            threads=threads,
            what=name,
            prepack=False,
            arena=arena,
            initializers=store.initializers(names),
            config=config,
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# a weight is copied out of (or compared with) its mapped file this many bytes at a time, each
# block's pages dropped once read: reading a 256 MiB head holds 16 MiB of its file, not all of it
BLOCK_BYTES = 16 << 20


class _Blocks:
    """A tensor's data in a mapped file (``view``: an array over the mapping that starts at
    address ``origin``), read block by block, each block's pages of the file dropped after."""

    def __init__(self, view: np.ndarray, mm, origin: int, page: int):
        self.flat = view.reshape(-1)
        self.mm, self.page = mm, page
        self.start = view.ctypes.data - origin  # where its data starts in the mapping
        self.step = max(1, BLOCK_BYTES // max(1, view.dtype.itemsize))
        self.shape, self.dtype = view.shape, view.dtype

    def _spans(self):
        size = self.flat.dtype.itemsize
        for i in range(0, self.flat.size, self.step):
            j = min(i + self.step, self.flat.size)
            yield i, j
            _drop(self.mm, self.start + i * size, self.start + j * size, self.page)

    def copy(self) -> np.ndarray:
        """A copy in native byte order."""
        out = np.empty(self.shape, self.dtype.newbyteorder("="))
        flat = out.reshape(-1)
        for i, j in self._spans():
            flat[i:j] = self.flat[i:j]
        return out

    def equal(self, other: np.ndarray) -> bool:
        """The same elements as ``other`` (an array of the same shape)."""
        flat = other.reshape(-1)
        return all(np.array_equal(flat[i:j], self.flat[i:j]) for i, j in self._spans())


def mmap_page() -> int:
    import mmap

    return mmap.PAGESIZE


def _offset(outer: memoryview, inner: memoryview) -> int:
    """Where the view ``inner`` starts within the view ``outer`` of the same buffer."""
    return np.frombuffer(inner, np.uint8).ctypes.data - np.frombuffer(outer, np.uint8).ctypes.data


def _drop(mm, start: int, end: int, page: int) -> None:
    """Let the kernel drop the mapped pages wholly inside [start, end) (read again if touched)."""
    import mmap

    a = (start + page - 1) // page * page
    b = end // page * page
    if b > a and hasattr(mm, "madvise"):
        mm.madvise(mmap.MADV_DONTNEED, a, b - a)


class FusionError(ValueError):
    """Segments that cannot be joined into one graph (their names collide)."""


class StubError(ValueError):
    """A file whose weights cannot be moved into the store."""


def fuse(models: Sequence[bytes], keep: Set[str], name: str = "fused") -> bytes:
    """One graph running ``models`` (stub models, in order) one after another: its inputs are
    theirs that no earlier one makes, its outputs theirs that are in ``keep``."""
    made: Set[str] = set()
    inputs: Set[str] = set()
    inits: Dict[str, bytes] = {}
    opsets: Dict[str, int] = {}
    ir_version = 0
    nodes, init_parts, input_parts, output_parts, info_parts = [], [], [], [], []
    for model in models:
        ir_version = max(ir_version, wire.first(model, wire.M_IR_VERSION, 0))
        for domain, version in wire.opsets(model).items():
            opsets[domain] = max(opsets.get(domain, 0), version)
        graph = wire.graph_of(model)
        own_inits = set()
        seg_inputs, seg_outputs = [], []
        for num, _, value, start, end in wire.fields(graph):
            field = bytes(graph[start:end])
            if num == wire.G_INIT:
                t = wire.Tensor(value)
                own_inits.add(t.name)
                if t.name in inits:
                    if inits[t.name] != t.buf:
                        raise FusionError(f"{name}: two initializers named '{t.name}' differ")
                    continue
                inits[t.name] = t.buf
                init_parts.append(field)
            elif num == wire.G_NODE:
                if wire.has_subgraph(value):
                    raise FusionError(f"{name}: a node has a subgraph")
                for x in wire.strings(value, wire.N_OUTPUT):
                    if x and (x in made or x in inputs):
                        raise FusionError(f"{name}: tensor '{x}' is made twice")
                    made.add(x)
                nodes.append(field)
            elif num == wire.G_INPUT:
                seg_inputs.append((bytes(wire.first(value, wire.V_NAME, b"")).decode(), field))
            elif num == wire.G_OUTPUT:
                seg_outputs.append((bytes(wire.first(value, wire.V_NAME, b"")).decode(), field))
            elif num == wire.G_VALUE_INFO:
                info_parts.append(field)
        for x, field in seg_inputs:
            if x in own_inits or x in inputs:
                continue
            if x in made:  # an earlier segment's output
                continue
            inputs.add(x)
            input_parts.append(field)
        for x, field in seg_outputs:
            if x in keep:
                output_parts.append(field)
    graph = (
        wire.enc_len(wire.G_NAME, name.encode())
        + b"".join(nodes)
        + b"".join(init_parts)
        + b"".join(input_parts)
        + b"".join(output_parts)
        + b"".join(info_parts)
    )
    model = wire.enc_int(wire.M_IR_VERSION, ir_version)
    for domain, version in sorted(opsets.items()):
        model += wire.enc_len(
            wire.M_OPSET,
            wire.enc_len(wire.OP_DOMAIN, domain.encode()) + wire.enc_int(wire.OP_VERSION, version),
        )
    return model + wire.enc_len(wire.M_GRAPH, graph)


class BoundStep:
    """A whole-model session (token and state in, state and logits out) run on buffers bound
    once: the token in a one-element array, the new state into a second state buffer copied
    back in one go, the logits into their own buffer. The state buffer a caller passes is bound
    on first use and again whenever another one comes."""

    def __init__(
        self, session, token: str, slots: Sequence[Tuple[str, str]], offsets: Sequence[int], logits: str
    ):
        import onnxruntime as ort

        self._ort = ort
        self.session = session
        ins = {i.name: i for i in session.get_inputs()}
        outs = {o.name: o for o in session.get_outputs()}
        tok = ins[token]
        self.token = np.zeros(
            _static(tok.shape) or (1,), np.int64 if tok.type == "tensor(int64)" else np.int32
        )
        self.binding = session.io_binding()
        self.binding.bind_ortvalue_input(token, ort.OrtValue.ortvalue_from_numpy(self.token))
        self.out_state = np.zeros(offsets[-1], np.float32)
        self._slots = []
        for (i, o), a, b in zip(slots, offsets, offsets[1:]):
            shape_in, shape_out = _static(ins[i].shape), _static(outs[o].shape)
            if (
                shape_in is None
                or shape_out is None
                or int(np.prod(shape_in)) != b - a
                or int(np.prod(shape_out)) != b - a
                or ins[i].type != "tensor(float)"
                or outs[o].type != "tensor(float)"
            ):
                raise FusionError(f"state slot {i}: shape or type does not bind")
            self._slots.append((i, a, b, shape_in))
            self.binding.bind_ortvalue_output(
                o, ort.OrtValue.ortvalue_from_numpy(self.out_state[a:b].reshape(shape_out))
            )
        shape = _static(outs[logits].shape)
        if shape is None or outs[logits].type != "tensor(float)":
            raise FusionError("the logits do not bind")
        self.logits = np.zeros(shape, np.float32)
        self.binding.bind_ortvalue_output(logits, ort.OrtValue.ortvalue_from_numpy(self.logits))
        self._state: Optional[np.ndarray] = None  # the state buffer bound now (kept alive)

    def _bind_state(self, flat: np.ndarray) -> None:
        for name, a, b, shape in self._slots:
            self.binding.bind_ortvalue_input(
                name, self._ort.OrtValue.ortvalue_from_numpy(flat[a:b].reshape(shape))
            )
        self._state = flat

    def step(self, token: int, flat: np.ndarray) -> np.ndarray:
        """``flat``: the state as one contiguous float32 vector (a view of the caller's buffer);
        updated in place. Returns the logits (a new array), or None if they are not finite
        (then ``flat`` is unchanged)."""
        if (
            self._state is None
            or flat.ctypes.data != self._state.ctypes.data
            or flat.size != self._state.size
        ):
            self._bind_state(flat)
        self.token[...] = token
        self.session.run_with_iobinding(self.binding)
        if not np.isfinite(self.logits).all():
            return None  # the state is left as it was: the caller finds the segment at fault
        flat[...] = self.out_state
        return self.logits.reshape(-1).copy()


def _static(shape) -> Optional[Tuple[int, ...]]:
    """A shape of fixed dimensions, or None if any is symbolic."""
    if any(not isinstance(d, int) or d < 0 for d in shape):
        return None
    return tuple(shape)


class LazyRunner:
    """An ``OrtRunner`` made on first use: a segment whose token steps run in a fused session
    loads its own only if something runs it alone (a trace, a prompt row by row)."""

    backend = "ort"

    def __init__(self, make, name: str = ""):
        self._make, self.name, self._runner = make, name, None

    @property
    def runner(self):
        if self._runner is None:
            self._runner = self._make()
        return self._runner

    @property
    def loaded(self) -> bool:
        return self._runner is not None

    @property
    def inputs(self):
        return self.runner.inputs

    @property
    def outputs(self):
        return self.runner.outputs

    def infer(self, feed):
        return self.runner.infer(feed)

    def close(self) -> None:
        if self._runner is not None:
            self._runner.close()
            self._runner = None


def runnable_others() -> Optional[int]:
    """How many tasks of the whole system outside this process are runnable now (the kernel's
    count in /proc/loadavg less this process's runnable threads), None where it cannot be read:
    other work wanting the cores."""
    try:
        with open("/proc/loadavg", "rb") as f:
            running = int(f.read().split()[3].split(b"/")[0])
    except (OSError, IndexError, ValueError):
        return None
    return max(0, running - _own_runnable())


def _own_runnable() -> int:
    """This process's threads in the running state (the caller at least)."""
    own = 0
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return 1
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/stat", "rb") as f:
                own += f.read().rsplit(b")", 1)[1].split()[0] == b"R"
        except (OSError, IndexError):
            pass  # a thread that ended meanwhile
    return max(own, 1)


def usable_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class AdaptiveStep:
    """Token steps on the fastest of several bound sessions of the same graph (one intra-op
    thread, a pool), chosen by measuring them as it goes: the machine's load changes under a
    long run, and which is faster changes with it. Each is tried ``warmup`` times first (the
    first run of each, which sets up its buffers, is not counted); after that the fastest by
    the median of its last ``window`` steps runs, and every ``explore`` steps another is timed
    once.

    ``loaded``: more ways for a machine whose cores other work keeps busy. Before a step, at
    most every ``probe_every`` seconds, the runnable tasks outside this process are counted
    (``runnable_others``, a moving average of weight ``weight``): at ``cores`` or more, other
    work could fill every core, and the steps choose among the loaded ways and the quiet ones
    by their times while it does (kept apart from their quiet times); below ``cores - 0.5``
    again, among the quiet ones. Which way is fastest there depends on what the other work is
    (two busy loops on two cores: the plain pool, 0.83x the loaded way; load 6-11 from other
    jobs: the loaded way), so it is measured, not assumed; a step's time swings 3-8x from one
    step to the next on a loaded machine (bench/fused_threads.py), so the choice goes by a
    median, which one slow step does not move."""

    def __init__(
        self,
        steps: Dict[str, "BoundStep"],
        warmup: int = 2,
        explore: int = 16,
        weight: float = 0.25,
        loaded: Optional[Dict[str, "BoundStep"]] = None,
        cores: int = 0,
        probe=runnable_others,
        probe_every: float = 0.05,
        window: int = 7,
    ):
        self.steps = dict(steps)
        self.quiet_names = list(steps)
        self.loaded_names = [k for k in (loaded or {}) if k not in self.steps]
        self.steps.update((k, (loaded or {})[k]) for k in self.loaded_names)
        self.names = list(self.steps)
        # (busy, way) -> the last ``window`` step times of that way in that state of the machine
        self.times = {(b, k): deque(maxlen=window) for b in (False, True) for k in self.names}
        self._tried = {key: 0 for key in self.times}  # steps per (busy, way), the first too
        self.warmup, self.explore, self.weight = warmup, explore, weight
        self.cores = cores or usable_cores()
        self.probe, self.probe_every = probe, probe_every
        self._probed = float("-inf")  # when the load was last read (time.monotonic)
        self.others: Optional[float] = None  # moving average of runnable_others
        self.busy = False  # the machine's cores are taken by other work
        self.switches = 0  # times the busy state changed
        self._n = 0

    def _watch_load(self) -> None:
        if not self.loaded_names or self.probe is None:
            return
        t = time.monotonic()
        if t - self._probed < self.probe_every:  # reading it costs 0.1-0.5 ms on a loaded machine
            return
        self._probed = t
        now = self.probe()
        if now is None:
            return
        self.others = (
            float(now) if self.others is None else (1 - self.weight) * self.others + self.weight * now
        )
        busy = self.others >= self.cores if not self.busy else self.others >= self.cores - 0.5
        if busy != self.busy:
            log.info(
                "token steps: %.1f other runnable tasks on %d cores: the %s ways",
                self.others,
                self.cores,
                "loaded" if busy else "quiet",
            )
            self.busy, self.switches = busy, self.switches + 1

    @property
    def candidates(self) -> List[str]:
        return self.loaded_names + self.quiet_names if self.busy else self.quiet_names

    @property
    def count(self) -> Dict[str, int]:
        """Steps run on each way, quiet and busy."""
        return {k: self._tried[(False, k)] + self._tried[(True, k)] for k in self.names}

    def median_ms(self, name: str, busy: Optional[bool] = None) -> Optional[float]:
        """The median of ``name``'s last steps (in the machine's present state unless ``busy``
        says which), in ms; None before it has one."""
        got = self.times[(self.busy if busy is None else busy, name)]
        return 1000 * statistics.median(got) if got else None

    def _pick(self) -> str:
        names = self.candidates
        for k in names:
            if self._tried[(self.busy, k)] < self.warmup:
                return k
        best = self.chosen
        if len(names) > 1 and self._n % self.explore == 0:
            others = [k for k in names if k != best]
            return others[(self._n // self.explore) % len(others)]
        return best

    @property
    def chosen(self) -> str:
        """The way steps run on now."""
        names = self.candidates
        ready = [k for k in names if self.times[(self.busy, k)]]
        return min(ready, key=self.median_ms) if ready else names[0]

    def step(self, token: int, flat: np.ndarray) -> np.ndarray:
        self._watch_load()
        k = self._pick()
        busy = self.busy
        self._n += 1
        t0 = time.perf_counter()
        out = self.steps[k].step(token, flat)
        dt = time.perf_counter() - t0
        first = self._tried[(False, k)] + self._tried[(True, k)] == 0
        self._tried[(busy, k)] += 1
        if not first:  # the first run of a session sets it up: not a measure of the way
            self.times[(busy, k)].append(dt)
        return out

    def describe(self) -> str:
        def timed(k: str) -> str:
            quiet, busy = self.median_ms(k, False), self.median_ms(k, True)
            return "".join(
                f", {ms:.1f} ms median {label}" for ms, label in ((quiet, "quiet"), (busy, "busy")) if ms
            )

        parts = [f"{k}: {self.count[k]} steps{timed(k)}" for k in self.names]
        load = ""
        if self.loaded_names and self.others is not None:
            load = (
                f"; {self.others:.1f} other runnable tasks on {self.cores} cores: "
                f"{'busy' if self.busy else 'quiet'} machine, {self.switches} switches"
            )
        return f"fastest {self.chosen} ({'; '.join(parts)}{load})"
