"""One-file models compile like per-layer folders: the file split into its stage files.

::

    model.onnx (our exporter's one-file layout: node and tensor names carry their stage,
    embed/, L0/ ... L{n-1}/, head/; the arch in its metadata)
        -> index the file without reading its weights: the graph's nodes and I/O are parsed,
           each initializer is only located (offset, length; its name read, its data skipped)
        -> per stage: its nodes, its weights read from the file (or its external data), its
           boundary tensors named as the per-layer files name them -> STAGE.onnx
        -> the per-layer folder the streaming compile (compiler/stream.py) takes

So memory stays near one stage's weights while splitting (the file is never loaded whole),
and the compile after it streams. The split only renames: every node, attribute and weight is
the file's own; the compile then validates the cut model against these stage files, and the
artifact records the one file as its source (``check`` compares against it).

A file that is not in this layout (other exporters' one-file graphs) is not split: it compiles
as one graph, as before.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from typing import Dict, List, Optional, Tuple

log = logging.getLogger(__name__)

STAGES_DIR = "source-stages"  # inside the compile's temporary folder; removed before it is whole
_STAGE = re.compile(r"^(embed|head|L(\d+))/")


def _varint(f) -> int:
    shift = result = 0
    while True:
        b = f.read(1)
        if not b:
            raise EOFError
        result |= (b[0] & 0x7F) << shift
        if not b[0] & 0x80:
            return result
        shift += 7


def _fields(f, end: int):
    """(field number, wire type, value) of the protobuf message from ``f``'s position to
    ``end``: a varint's value, or for a length-delimited field (offset, length), skipped."""
    while f.tell() < end:
        key = _varint(f)
        field, wire = key >> 3, key & 7
        if wire == 0:
            yield field, wire, _varint(f)
        elif wire == 2:
            n = _varint(f)
            at = f.tell()
            yield field, wire, (at, n)
            f.seek(at + n)
        elif wire == 1:
            f.seek(8, 1)
        elif wire == 5:
            f.seek(4, 1)
        else:
            raise ValueError(f"wire type {wire}")


def _read(f, span) -> bytes:
    f.seek(span[0])
    return f.read(span[1])


class OneFile:
    """A model file indexed without its weights: ``nodes``, ``inputs``, ``outputs`` and
    ``metadata`` parsed; ``weights`` maps each initializer's name to its place in the file."""

    def __init__(self, path: str):
        import onnx

        self.path = path
        self.nodes, self.inputs, self.outputs, self.value_info = [], [], [], []
        self.weights: Dict[str, Tuple[int, int]] = {}
        self.metadata: Dict[str, str] = {}
        self.opset, self.ir_version, self.sparse = [], 8, False
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            graph = None
            for field, wire, v in _fields(f, size):
                if field == 1 and wire == 0:
                    self.ir_version = v
                elif field == 8 and wire == 2:
                    self.opset.append(onnx.OperatorSetIdProto.FromString(_read(f, v)))
                    f.seek(v[0] + v[1])
                elif field == 14 and wire == 2:
                    e = onnx.StringStringEntryProto.FromString(_read(f, v))
                    self.metadata[e.key] = e.value
                    f.seek(v[0] + v[1])
                elif field == 7 and wire == 2:
                    graph = v
            if graph is None:
                raise ValueError("no graph")
            f.seek(graph[0])
            parse = {
                1: (onnx.NodeProto, self.nodes),
                11: (onnx.ValueInfoProto, self.inputs),
                12: (onnx.ValueInfoProto, self.outputs),
                13: (onnx.ValueInfoProto, self.value_info),
            }
            for field, wire, v in _fields(f, graph[0] + graph[1]):
                if wire != 2:
                    continue
                if field in parse:
                    cls, into = parse[field]
                    into.append(cls.FromString(_read(f, v)))
                    f.seek(v[0] + v[1])
                elif field == 5:
                    self.weights[self._tensor_name(f, v)] = v
                    f.seek(v[0] + v[1])
                elif field == 15:
                    self.sparse = True

    @staticmethod
    def _tensor_name(f, span) -> str:
        f.seek(span[0])
        for field, wire, v in _fields(f, span[0] + span[1]):
            if field == 8 and wire == 2:
                return _read(f, v).decode()
        return ""

    def tensor(self, name: str):
        """One initializer with its data (from the file, or its external data file)."""
        import onnx
        from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

        with open(self.path, "rb") as f:
            t = onnx.TensorProto.FromString(_read(f, self.weights[name]))
        if uses_external_data(t):
            load_external_data_for_tensor(t, os.path.dirname(os.path.abspath(self.path)))
            t.data_location = onnx.TensorProto.DEFAULT
            del t.external_data[:]
        return t

    def stage_bytes(self) -> Dict[str, int]:
        """Weight bytes per stage prefix (external data counted by its recorded length)."""
        import onnx

        out: Dict[str, int] = {}
        with open(self.path, "rb") as f:
            for name, span in self.weights.items():
                m = _STAGE.match(name)
                n = span[1]
                if n < 4096:  # maybe a reference to external data: its length is recorded
                    t = onnx.TensorProto.FromString(_read(f, span))
                    n = max(n, sum(int(e.value) for e in t.external_data if e.key == "length"))
                key = m.group(1) if m else ""
                out[key] = out.get(key, 0) + n
        return out


