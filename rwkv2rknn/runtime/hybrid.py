"""The hybrid executor: runs a compiled artifact's segments in manifest order, one token a step.

Activations and recurrent state are threaded by name: the token and every state row enter as
graph inputs, each segment reads its inputs from what came before and adds its outputs, and the
new state rows and the logits are read at the end. The state is one float32 buffer, allocated
once, holding every slot at its offset (``slot_views``): [slots, width] when every slot is a row
of the width (RWKV-4), else flat (the ``wkv`` slots of RWKV-5.2/6/7 are [H, N, N]); segment
feeds are views into it and into the previous outputs.

Backends for NPU segments: ``ort`` (their ONNX on the CPU: checks the partition and stitching
with no toolkit), ``rknn-sim`` (rknn-toolkit2's simulator), and on the board ``rknn-rt``
(librknnrt's C API, the default) or ``rknn-lite`` (rknn-toolkit-lite2). The board backends load
only the .rknn files of NPU segments, never their ONNX, so they run a packed artifact.
CPU segments always run on ONNX Runtime.
"""

from __future__ import annotations

import logging
import os
from typing import Dict, List, Optional, Sequence

import numpy as np

from rwkv2rknn import fileio
from rwkv2rknn.errors import BadInput, NumericalError, UsageError
from rwkv2rknn.artifact.plan import MANIFEST, Manifest, sha256_file, token_file_bytes

from rwkv2rknn.runtime.base import plugin_runner
from rwkv2rknn.runtime.board import BACKENDS, BOARD_BACKENDS
from rwkv2rknn.runtime.rows import Columns, RowStep, check_finite, columns_as_rows, last_row, pad, row_by_row

log = logging.getLogger(__name__)

# onnxruntime's pool splits an op's work into as many blocks as it has threads unless told a
# dynamic block base: then into smaller blocks handed out as threads come free. On cores other
# work shares, a pool thread that waits for a core no longer holds up a block the others could
# have run: a 430M RWKV-7's fused token step took 0.64-0.83x the 1-thread time with
# ``session.dynamic_block_base`` 1 against 0.89-0.95x with the plain pool (two busy loops beside
# it, load average 7-9), but in both 430M bench runs beside it the plain pool's moving average
# was the lower (docs/benchmarks.md): which wins changes with the load, so the token step tries
# it beside the others.
SMALL_BLOCKS = {"session.dynamic_block_base": 1}
# While other work keeps every core busy (AdaptiveStep's load watch), token steps also time a
# pool of small blocks with this many threads per core, beside the quiet ways. The share of a
# core a process gets there goes by its runnable threads (the kernel shares a scheduling group's
# time between its threads), and a pool thread that waits for a core holds up one small block,
# not a half of every op. Measured (bench/fused_threads.py, a 430M RWKV-7's fused step, eight
# interleaved runs, seven beside two busy loops, load average 5-10): 4 threads of small blocks
# took 0.50-0.84x the one-thread time, the best or next-best way in each run; the plain pool
# 0.59-1.39x, 2 threads of small blocks 0.35-0.95x, spinning pools 1.03-2.1x (docs/benchmarks.md,
# "Speed under load"). Beside exactly two busy loops on a quiet 2-core machine the plain pool
# was the faster (101.8 against 122.9 ms): which wins is measured as the steps run.
LOADED_THREADS = 2
# --backend ort loads an artifact whose segment files hold at least this many bytes with one
# session per segment that owns and prepacks its weights (its T-row graph serving token steps and
# prompts); a smaller one with its weights in one store, unpacked, and token steps fused into one
# graph. Measured (bench/own_sessions.py, docs/benchmarks.md): on 430M models the own sessions'
# token steps took 0.98x the fused step's quiet, 0.85-0.93x beside two busy loops (small blocks),
# their prompts 1.4-1.6x the tokens/s, peak memory 1.17-1.20x the weights against 1.10x;
# on the bundled 4 x 256 model (13 MiB) the fused step was 1.5x the faster (one run a token
# against eleven, where the weights stay in the cache); between them, RWKV-7 6 x 512 (0.14 GiB of
# fp32 weights) 1.17x the fused step's token time and 1.18x its prompt speed, 12 x 768 (0.42
# GiB) 1.01x and 1.41x.
OWN_MIN_BYTES = 256 * 2**20
# the own sessions on the pool hand out their work in small blocks: measured
# (`python bench/own_sessions.py ART --plain-pool [--busy 2]`, 430M random models) 0.98x the
# plain pool's time quiet, 0.93-0.98x beside two busy loops
OWN_POOL_CONFIG: Dict[str, int] = dict(SMALL_BLOCKS)