def stage_layout(path: str) -> Optional[OneFile]:
    """The indexed file if it is in our exporter's one-file layout (its arch in the metadata,
    every node and weight named by its stage), else None."""
    if not (path.endswith(".onnx") and os.path.isfile(path)):
        return None
    st = os.stat(path)
    return _stage_layout(os.path.abspath(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=2)
def _stage_layout(path: str, mtime: int, size: int) -> Optional[OneFile]:
    from rwkv2rknn.models.export import METADATA_PREFIX, MODULES

    try:
        f = OneFile(path)
    except (OSError, ValueError, EOFError, Exception) as e:  # noqa: BLE001 - not ours: one graph
        log.debug("%s is not indexed (%s)", path, e)
        return None
    arch = f.metadata.get(METADATA_PREFIX + "arch", "")
    if f.sparse or arch not in {m.ARCH for m in MODULES.values()}:
        return None
    if (
        not f.nodes
        or not all(_STAGE.match(n.name) for n in f.nodes)
        or not all(_STAGE.match(w) for w in f.weights)
    ):
        return None
    return f


def arch_module(f: OneFile):
    from rwkv2rknn.models.export import METADATA_PREFIX, MODULES

    arch = f.metadata[METADATA_PREFIX + "arch"]
    return next(m for m in MODULES.values() if m.ARCH == arch)


def layers_of(f: OneFile) -> int:
    return len({int(m.group(2)) for n in f.nodes if (m := _STAGE.match(n.name)) and m.group(2)})


def split(f: OneFile, folder: str) -> None:
    """Write the per-layer folder of ``f`` into ``folder`` (one stage in memory at a time)."""
    import onnx
    from onnx import helper
    from rwkv2rknn import fileio
    from rwkv2rknn.models.export import METADATA_PREFIX, MODEL_JSON

    d = arch_module(f)
    n_layers = layers_of(f)
    dtype = f.metadata.get(METADATA_PREFIX + "dtype", "float32")
    elem = onnx.TensorProto.FLOAT16 if dtype in ("float16", "fp16") else onnx.TensorProto.FLOAT
    by_stage: Dict[str, List] = {}
    for node in f.nodes:
        by_stage.setdefault(_STAGE.match(node.name).group(0), []).append(node)
    weights_of: Dict[str, List[str]] = {}
    for name in f.weights:
        weights_of.setdefault(_STAGE.match(name).group(0), []).append(name)
    infos = {v.name: v for v in f.inputs + f.outputs + f.value_info}
    readers: Dict[str, set] = {}  # tensor -> the stages that read it
    for p, nds in by_stage.items():
        for n in nds:
            for i in n.input:
                readers.setdefault(i, set()).add(p)
    inter = tuple(getattr(d, "INTER_LAYER", ()))
    stages = [("embed/", d.EMBED_FILE, d.EMBED_IO)]
    stages += [(f"L{i}/", d.BLOCK_FILE.format(i), d.block_io(i)) for i in range(n_layers)]
    stages += [("head/", d.HEAD_FILE, d.HEAD_IO)]
    os.makedirs(folder, exist_ok=True)
    main = "token"  # the tensor the next stage reads as its first input
    carried: Dict[str, str] = {}  # inter-layer value name -> its tensor in the file
    for prefix, file_name, (in_names, out_names) in stages:
        nodes = by_stage.get(prefix, [])
        made = {o for n in nodes for o in n.output}
        rename = {main: in_names[0]}
        for name in inter:
            if name in in_names and name in carried:
                rename[carried[name]] = name
        later = {t for t, ps in readers.items() if ps - {prefix}} | {o.name for o in f.outputs}
        outs = [o for o in made if o in later]
        out_main = "logits" if prefix == "head/" else prefix + "output"
        rename[out_main] = out_names[0]
        for name in inter:
            if prefix + name in made and name in out_names:
                carried[name] = prefix + name

        def local(n: str) -> str:
            return rename.get(n, n[len(prefix) :] if n.startswith(prefix) else n)

        def info(n: str, new: str):
            v = infos.get(n)
            if v is not None:
                out = onnx.ValueInfoProto()
                out.CopyFrom(v)
                out.name = new
                return out
            dims = [1] if new == "token" else ["width"]
            return helper.make_tensor_value_info(new, elem, dims)

        graph_ins = {}
        for node in nodes:
            for i in node.input:
                if i and i not in made and i not in f.weights:
                    graph_ins[local(i)] = i
        graph_outs = {local(o): o for o in outs}
        missing = [n for n in in_names if n not in graph_ins] + [n for n in out_names if n not in graph_outs]
        if missing or len(graph_ins) != len(in_names) or len(graph_outs) != len(out_names):
            raise ValueError(
                f"stage {prefix} does not have the per-layer I/O {in_names} -> "
                f"{out_names} ({sorted(graph_ins)} -> {sorted(graph_outs)})"
            )
        new_nodes = []
        for node in nodes:
            m = onnx.NodeProto()
            m.CopyFrom(node)
            m.name = local(node.name)
            m.input[:] = [local(i) if i else i for i in node.input]
            m.output[:] = [local(o) if o else o for o in node.output]
            new_nodes.append(m)
        inits = []
        for name in weights_of.get(prefix, []):
            t = f.tensor(name)
            t.name = local(name)
            inits.append(t)
        graph = helper.make_graph(
            new_nodes,
            prefix.rstrip("/"),
            [info(graph_ins[n], n) for n in in_names],
            [info(graph_outs[n], n) for n in out_names],
            inits,
        )
        model = helper.make_model(graph, opset_imports=f.opset, producer_name="rwkv2rknn split")
        model.ir_version = f.ir_version
        fileio.save_onnx(model, os.path.join(folder, file_name))
        del model, graph, inits, new_nodes
        main = out_main
    fileio.write_json(
        os.path.join(folder, MODEL_JSON),
        {
            "arch": d.ARCH,
            "dtype": dtype,
            "tokenizer": f.metadata.get(METADATA_PREFIX + "tokenizer") or None,
            "shape": {"layers": n_layers},
            "split_from": os.path.abspath(f.path),
        },
    )


def source_state(f: OneFile) -> list:
    """The file's (state input, state output, initial value) pairs, as recognize pairs them
    in this layout: by name (``L{i}/NAME`` -> ``L{i}/NAME_out``, RWKV-4's state_in -> state_out),
    starting at zero."""
    outs = {o.name for o in f.outputs}
    pairs = []
    for i in f.inputs:
        if i.name == "token":
            continue
        o = i.name[: -len("state_in")] + "state_out" if i.name.endswith("state_in") else i.name + "_out"
        if o in outs:
            pairs.append([i.name, o, 0.0])
    return pairs