def load_manifest(artifact: str) -> Manifest:
    if not os.path.isdir(artifact):
        raise BadInput(
            f"artifact '{artifact}' is not a folder", "give the output folder of `rwkv2rknn compile`"
        )
    path = os.path.join(artifact, MANIFEST)
    if not os.path.exists(path):
        raise BadInput(
            f"'{artifact}' has no {MANIFEST}",
            "give the output folder of `rwkv2rknn compile` (or compile the model again)",
        )
    return Manifest.from_dict(fileio.read_json(path, "manifest"), where=path)


def resolve_backend(backend: str) -> str:
    """'auto' -> rknn-rt where librknnrt.so loads, else rknn-lite where rknn-toolkit-lite2 is, else
    rknn-sim where rknn-toolkit2 imports, else ort."""
    from rwkv2rknn.runtime.board import lite_available, rt_available, toolkit_available

    if backend not in BACKENDS:
        raise UsageError(f"unknown backend '{backend}'", f"use one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    if rt_available():
        return "rknn-rt"
    if lite_available():
        return "rknn-lite"
    if toolkit_available():
        return "rknn-sim"
    return "ort"


class HybridModel:
    """A compiled artifact, loaded with one runner per segment."""

    def __init__(
        self,
        artifact: str,
        backend: str = "ort",
        core_mask: str = "auto",
        verify: bool = True,
        threads: int = 0,
        progress=None,
        rknn_io: str = "auto",
        fuse: bool = True,
        share_weights: bool = True,
        store=None,
        prepack: Optional[bool] = None,
    ):
        from rwkv2rknn.runtime.rknnrt import IO_PATHS

        if rknn_io not in IO_PATHS + ("auto",):
            raise UsageError(f"unknown --rknn-io '{rknn_io}'", "use copy, zero-copy or auto")
        self.artifact = artifact
        self.rknn_io = rknn_io
        self._io: Dict[str, str] = {}  # segment -> io path (rknn-rt), where chosen
        self.manifest = m = load_manifest(artifact)
        if not m.token_input or not m.logits_output:
            raise BadInput(
                f"'{artifact}' was compiled from a single ONNX graph, not a whole model",
                "compile a whole model (a per-layer folder, or one file with a token "
                "input, state and logits) to run it",
            )
        self.backend = resolve_backend(backend)
        self._board = self.backend in BOARD_BACKENDS
        if self._board:
            from rwkv2rknn.runtime.device import board_preflight

            board_preflight(artifact, m, self.backend)
        elif m.packed:
            raise UsageError(
                f"'{artifact}' is packed for the board (its NPU segments are .rknn "
                f"only): {self.backend} cannot run it",
                "run it with --backend rknn-rt or rknn-lite on the board, or run the "
                "artifact it was packed from",
            )
        self._verify, self._threads, self._core_mask = verify, threads, core_mask
        from rwkv2rknn.runtime.ortshare import WeightStore

        # --backend ort, ``prepack``: one session per segment that owns and prepacks its weights,
        # its T-row graph where it has one serving token steps (one row) and prompts alike (None:
        # where the segment files hold OWN_MIN_BYTES or more, unless ``fuse``, ``share_weights``
        # or ``store`` ask for the store)
        if prepack is None:
            prepack = (
                fuse and share_weights and store is None and token_file_bytes(artifact, m) >= OWN_MIN_BYTES
            )
        self._own = bool(prepack) and self.backend == "ort"
        # else one copy of the weights for every onnxruntime session (``share_weights``; else each
        # session holds its own, prepacked); ``store``: one to share with another model
        self._store = (store or WeightStore()) if share_weights and not self._own else None
        # --backend ort runs every segment on onnxruntime: token steps run them as one fused
        # session (each segment's own session is made only if something runs it alone)
        self._fuse = (
            fuse and share_weights and not self._own and self.backend == "ort" and len(m.segments) > 1
        )
        self._decode = None  # the fused token step (ortshare.BoundStep or a fused OrtRunner)
        self._seq, self._seq_loaded = None, False  # T-row runners, made on first prefill
        self._shared = {}  # segment name -> its T-row RKNN runner (decode_rows segments: at load)
        self.runners = []
        for seg in m.segments:
            self.runners.append(self._runner(seg))
            if self._board and seg.backend == "npu":  # loaded on first prefill, checked now
                if seg.seq.rknn:
                    self._path(seg.seq.rknn, seg.seq.rknn_sha256)
            elif seg.seq.onnx and not self._own:  # (own sessions: made of it, checked then)
                self._path(seg.seq.onnx, seg.seq.sha256)
            if progress:
                progress(seg)
        self.width = int(m.model.get("width") or 0)
        self.slots = list(m.state)
        self._dims = [s.dims(self.width) for s in self.slots]
        sizes = [int(np.prod(d)) for d in self._dims]
        self._offsets = [int(x) for x in np.cumsum([0] + sizes)]
        self._rows_only = all(d == (self.width,) for d in self._dims)
        self.vocab = m.vocab
        self._npu = [seg.backend == "npu" for seg in m.segments]
        # segments that make only the logits from activations (the head): a prompt needs them
        # on its last row only
        fed = {m.token_input} | {s.input for s in self.slots}
        self._head = [
            list(seg.outputs) == [m.logits_output] and not fed & set(seg.inputs) for seg in m.segments
        ]
        if self._fuse:
            self._fuse_decode()

    @property
    def own_sessions(self) -> bool:
        """--backend ort with one session per segment that owns its weights, a T-row graph
        serving token steps and prompts alike (a large artifact, or ``prepack=True``)."""
        return self._own

    def _path(self, rel: str, sha: str) -> str:
        path = os.path.join(self.artifact, rel)
        if not os.path.isfile(path):
            raise BadInput(f"segment file '{path}' is missing", "compile the model again")
        if self._verify and sha and sha256_file(path) != sha:
            raise BadInput(
                f"segment file '{path}' changed since it was compiled (checksum mismatch)",
                "compile the model again",
            )
        return path

    def _calib(self, rel) -> str:
        """A quantised segment's calibration dataset (the simulator quantises from it)."""
        if not rel:
            return ""
        path = os.path.join(self.artifact, rel)
        if not os.path.isfile(path):
            raise BadInput(f"calibration dataset '{path}' is missing", "compile the model again")
        return path

    def _runner(self, seg):
        if self._own:
            return self._own_runner(seg)
        if seg.backend == "cpu" or self.backend == "ort":
            from rwkv2rknn.runtime.ort import OrtRunner
            from rwkv2rknn.runtime.ortshare import LazyRunner

            path, threads = self._path(seg.token.onnx, seg.token.sha256), self.threads_for(seg)
            if self._fuse:
                # run alone only row by row (a prompt's recurrence) or for a trace: small
                # activations, so no memory arena of its own (measured, a 430M RWKV-7: the 25
                # row-by-row sessions' arenas held 0.22 GiB after a prompt)
                return LazyRunner(
                    lambda: OrtRunner(path, seg.name, threads, self._store, arena=False), seg.name
                )
            return OrtRunner(path, seg.name, threads, self._store)
        shapes = {k: list(v) for k, v in seg.shapes.items()}
        if seg.decode_rows:  # token steps on the T-row build: one copy of the weights
            return self._row_step(seg, self._rknn_seq_runner(seg), seg.decode_rows)
        if self.backend == "rknn-sim":
            RknnSimRunner = plugin_runner("rknn-sim")
            return RknnSimRunner(
                self._path(seg.token.onnx, seg.token.sha256),
                seg.name,
                seg.inputs,
                seg.outputs,
                shapes,
                m_target(self),
                precision=seg.token.precision,
                dataset=self._calib(seg.token.calib),
                quant=seg.token.quant,
            )
        if not seg.token.rknn:
            raise BadInput(
                f"segment {seg.name} has no .rknn (compiled with --plan-only)",
                "compile without --plan-only, or use --backend ort / rknn-sim",
            )
        return self._board_runner(seg, self._path(seg.token.rknn, seg.token.rknn_sha256), seg.name, shapes)

    def _own_runner(self, seg):
        """--backend ort, one session per segment that owns and prepacks its weights (onnxruntime
        then drops its own copy of each weight it packed: one copy, packed). A segment with a
        T-row graph runs token steps on it, one row a step (as ``decode_rows`` does on the NPU),
        and prompts on the same session; one without (the embedding, the recurrence) on its
        token graph, row by row in a prompt."""
        from rwkv2rknn.runtime.ort import OrtRunner

        threads = self.threads_for(seg)
        config = OWN_POOL_CONFIG if threads != 1 else None
        if seg.seq.onnx:
            path, name = self._path(seg.seq.onnx, seg.seq.sha256), seg.name + ".seq"
        else:
            path, name = self._path(seg.token.onnx, seg.token.sha256), seg.name
        runner = OrtRunner(path, name, threads, config=config)
        _trim()  # the file's bytes and the weights onnxruntime let go of, given back
        if not seg.seq.onnx:
            return runner
        seq = self._shared[seg.name + "/ort"] = columns_as_rows(runner)
        return self._row_step(seg, seq, 1)

    def _row_step(self, seg, seq, rows: int) -> RowStep:
        """Token steps of ``seg`` on its T-row runner ``seq``, padded to ``rows`` rows."""
        slots = {s.input for s in self.manifest.state}
        return RowStep(seq, rows, [k for k in seg.inputs if k not in slots], seg.shapes)

    def _board_runner(
        self, seg, path: str, name: str, shapes, rows=(), columns: bool = False, io: Optional[str] = None
    ):
        """An NPU segment's .rknn on the board's runtime, on the cores it should use
        (``columns``: a T-row build that takes its rows as columns; ``io``: rknn-rt's io path,
        else the one chosen for the segment)."""
        from rwkv2rknn.runtime.board import core_mask_for

        mask = core_mask_for(seg, self.manifest, self._core_mask)
        args = (path, name, seg.inputs, seg.outputs, shapes, mask)
        both = dict(rows=rows, toolkit=self.manifest.toolkit, columns=columns)
        if self.backend == "rknn-rt":
            from rwkv2rknn.runtime.rknnrt import RknnRtRunner

            return RknnRtRunner(*args, **both, io=io or self.io_for(seg), target=self.manifest.target)
        from rwkv2rknn.runtime.rknn import RknnLiteRunner

        return RknnLiteRunner(*args, **both)

    def _seq_board_runner(self, seg, io: Optional[str] = None):
        """The board runner of a segment's T-row build (its rows as they come: ``Columns`` turns
        a build in columns)."""
        path = self._path(seg.seq.rknn, seg.seq.rknn_sha256)
        columns = seg.seq.layout == "columns"
        return self._board_runner(
            seg, path, seg.name + ".seq", None, rows=seg.seq.rows, columns=columns, io=io
        )

    # ------------------------------------------------------------------ io paths, self-test

    def io_for(self, seg) -> str:
        """rknn-rt's io path for a segment: --rknn-io copy|zero-copy as given; with auto the one
        the self-test chose, else copy (the documented path)."""
        if self.rknn_io != "auto":
            return self.rknn_io
        return self._io.get(seg.name, "copy") if seg is not None else "copy"

    def new_runner(self, seg, seq: bool = False, io: Optional[str] = None):
        """A new runner of an NPU segment's per-token (``seq`` False) or T-row build on this
        backend, not shared (the self-test's, for another io path); the caller closes it."""
        if seq:
            if not seg.seq.rknn or not seg.seq.rows:
                return None
            runner = self._seq_board_runner(seg, io)
            return Columns(runner) if seg.seq.layout == "columns" else runner
        if seg.decode_rows:
            return self._row_step(seg, self.new_runner(seg, True, io), seg.decode_rows)
        return self._board_runner(
            seg,
            self._path(seg.token.rknn, seg.token.rknn_sha256),
            seg.name,
            {k: list(v) for k, v in seg.shapes.items()},
            io=io,
        )

    def seq_runner(self, seg):
        """The T-row runner prefill uses for a segment (made once), None if it has none."""
        if seg.backend == "npu" and self.backend != "ort":
            return self._rknn_seq_runner(seg) if seg.seq.rows and (seg.seq.rknn or seg.seq.onnx) else None
        key = seg.name + "/ort"
        if key not in self._shared:
            self._shared[key] = self._seq_runner(seg)
        return self._shared[key]

    def use_io(self, choices: Dict[str, str]) -> None:
        """Run segments on the io paths chosen (rknn-rt, --rknn-io auto): their runners are
        made again where the path changes."""
        if self.backend != "rknn-rt" or self.rknn_io != "auto":
            return
        for i, seg in enumerate(self.manifest.segments):
            want = choices.get(seg.name)
            if seg.backend != "npu" or want not in ("copy", "zero-copy") or want == self.io_for(seg):
                continue
            self._io[seg.name] = want
            shared = self._shared.pop(seg.name, None)
            self.runners[i].close()
            if shared is not None:
                shared.close()
                if self._seq is not None:
                    self._seq = None
                    self._seq_loaded = False
            self.runners[i] = self._runner(seg)

    def threads_for(self, seg, rows: int = 1) -> int:
        """onnxruntime's intra-op threads for a segment's session: --threads if given, else one
        thread where its MatMul work per call is too small to feed a pool (``POOL_MIN_FLOPS``,
        measured: bench/threads.py), else onnxruntime's default (0: a thread per core)."""
        from rwkv2rknn.runtime.ortshare import POOL_MIN_FLOPS

        if self._threads:
            return self._threads
        return 0 if seg.flops * rows >= POOL_MIN_FLOPS else 1

    def _fuse_decode(self) -> None:
        """Every segment joined into one graph for token steps, its weights from the store."""
        from rwkv2rknn.runtime.ortshare import (
            AdaptiveStep,
            BoundStep,
            FusionError,
            StubError,
            fuse,
            session_from_stub,
            usable_cores,
        )

        m = self.manifest
        stubs, names = [], set()
        keep = {s.output for s in self.slots} | {m.logits_output}
        try:
            for seg in m.segments:
                stub, used = self._store.strip(os.path.join(self.artifact, seg.token.onnx))
                stubs.append(stub)
                names.update(used)
            model = fuse(stubs, keep, "decode")
        except (FusionError, StubError) as e:
            log.info("token steps run segment by segment: %s", e)
            self._fuse = False
            self.runners = [r.runner for r in self.runners]
            return
        del stubs
        names = sorted(names)
        slots = [(s.input, s.output) for s in self.slots]
        # --threads N: that many; else one thread, a pool and a pool that hands out its work in
        # small blocks, the fastest as it runs; and, timed beside them while other work keeps
        # the cores busy, a pool of small blocks with more threads than cores (``LOADED_THREADS``)
        cores = usable_cores()
        choices = (
            {f"{self._threads} threads": (self._threads, None)}
            if self._threads
            else {"1 thread": (1, None)}
            if cores < 2
            else {"1 thread": (1, None), "pool": (0, None), "pool, small blocks": (0, SMALL_BLOCKS)}
        )
        loaded = (
            {}
            if self._threads or cores < 2
            else {f"{LOADED_THREADS * cores} threads, small blocks": (LOADED_THREADS * cores, SMALL_BLOCKS)}
        )
        steps = {}
        for label, (threads, config) in {**choices, **loaded}.items():
            try:
                session, _ = session_from_stub(model, names, self._store, "decode", threads, config=config)
            except BadInput as e:  # onnxruntime refuses the joined graph: run the segments
                log.info("token steps run segment by segment: %s", e.problem)
                self._fuse = False
                self.runners = [r.runner for r in self.runners]
                return
            try:
                steps[label] = BoundStep(session, m.token_input, slots, self._offsets, m.logits_output)
            except FusionError as e:  # a symbolic shape: the fused session, fed by name
                log.info("token steps run unbound: %s", e)
                self._decode = _named_runner(session, "decode", threads)
                return
        self._decode = AdaptiveStep(
            {k: steps[k] for k in choices}, loaded={k: steps[k] for k in loaded}, cores=cores
        )

    def execution(self) -> str:
        """How token steps run, in a line (the bench prints it)."""
        m = self.manifest
        if self._decode is not None:
            how = (
                self._decode.describe()
                if hasattr(self._decode, "describe")
                else f"fed by name, {self._threads or 'default'} intra-op threads"
            )
            return (
                f"token steps: {len(m.segments)} segments fused into 1 onnxruntime graph "
                f"({how}); weights held once: {self._store.nbytes / 2**20:.0f} MiB"
            )
        pool = sum(
            1
            for seg, npu in zip(m.segments, self._npu)
            if (not npu or self.backend == "ort") and self.threads_for(seg) != 1
        )
        ort_segs = sum(1 for npu in self._npu if not npu or self.backend == "ort")
        if self._own:
            rows = sum(1 for seg in m.segments if seg.seq.onnx)
            return (
                f"token steps: {len(m.segments)} segments, each one onnxruntime session that owns "
                f"and prepacks its weights ({rows} on their T-row graph, one row a step; "
                f"{ort_segs - pool} on 1 thread, {pool} on the pool)"
            )
        return (
            f"token steps: {len(m.segments)} segments, {ort_segs} on onnxruntime "
            f"({ort_segs - pool} on 1 thread, {pool} on the pool)"
        )

    # ------------------------------------------------------------------ stepping

    def init_state(self) -> np.ndarray:
        """Every slot at its initial value (zero unless the model file said otherwise):
        [slots, width] if every slot is a row, else one flat buffer."""
        buf = np.zeros(self._offsets[-1], np.float32)
        for a, b, slot in zip(self._offsets, self._offsets[1:], self.slots):
            buf[a:b] = slot.init
        return buf.reshape(len(self.slots), self.width) if self._rows_only else buf

    def slot_views(self, state: np.ndarray) -> List[np.ndarray]:
        """Each slot of ``state`` as a view of its own shape (writing to it writes the state)."""
        flat = state.reshape(-1)
        if not np.shares_memory(flat, state):
            raise BadInput("the state buffer is not contiguous", "use init_state() to make it")
        return [flat[a:b].reshape(d) for a, b, d in zip(self._offsets, self._offsets[1:], self._dims)]

    def step(
        self, token: int, state: np.ndarray, trace: Optional[Dict[str, np.ndarray]] = None
    ) -> np.ndarray:
        """Advance by one token; updates ``state`` in place; returns float32 logits [V]."""
        m = self.manifest
        if self._decode is not None and trace is None:
            return self._fused_step(token, state)
        env: Dict[str, np.ndarray] = {m.token_input: np.array([token], np.int32)}
        views = self.slot_views(state)
        for view, slot in zip(views, self.slots):  # a trace keeps the state before the step
            env[slot.input] = view if trace is None else view.copy()
        for runner, is_npu, seg in zip(self.runners, self._npu, m.segments):
            outs = runner.infer({k: env[k] for k in seg.inputs})
            if is_npu:
                check_finite(seg, runner, outs)
            env.update(outs)
        for view, slot in zip(views, self.slots):
            view[...] = np.asarray(env[slot.output], np.float32).reshape(view.shape)
        if trace is not None:
            trace.update(env)
        return np.asarray(env[m.logits_output], np.float32).reshape(-1)

    def _fused_step(self, token: int, state: np.ndarray) -> np.ndarray:
        m = self.manifest
        flat = state.reshape(-1)
        if not np.shares_memory(flat, state) or flat.dtype != np.float32:
            raise BadInput("the state buffer is not contiguous float32", "use init_state() to make it")
        if hasattr(self._decode, "step"):
            logits = self._decode.step(token, flat)
        else:
            views = self.slot_views(state)
            feed = {m.token_input: np.array([token], np.int32)}
            feed.update((s.input, v) for s, v in zip(self.slots, views))
            outs = self._decode.infer({k: feed[k] for k in self._decode.inputs})
            logits = np.asarray(outs[m.logits_output], np.float32).reshape(-1)
            if np.isfinite(logits).all():
                for view, slot in zip(views, self.slots):
                    view[...] = np.asarray(outs[slot.output], np.float32).reshape(view.shape)
            else:
                logits = None
        if logits is None:
            # not finite, the state untouched: the same step segment by segment names the
            # segment at fault (an NPU candidate's check), else the logits are
            self.step(token, state, trace={})
            raise NumericalError(
                "the token step produced NaN/inf logits",
                "the model's own numbers overflow even in fp32; check the checkpoint",
            )
        return logits

    # ------------------------------------------------------------------ prefill

    def prefill_runners(self):
        """Per segment: a T-row runner, or None where the segment runs row by row. None overall
        if this artifact or backend has no prefill path."""
        if self._seq_loaded:
            return self._seq
        self._seq_loaded = True
        m = self.manifest
        if not any(s.seq.onnx or s.seq.rknn for s in m.segments):
            return None
        runners, produced = [], set()
        slot_of = {s.input: s for s in self.slots}
        for seg in m.segments:
            seq_runner = self._seq_runner(seg)
            if seq_runner is None:
                # row by row: every state row it reads must come from itself or an earlier segment
                if any(
                    k in slot_of and slot_of[k].output not in produced | set(seg.outputs) for k in seg.inputs
                ):
                    for r in runners:
                        if r is not None and not self._own:  # (own: the token steps' sessions)
                            r.close()
                    return None
            produced.update(seg.outputs)
            runners.append(seq_runner)
        self._seq = runners
        return runners

    def _seq_runner(self, seg):
        """The T-row runner of a segment on this backend, or None (then it runs row by row)."""
        if not (seg.seq.onnx or seg.seq.rknn):  # a packed NPU segment keeps only its .seq.rknn
            return None
        if self._own:  # the segment's one session, made at load
            return self._shared[seg.name + "/ort"]
        if seg.backend == "cpu" or self.backend == "ort":
            from rwkv2rknn.runtime.ort import OrtRunner

            return columns_as_rows(
                OrtRunner(
                    self._path(seg.seq.onnx, seg.seq.sha256),
                    seg.name + ".seq",
                    self.threads_for(seg, rows=32),
                    self._store,
                    arena=False,
                )
            )
        if not seg.seq.rows:
            return None
        return self._rknn_seq_runner(seg)

    def _rknn_seq_runner(self, seg):
        """The RKNN runner of a segment's T-row build, made once and shared by token steps
        (``decode_rows``) and prefill."""
        if seg.name in self._shared:
            return self._shared[seg.name]
        if self.backend == "rknn-sim":  # builds the file as written: columns if the compile wrote them
            RknnSimRunner = plugin_runner("rknn-sim")
            runner = RknnSimRunner(
                self._path(seg.seq.onnx, seg.seq.sha256),
                seg.name + ".seq",
                seg.inputs,
                seg.outputs,
                None,
                m_target(self),
                rows=seg.seq.rows,
                precision=seg.seq.precision,
                dataset=self._calib(seg.seq.calib),
                quant=seg.seq.quant,
            )
            columns = runner.in_columns
        else:
            columns = seg.seq.layout == "columns"
            runner = self._seq_board_runner(seg)
        if columns:
            runner = Columns(runner)
        self._shared[seg.name] = runner
        return runner

    def prepare_prefill(self) -> bool:
        """Load the T-row runners now (the simulator builds them), not in the first prefill.
        True if this artifact and backend have a prefill path."""
        return self.prefill_runners() is not None

    def prefill(
        self, tokens: Sequence[int], state: np.ndarray, chunk: int = 0, last_only: bool = False
    ) -> np.ndarray:
        """Feed ``tokens`` in chunks, updating ``state``; returns logits [T, V], the same as
        calling ``step`` for each token, or with ``last_only`` the last token's, [1, V] (what a
        prompt needs: the segments that make only the logits, the head, then run once, on the
        last row). Segments with a T-token variant run once per chunk; the others (embedding,
        the recurrence) run row by row, and so does the head where it is built for one row."""
        seq = self.prefill_runners() if len(tokens) > 1 else None  # one token: no T-row sessions
        if seq is None:
            logits = np.stack([self.step(int(t), state) for t in tokens])
            return logits[-1:] if last_only else logits
        fixed = [set(r.rows) for r in seq if r is not None and getattr(r, "rows", ())]
        if fixed:  # fixed-row builds: chunks no longer than the largest row count all of them take
            common = set.intersection(*fixed)
            if not common:
                return np.stack([self.step(int(t), state) for t in tokens])
            chunk = min(chunk or max(common), max(common))
        chunk = chunk or 32
        out = []
        for i in range(0, len(tokens), chunk):
            wanted = "all" if not last_only else "last" if i + chunk >= len(tokens) else ""
            out.append(self._chunk([int(t) for t in tokens[i : i + chunk]], state, seq, wanted))
            _trim()  # a chunk's activations go back to the system, not to a heap that keeps them
        return np.concatenate(out)

    def _chunk(self, tokens: List[int], state: np.ndarray, seq, wanted: str = "all") -> np.ndarray:
        """One chunk; returns the logits of its rows (``wanted`` 'all'), of its last row
        ('last') or none ('', a [0, V] array): the head runs on those rows only."""
        m = self.manifest
        n = len(tokens)
        env: Dict[str, np.ndarray] = {}  # name -> [T, size]
        slot_index = {s.input: i for i, s in enumerate(self.slots)}
        views = self.slot_views(state)
        # row by row, a state input reads its slot's new value of the row before (of the segment
        # itself or an earlier one), the state before the chunk in row 0
        prev = {k: self.slots[i].output for k, i in slot_index.items()}
        first = {k: views[i] for k, i in slot_index.items()}
        slot_outputs = set(prev.values())
        for at, (seg, runner, seq_runner, head) in enumerate(zip(m.segments, self.runners, seq, self._head)):
            if head and wanted != "all":
                if wanted == "last":
                    env.update(last_row(seg, runner, seq_runner, env, n))
                continue
            if seq_runner is not None:
                rows = getattr(seq_runner, "rows", ())
                # a fixed-row build takes the smallest row count that fits; the extra rows are
                # padding at the end, which earlier rows never see (each row reads only earlier ones)
                t = min((r for r in rows if r >= n), default=n) if rows else n
                feed = {k: (views[slot_index[k]] if k in slot_index else pad(env[k], t)) for k in seg.inputs}
                outs = seq_runner.infer(feed)
                if seg.backend == "npu":
                    check_finite(seg, seq_runner, outs, "during prefill")
                for name, value in outs.items():
                    env[name] = np.asarray(value, np.float32).reshape(t, -1)[:n]
                continue
            # new state no later segment reads: only its last row is kept (the chunk's end state)
            later = {x for s in m.segments[at + 1 :] for k in s.inputs for x in (k, prev.get(k))}
            newest = {o for o in seg.outputs if o in slot_outputs and o not in later}
            env.update(row_by_row(seg, runner, env, tokens, m.token_input, prev, first, newest))
        for view, slot in zip(views, self.slots):
            view[...] = env[slot.output][-1].reshape(view.shape)
        logits = env.get(m.logits_output, np.zeros((0, self.vocab), np.float32))
        if not np.isfinite(logits).all():
            raise NumericalError(
                "prefill produced NaN/inf logits",
                "run with --backend ort or check the artifact with `rwkv2rknn check`",
            )
        return logits

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        state = self.init_state()
        return np.stack([self.step(int(t), state) for t in tokens])

    def state_by_slot(self, state: np.ndarray) -> Dict[tuple, np.ndarray]:
        """{(layer, slot name): view} of ``state``."""
        return {(s.layer, s.row): v for s, v in zip(self.slots, self.slot_views(state))}

    def state_as_layers(self, state: np.ndarray, rows: Sequence[str]) -> np.ndarray:
        """The slot array as [layers, rows, width] in the per-layer files' row order."""
        out = np.zeros((self.manifest.layers, len(rows), self.width), np.float32)
        for i, slot in enumerate(self.slots):
            out[slot.layer, rows.index(slot.row)] = state[i]
        return out

    def close(self) -> None:
        for r in (
            self.runners
            + [r for r in (self._seq or []) if r is not None]
            + [r for r in self._shared.values() if r is not None]
        ):
            r.close()  # closing a shared runner twice is harmless
        self._decode = None


def _trim() -> None:
    """glibc keeps freed heap: give it back (measured, a 430M RWKV-7 on ort: 0.2 GiB less held
    after a 200-token prompt)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _named_runner(session, name: str, threads: int):
    """An OrtRunner around a session already made."""
    from rwkv2rknn.runtime.ort import OrtRunner

    runner = OrtRunner.__new__(OrtRunner)
    runner.name, runner.threads, runner.session, runner.note = name, threads, session, ""
    runner.inputs = [i.name for i in session.get_inputs()]
    runner.outputs = [o.name for o in session.get_outputs()]
    from rwkv2rknn.runtime.ort import ORT_TYPES

    runner.input_types = {i.name: ORT_TYPES.get(i.type, np.float32) for i in session.get_inputs()}
    runner.input_shapes = {i.name: i.shape for i in session.get_inputs()}
    return runner


def m_target(model: HybridModel) -> str:
    return model.manifest.target or "rk3588"
